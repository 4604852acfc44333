"""SQuAD v1.1 / v2.0: reading the official JSON, sliding-window features, and mapping span logits back
to the exact characters of the context.

Every token carries the character span it came from in the ORIGINAL context (:func:`tokenize_with_offsets`
replays BERT's basic + WordPiece tokenization one character at a time), so a predicted span is a plain
slice of the context: accents, odd whitespace and casing come back exactly as written.
"""

from __future__ import annotations

import json
import logging
import unicodedata
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..logging_utils import progress
from .text_files import read_utf8_text

logger = logging.getLogger(__name__)

Offset = Tuple[int, int]  # [start, end) character span in the original text


@dataclass
class SquadExample:
    """One question about one context.

    Args:
        qas_id: the question id of the JSON.
        question: the question text.
        context: the paragraph.
        answers: gold answer texts (several in dev sets; empty for an unanswerable question).
        answer_starts: character offsets of ``answers`` in ``context``.
        is_impossible: SQuAD v2 unanswerable question.
        title: the article title.
    """

    qas_id: str
    question: str
    context: str
    answers: List[str] = field(default_factory=list)
    answer_starts: List[int] = field(default_factory=list)
    is_impossible: bool = False
    title: str = ""


@dataclass
class SquadReadStats:
    """What reading a file found. ``misaligned`` lists question ids whose first answer's text is not
    the context at its ``answer_start`` (they are not trained on)."""

    articles: int = 0
    questions: int = 0
    unanswerable: int = 0
    misaligned: List[str] = field(default_factory=list)


# ---- reading the official JSON --------------------------------------------------------------------
def _require(record, key, kind, where, path):
    if not isinstance(record, dict) or key not in record:
        raise ValueError(f"{path}: {where} has no {key!r} field")
    value = record[key]
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise ValueError(f"{path}: {where}.{key} should be a {names}, got {type(value).__name__}")
    return value


def parse_squad_json(data: dict, version_2_with_negative: bool, path: str = "<data>"):
    """Examples of a loaded SQuAD JSON (``{"data": [{"title", "paragraphs": [{"context", "qas"}]}]}``).

    Raises ValueError naming ``path`` and the first bad record (``data[i].paragraphs[j].qas[k]``) when the
    layout is wrong. Answers whose text differs from the context at ``answer_start`` are counted in the
    returned stats and logged; they stay in the examples (their texts still score predictions).
    """
    articles = _require(data, "data", list, "the top level", path)
    examples, stats = [], SquadReadStats(articles=len(articles))
    seen_ids = set()
    for i, article in enumerate(articles):
        where_article = f"data[{i}]"
        title = article.get("title", "") if isinstance(article, dict) else ""
        for j, paragraph in enumerate(_require(article, "paragraphs", list, where_article, path)):
            where_par = f"{where_article}.paragraphs[{j}]"
            context = _require(paragraph, "context", str, where_par, path)
            for k, qa in enumerate(_require(paragraph, "qas", list, where_par, path)):
                where = f"{where_par}.qas[{k}]"
                qas_id = str(_require(qa, "id", (str, int), where, path))
                where = f"{where} (id {qas_id})"
                if qas_id in seen_ids:
                    raise ValueError(f"{path}: {where}: duplicate question id")
                seen_ids.add(qas_id)
                question = _require(qa, "question", str, where, path)
                is_impossible = bool(qa.get("is_impossible", False))
                if is_impossible and not version_2_with_negative:
                    raise ValueError(
                        f"{path}: {where} is unanswerable (is_impossible) but --version_2_with_negative is not set"
                    )
                answer_records = _require(qa, "answers", list, where, path)
                if not answer_records and not is_impossible and not version_2_with_negative:
                    raise ValueError(f"{path}: {where} has no answers (SQuAD v1.1 questions must have one)")
                answers, starts = [], []
                for a, answer in enumerate(answer_records):
                    text = _require(answer, "text", str, f"{where}.answers[{a}]", path)
                    start = _require(answer, "answer_start", int, f"{where}.answers[{a}]", path)
                    answers.append(text)
                    starts.append(start)
                if is_impossible:  # v2 lists plausible_answers separately; "answers" must then be empty
                    answers, starts = [], []
                elif answers and context[starts[0] : starts[0] + len(answers[0])] != answers[0]:
                    stats.misaligned.append(qas_id)
                stats.questions += 1
                stats.unanswerable += int(not answers)
                examples.append(SquadExample(qas_id, question, context, answers, starts, not answers, title))
    if stats.misaligned:
        first = next(e for e in examples if e.qas_id == stats.misaligned[0])
        logger.warning(
            "%s: %d of %d answers do not match the context at answer_start (first: id %s, answer %r, context has "
            "%r there); they are skipped for training",
            path, len(stats.misaligned), stats.questions, first.qas_id, first.answers[0],
            first.context[first.answer_starts[0] : first.answer_starts[0] + len(first.answers[0])],
        )
    return examples, stats


