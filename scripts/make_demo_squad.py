#!/usr/bin/env python
"""Build the bundled SQuAD v1.1-format sample (data/squad_sample/) from the shipped text (data/sample_text.txt).

Real SQuAD cannot be downloaded here, so the demo fine-tunes on cloze-style questions over real prose:
each context is a run of consecutive sentences of *Botchan*; a question names the first and the last word of
a short span (one to four words) of one of its sentences, and the answer is that span at its exact character
offset. A tiny model pretrained for minutes can learn to find it; the real SQuAD needs the real weights. Deterministic (seeded); the files are committed, this script documents how they were made.

    python scripts/make_demo_squad.py --out data/squad_sample
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re

STOPWORDS = set("""
about above after again against because before being below between could doing during every from further
having here itself just more most myself once only other ought ourselves over same should some such than that
their theirs them themselves then there these they this those through under until very were what when where
which while whom with would your yours yourself yourselves said like into shall also much even never still
upon though thought know went came come made make told tell cannot without
""".split())


def read_documents(path):
    documents, current = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                current.append(line)
            elif current:
                documents.append(current)
                current = []
    if current:
        documents.append(current)
    return documents


def cloze_question(sentence, rng):
    """(question, answer, answer offset in the sentence) or None: the question names the first and the last
    word of a short span of the sentence (one to four words), and the answer is the span itself."""
    words = list(re.finditer(r"[A-Za-z][A-Za-z'-]*[A-Za-z]", sentence))
    if len(words) < 6:
        return None
    first = rng.randrange(len(words))
    last = min(len(words) - 1, first + rng.randrange(4))
    start, end = words[first].start(), words[last].end()
    question = f'What runs from "{words[first].group()}" to "{words[last].group()}"?'
    return question, sentence[start:end], start


def build(documents, rng, sentences_per_context=5, questions_per_sentence=2):
    articles = []
    for doc_index, sentences in enumerate(documents):
        paragraphs = []
        for start in range(0, len(sentences), sentences_per_context):
            chunk = sentences[start : start + sentences_per_context]
            context = " ".join(chunk)
            offsets, position = [], 0
            for sentence in chunk:
                offsets.append(position)
                position += len(sentence) + 1
            qas, asked = [], set()
            for sentence_index, sentence in enumerate(chunk):
                for attempt in range(questions_per_sentence):
                    made = cloze_question(sentence, rng)
                    if made is None or made[0] in asked:
                        continue
                    question, answer, offset = made
                    asked.add(question)
                    answer_start = offsets[sentence_index] + offset
                    assert context[answer_start : answer_start + len(answer)] == answer
                    qas.append({"id": f"botchan-{doc_index}-{start}-{sentence_index}-{attempt}", "question": question,
                                "answers": [{"text": answer, "answer_start": answer_start}]})
            if qas:
                paragraphs.append({"context": context, "qas": qas})
        articles.append({"title": f"Botchan, part {doc_index + 1}", "paragraphs": paragraphs})
    return articles


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", default=os.path.join(os.path.dirname(__file__), "..", "data", "sample_text.txt"))
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "data", "squad_sample"))
    parser.add_argument("--seed", type=int, default=12345)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    articles = build(read_documents(args.text), rng)
    # Held out by context: every 5th paragraph of each article goes to dev.
    train, dev = [], []
    for article in articles:
        train.append({"title": article["title"], "paragraphs": [p for i, p in enumerate(article["paragraphs"]) if i % 5]})
        dev.append({"title": article["title"], "paragraphs": [p for i, p in enumerate(article["paragraphs"]) if not i % 5]})
    os.makedirs(args.out, exist_ok=True)
    for name, data in (("train-v1.1.json", train), ("dev-v1.1.json", dev)):
        path = os.path.join(args.out, name)
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"version": "1.1", "data": data}, f, ensure_ascii=False, indent=None)
        count = sum(len(p["qas"]) for a in data for p in a["paragraphs"])
        print(f"wrote {path}: {count} questions")


if __name__ == "__main__":
    main()