def read_squad_examples(path: str, version_2_with_negative: bool):
    """Examples and stats of a SQuAD JSON file (see :func:`parse_squad_json`)."""
    text = read_utf8_text(path, "SQuAD")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
    return parse_squad_json(data, version_2_with_negative, path)


def load_squad_by_name(split: str, version_2_with_negative: bool):
    """Examples of PaddleNLP's ``squad`` dataset (``train``/``dev`` split), downloaded once; needs a network."""
    name = f"{split}_v2" if version_2_with_negative else f"{split}_v1"
    try:
        from paddlenlp.datasets import load_dataset

        dataset = load_dataset("squad", splits=name)
    except Exception as err:  # offline: a requests/urllib error deep inside PaddleNLP
        raise OSError(
            f"cannot load PaddleNLP's squad/{name} ({type(err).__name__}: {err}); without a network pass the "
            f"official JSON with --{'train' if split == 'train' else 'predict'}_file"
        ) from None
    examples = []
    for record in dataset:
        answers = [] if record.get("is_impossible") else list(record["answers"])
        starts = [] if record.get("is_impossible") else list(record["answer_starts"])
        examples.append(SquadExample(str(record["id"]), record["question"], record["context"], answers, starts,
                                     not answers, record.get("title", "")))
    return examples, SquadReadStats(questions=len(examples), unanswerable=sum(e.is_impossible for e in examples))


# ---- tokenization with exact character offsets -------------------------------------------------------
_SPLIT_CACHE: Dict[type, Dict[str, bool]] = {}  # BasicTokenizer class -> char -> splits alone


def _splits_alone(basic_tokenizer, cache: Dict[str, bool], ch: str) -> bool:
    """Whether the tokenizer makes ``ch`` a word of its own (punctuation; PaddleNLP's own BasicTokenizer
    also symbols): asked of the tokenizer's own splitting rule, so a subclass that changes it is followed."""
    if ch not in cache:
        cache[ch] = len(basic_tokenizer._run_split_on_punc("a" + ch + "a")) == 3
    return cache[ch]


def tokenize_with_offsets(tokenizer, text: str) -> Tuple[List[str], List[Offset]]:
    """WordPiece tokens of ``text`` and the [start, end) character span of each in ``text``.

    Replays ``tokenizer``'s BERT pipeline (drop control characters, split on whitespace, CJK characters
    and punctuation, lower-case and strip accents when the vocabulary is uncased, then WordPiece)
    character by character, so each normalised character remembers its source. The tokens equal
    ``tokenizer.tokenize(text)``; the one known difference is a word-final capital sigma, which is
    lower-cased per character (σ rather than ς).
    """
    from paddlenlp.transformers.tokenizer_utils import _is_control as is_control
    from paddlenlp.transformers.tokenizer_utils import _is_whitespace as is_whitespace

    basic = tokenizer.basic_tokenizer
    split_cache = _SPLIT_CACHE.setdefault(type(basic), {})
    lower = basic.do_lower_case
    strip_accents = basic.strip_accents if basic.strip_accents is not None else lower
    words: List[Tuple[str, List[int]]] = []  # (normalised word, source index of each of its characters)
    chars: List[str] = []
    sources: List[int] = []

    def flush():
        if chars:
            words.append(("".join(chars), list(sources)))
            chars.clear()
            sources.clear()

    for index, ch in enumerate(text):
        if ord(ch) == 0 or ord(ch) == 0xFFFD or is_control(ch):
            continue
        if is_whitespace(ch):
            flush()
            continue
        if basic.tokenize_chinese_chars and basic._is_chinese_char(ord(ch)):
            flush()
            words.append((ch, [index]))
            continue
        normalised = ch.lower() if lower else ch
        if strip_accents:
            normalised = "".join(c for c in unicodedata.normalize("NFD", normalised) if unicodedata.category(c) != "Mn")
        for c in normalised:
            if _splits_alone(basic, split_cache, c):
                flush()
                words.append((c, [index]))
            else:
                chars.append(c)
                sources.append(index)
    flush()

    tokens: List[str] = []
    offsets: List[Offset] = []
    unk = tokenizer.unk_token
    for word, word_sources in words:
        pieces = tokenizer.wordpiece_tokenizer.tokenize(word)
        if pieces == [unk]:
            tokens.append(unk)
            offsets.append((word_sources[0], word_sources[-1] + 1))
            continue
        position = 0
        for piece in pieces:
            length = len(piece[2:]) if piece.startswith("##") else len(piece)
            tokens.append(piece)
            offsets.append((word_sources[position], word_sources[position + length - 1] + 1))
            position += length
    return tokens, offsets


# ---- features -------------------------------------------------------------------------------------
@dataclass
class SquadFeature:
    """One window of one example, ready for the model.

    Args:
        example_index: index of the example in the list the features were built from.
        input_ids, token_type_ids: ``[CLS] question [SEP] context window [SEP]``.
        offsets: per position, the character span in the context (None outside the context).
        max_context: per position, whether this window gives the token its most context (a start
            position is taken only from that window, as in the original BERT).
        start_position, end_position: the answer's token span (0, 0 = [CLS] when the window has no answer);
            -1 when the feature is for prediction only.
    """

    example_index: int
    input_ids: List[int]
    token_type_ids: List[int]
    offsets: List[Optional[Offset]]
    max_context: List[bool]
    start_position: int = -1
    end_position: int = -1


def _windows(num_tokens: int, max_tokens: int, doc_stride: int) -> List[Tuple[int, int]]:
    """(start, length) of each window; consecutive windows start ``doc_stride`` tokens apart (the
    original BERT meaning of --doc_stride), the last one reaches the end of the context."""
    windows, start = [], 0
    while True:
        length = min(num_tokens - start, max_tokens)
        windows.append((start, length))
        if start + length >= num_tokens:
            return windows
        start += min(length, doc_stride)


def _max_context(windows, window_index, position) -> bool:
    """Whether ``window_index`` gives the token at ``position`` the most context (min of left/right
    context, with a small bonus for longer windows), as the original BERT ``_check_is_max_context``."""
    best_score, best_window = None, None
    for index, (start, length) in enumerate(windows):
        end = start + length - 1
        if position < start or position > end:
            continue
        score = min(position - start, end - position) + 0.01 * length
        if best_score is None or score > best_score:
            best_score, best_window = score, index
    return best_window == window_index


def _answer_token_span(offsets: Sequence[Offset], start_char: int, end_char: int) -> Optional[Tuple[int, int]]:
    """First and last context tokens overlapping [start_char, end_char); None if none does."""
    covered = [i for i, (s, e) in enumerate(offsets) if e > start_char and s < end_char]
    return (covered[0], covered[-1]) if covered else None


def build_squad_features(examples: Sequence[SquadExample], tokenizer, max_seq_length: int = 384,
                         doc_stride: int = 128, max_query_length: int = 64, is_training: bool = False,
                         show_progress: bool = True) -> List[SquadFeature]:
    """Sliding-window features of ``examples``.

    Training features label the answer's token span, or [CLS] (0) when the window does not contain the
    whole answer or the question is unanswerable; examples whose answer text does not match the context
    at ``answer_start`` are skipped (counted and logged by the reader). Prediction features keep the
    offsets to map spans back to the context.
    """
    if doc_stride < 1:
        raise ValueError(f"doc_stride must be >= 1, got {doc_stride}")
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    features: List[SquadFeature] = []
    skipped = 0
    cached_context = None
    desc = "building SQuAD training features" if is_training else "building SQuAD prediction features"
    for example_index, example in enumerate(progress(examples, desc, enabled=show_progress)):
        query_tokens, _ = tokenize_with_offsets(tokenizer, example.question)
        query_ids = tokenizer.convert_tokens_to_ids(query_tokens[:max_query_length])
        if example.context != cached_context:  # questions of one paragraph come together: tokenize it once
            cached_context = example.context
            context_tokens, context_offsets = tokenize_with_offsets(tokenizer, example.context)
            context_ids = tokenizer.convert_tokens_to_ids(context_tokens)
        max_tokens = max_seq_length - len(query_ids) - 3
        if max_tokens < 1:
            raise ValueError(
                f"max_seq_length {max_seq_length} leaves no room for the context after a {len(query_ids)}-token "
                f"question (id {example.qas_id}); raise max_seq_length or lower max_query_length"
            )
        answer_span = None
        if is_training and example.answers:
            start_char = example.answer_starts[0]
            end_char = start_char + len(example.answers[0])
            if example.context[start_char:end_char] != example.answers[0]:
                skipped += 1
                continue
            answer_span = _answer_token_span(context_offsets, start_char, end_char)
            if answer_span is None:  # the answer is only whitespace/control characters
                skipped += 1
                continue
        windows = _windows(len(context_ids), max_tokens, doc_stride)
        prefix = 1 + len(query_ids) + 1
        for window_index, (start, length) in enumerate(windows):
            input_ids = [cls_id] + query_ids + [sep_id] + context_ids[start : start + length] + [sep_id]
            token_type_ids = [0] * prefix + [1] * (length + 1)
            offsets: List[Optional[Offset]] = [None] * prefix + context_offsets[start : start + length] + [None]
            max_context = [False] * prefix + [
                _max_context(windows, window_index, start + i) for i in range(length)
            ] + [False]
            feature = SquadFeature(example_index, input_ids, token_type_ids, offsets, max_context)
            if is_training:
                feature.start_position = feature.end_position = 0
                if answer_span is not None and start <= answer_span[0] and answer_span[1] < start + length:
                    feature.start_position = answer_span[0] - start + prefix
                    feature.end_position = answer_span[1] - start + prefix
            features.append(feature)
    if skipped:
        logger.warning("skipped %d training examples whose answer does not match the context", skipped)
    return features


# ---- from logits to answer texts ------------------------------------------------------------------------
# null odds written for a question no window offers any valid span for (JSON has no infinity).
NO_SPAN_NULL_ODDS = 1e9


def _softmax(scores: np.ndarray) -> np.ndarray:
    exp = np.exp(scores - scores.max())
    return exp / exp.sum()


def postprocess_squad_predictions(
    examples: Sequence[SquadExample],
    features: Sequence[SquadFeature],
    start_logits: Sequence[np.ndarray],
    end_logits: Sequence[np.ndarray],
    version_2_with_negative: bool = False,
    n_best_size: int = 20,
    max_answer_length: int = 30,
    null_score_diff_threshold: float = 0.0,
):
    """Answer texts from span logits (one pair of arrays per feature, same order as ``features``).

    For each question: the ``n_best_size`` best starts x ends of every window, kept when both are in the
    context, end >= start, at most ``max_answer_length`` tokens long, and the start token has its max
    context in that window; a span's score is start + end logit and its text is the context slice of its
    characters. With ``version_2_with_negative`` the null score is the lowest [CLS] start + end score over
    the windows; the question is answered "" when null - best span > ``null_score_diff_threshold``.

    Returns:
        predictions (id -> text), nbest (id -> list of {text, probability, start_logit, end_logit}),
        null_odds (id -> null - best span score; only with ``version_2_with_negative``).
    """
    by_example: Dict[int, List[int]] = {}
    for feature_index, feature in enumerate(features):
        by_example.setdefault(feature.example_index, []).append(feature_index)

    predictions, nbest_json, null_odds = {}, {}, {}
    for example_index, example in enumerate(examples):
        if example_index not in by_example:
            raise ValueError(f"question {example.qas_id} has no features: build them from the same examples")
        candidates = []
        null_score, null_logits = None, (0.0, 0.0)
        for feature_index in by_example[example_index]:
            feature = features[feature_index]
            length = len(feature.input_ids)
            starts = np.asarray(start_logits[feature_index][:length], dtype=np.float64)
            ends = np.asarray(end_logits[feature_index][:length], dtype=np.float64)
            cls_score = starts[0] + ends[0]
            if null_score is None or cls_score < null_score:
                null_score, null_logits = cls_score, (float(starts[0]), float(ends[0]))
            best_starts = np.argsort(-starts, kind="stable")[:n_best_size]
            best_ends = np.argsort(-ends, kind="stable")[:n_best_size]
            for s in best_starts:
                if feature.offsets[s] is None or not feature.max_context[s]:
                    continue
                for e in best_ends:
                    if feature.offsets[e] is None or e < s or e - s + 1 > max_answer_length:
                        continue
                    char_start, char_end = feature.offsets[s][0], feature.offsets[e][1]
                    candidates.append((starts[s] + ends[e], float(starts[s]), float(ends[e]),
                                       example.context[char_start:char_end]))
        candidates.sort(key=lambda c: -c[0])
        nbest, seen_texts = [], set()
        for score, start_logit, end_logit, text in candidates:
            if text in seen_texts:
                continue
            seen_texts.add(text)
            nbest.append({"text": text, "score": score, "start_logit": start_logit, "end_logit": end_logit})
            if len(nbest) == n_best_size:
                break
        best_span = nbest[0] if nbest else None
        if version_2_with_negative:  # the null answer is always listed, beside up to n_best_size spans
            nbest.append({"text": "", "score": null_score, "start_logit": null_logits[0], "end_logit": null_logits[1]})
            nbest.sort(key=lambda c: -c["score"])
        probabilities = _softmax(np.array([c["score"] for c in nbest])) if nbest else []
        nbest_json[example.qas_id] = [
            {"text": c["text"], "probability": float(p), "start_logit": c["start_logit"], "end_logit": c["end_logit"]}
            for c, p in zip(nbest, probabilities)
        ]
        if not version_2_with_negative:
            predictions[example.qas_id] = best_span["text"] if best_span else ""
            continue
        diff = NO_SPAN_NULL_ODDS if best_span is None else float(null_score - best_span["score"])
        null_odds[example.qas_id] = diff
        predictions[example.qas_id] = "" if best_span is None or diff > null_score_diff_threshold else best_span["text"]
    return predictions, nbest_json, null_odds
