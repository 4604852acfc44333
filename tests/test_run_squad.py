"""run_squad.py and its data path: exact character spans through sliding windows, null answers, bad input,
and a tiny model that learns a synthetic QA task end to end (v1 in process, v2 as a user runs it)."""

import json
import logging
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest

from helpers.runners import load_runner

from paddle_megatronbert.data.squad import (
    SquadExample,
    build_squad_features,
    parse_squad_json,
    postprocess_squad_predictions,
    read_squad_examples,
    tokenize_with_offsets,
)
from paddle_megatronbert.metrics import squad_evaluate
from paddle_megatronbert.tokenizer import VOCAB_FILES, MegatronBertTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "squad")
UNCASED_VOCAB = VOCAB_FILES["megatronbert-uncased"]

ODD_TEXT = (
    "Héllo,  Wörld!\u00a0The café's crème  brûlée cost $4.50\u2009— naïve résumé-writers (and Zoë)\t"
    "didn't agree.\n\nx²+y² 東京 São\u3000Paulo\u200b Kraków unbelievably-long-hyphenated ÆØÅ end"
)


@pytest.fixture(scope="module")
def uncased():
    return MegatronBertTokenizer.from_pretrained("megatronbert-uncased")


@pytest.fixture(scope="module")
def cased_on_uncased_vocab():
    # A cased tokenizer over the uncased vocab: capitalised words become [UNK], whose span must still be exact.
    return MegatronBertTokenizer(UNCASED_VOCAB, do_lower_case=False)


# ---- tokens and character offsets -------------------------------------------------------------------
@pytest.mark.parametrize("which", ["uncased", "cased_on_uncased_vocab"])
def test_offsets_follow_the_tokenizer_and_slice_the_source(which, request):
    tokenizer = request.getfixturevalue(which)
    tokens, offsets = tokenize_with_offsets(tokenizer, ODD_TEXT)
    assert tokens == tokenizer.tokenize(ODD_TEXT)
    pieces = [ODD_TEXT[s:e] for s, e in offsets]
    assert all(p and not p.isspace() for p in pieces)
    assert all(e1 <= s2 for (_, e1), (s2, _) in zip(offsets, offsets[1:]))  # in order, never overlapping
    assert "café" in pieces or ("caf" in pieces and "é" in pieces)
    if which == "uncased":
        assert "Zoë" in pieces and "東" in pieces and "Kraków" in pieces
    else:
        assert tokens[pieces.index("Kraków")] == "[UNK]"


def test_offsets_equal_hf_fast_tokenizer_offsets():
    transformers = pytest.importorskip("transformers")
    hf = transformers.BertTokenizerFast(vocab=UNCASED_VOCAB, do_lower_case=True)
    assert hf.vocab_size == 30522  # transformers 5.x silently builds a 5-token vocab from vocab_file=
    tokens, offsets = tokenize_with_offsets(MegatronBertTokenizer.from_pretrained("megatronbert-uncased"), ODD_TEXT)
    encoded = hf(ODD_TEXT, add_special_tokens=False, return_offsets_mapping=True)
    assert tokens == hf.convert_ids_to_tokens(encoded["input_ids"])
    assert [tuple(o) for o in encoded["offset_mapping"]] == offsets


# ---- windows ----------------------------------------------------------------------------------------
def _long_example(tokenizer, answer, qas_id="long"):
    filler = " ".join(f"filler{i} word" for i in range(30))
    context = f"{filler} The dessert was {answer} at the old café.  {filler} ÆØÅ\u00a0end"
    start = context.index(answer)
    return SquadExample(qas_id, "Which dessert was it?", context, [answer], [start])


@pytest.mark.parametrize("answer", ["crème  brûlée", "São\u00a0Paulo pie", "Zoë's\u3000tarte Tatin"])
def test_long_context_windows_map_back_to_the_exact_characters(uncased, answer):
    example = _long_example(uncased, answer)
    kwargs = dict(max_seq_length=40, doc_stride=12, max_query_length=8, show_progress=False)
    train = build_squad_features([example], uncased, is_training=True, **kwargs)
    predict = build_squad_features([example], uncased, **kwargs)
    assert len(train) == len(predict) >= 5
    num_context_tokens = len(tokenize_with_offsets(uncased, example.context)[0])

    # Windows start doc_stride tokens apart, cover the context, and each token has exactly one max-context window.
    firsts = [next(o for o in f.offsets if o is not None) for f in predict]
    all_offsets = tokenize_with_offsets(uncased, example.context)[1]
    starts = [all_offsets.index(o) for o in firsts]
    assert starts[:-1] == list(range(0, 12 * (len(starts) - 1), 12))
    assert predict[-1].offsets[-2] == all_offsets[-1]
    max_context_count = {}
    for f in predict:
        for o, is_max in zip(f.offsets, f.max_context):
            if o is not None and is_max:
                max_context_count[o] = max_context_count.get(o, 0) + 1
    assert len(max_context_count) == num_context_tokens and set(max_context_count.values()) == {1}

    # Training labels: the answer's tokens where the window holds all of it, [CLS] elsewhere.
    labelled = [f for f in train if f.start_position > 0]
    assert labelled and len(labelled) < len(train)
    for f in labelled:
        span = example.context[f.offsets[f.start_position][0] : f.offsets[f.end_position][1]]
        assert span == answer
    assert all(f.start_position == f.end_position == 0 for f in train if f not in labelled)

    # Prediction: logits peaking on the answer in one window that holds it -> the exact original text.
    rng = np.random.RandomState(0)
    start_logits = [rng.uniform(-1, 0, len(f.input_ids)) for f in predict]
    end_logits = [rng.uniform(-1, 0, len(f.input_ids)) for f in predict]
    chosen = next(i for i, f in enumerate(predict) if f.max_context[train[i].start_position] and train[i].start_position)
    start_logits[chosen][train[chosen].start_position] = 8.0
    end_logits[chosen][train[chosen].end_position] = 8.0
    predictions, nbest, _ = postprocess_squad_predictions([example], predict, start_logits, end_logits,
                                                          n_best_size=5, max_answer_length=30)
    assert predictions == {"long": answer}
    assert nbest["long"][0]["text"] == answer and len(nbest["long"]) <= 5
    assert sum(c["probability"] for c in nbest["long"]) == pytest.approx(1.0)


def test_null_answer_and_threshold(uncased):
    example = SquadExample("q", "Who?", "Ada Lovelace wrote it.", [], [], True)
    (feature,) = build_squad_features([example], uncased, max_seq_length=32, show_progress=False)
    n = len(feature.input_ids)
    ada = feature.offsets.index((0, 3))
    lovelace_end = next(i for i, o in enumerate(feature.offsets) if o is not None and o[1] == 12)  # love ##lace
    start, end = np.full(n, -5.0), np.full(n, -5.0)
    start[0], end[0] = 2.0, 2.0  # null score 4
    start[ada], end[lovelace_end] = 3.0, 2.0  # "Ada Lovelace" scores 5
    args = ([example], [feature], [start], [end], True, 20, 30)
    predictions, nbest, null_odds = postprocess_squad_predictions(*args, null_score_diff_threshold=0.0)
    assert predictions == {"q": "Ada Lovelace"} and null_odds == {"q": pytest.approx(-1.0)}
    assert "" in [c["text"] for c in nbest["q"]]  # the null answer is always listed in v2
    predictions, _, _ = postprocess_squad_predictions(*args, null_score_diff_threshold=-2.0)
    assert predictions == {"q": ""}


def test_span_rules_length_and_order(uncased):
    example = SquadExample("q", "What?", "one two three four five", ["two"], [4])
    (feature,) = build_squad_features([example], uncased, max_seq_length=32, show_progress=False)
    n = len(feature.input_ids)
    tok = {example.context[o[0]:o[1]]: i for i, o in enumerate(feature.offsets) if o is not None}

    def predict(starts, ends, max_answer_length):
        start, end = np.full(n, -9.0), np.full(n, -9.0)
        for word, value in starts.items():
            start[tok[word]] = value
        for word, value in ends.items():
            end[tok[word]] = value
        predictions, _, _ = postprocess_squad_predictions([example], [feature], [start], [end],
                                                          max_answer_length=max_answer_length)
        return predictions["q"]

    # (four, two) scores 18 but ends before it starts; the best real span is (one, two).
    assert predict({"four": 9, "one": 0}, {"two": 9, "one": 0}, 30) == "one two"
    # (one, five) scores 10 but is 5 tokens; (three, five) 6.5 is 3 tokens; (three, three) 2.5 is 1 token.
    long_span = ({"one": 5, "three": 1.5}, {"five": 5, "three": 1})
    assert predict(*long_span, 5) == "one two three four five"
    assert predict(*long_span, 3) == "three four five"
    assert predict(*long_span, 2) == "three"


# ---- bad input --------------------------------------------------------------------------------------
def test_malformed_json_names_the_file_and_position(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"data": [{"title": "x", "paragraphs": [}', encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken\.json is not valid JSON \(line 1, column"):
        read_squad_examples(str(path), False)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        read_squad_examples(str(tmp_path / "missing.json"), False)


def test_bad_record_is_named():
    data = json.load(open(os.path.join(FIXTURES, "squad_v1.json"), encoding="utf-8"))
    del data["data"][1]["paragraphs"][0]["qas"][1]["question"]
    with pytest.raises(ValueError, match=r"f\.json: data\[1\]\.paragraphs\[0\]\.qas\[1\] \(id v1-5\) has no 'question'"):
        parse_squad_json(data, False, "f.json")
    data = json.load(open(os.path.join(FIXTURES, "squad_v2.json"), encoding="utf-8"))
    with pytest.raises(ValueError, match=r"qas\[1\] \(id v2-2\) is unanswerable .* --version_2_with_negative"):
        parse_squad_json(data, False, "v2.json")
    data["data"][0]["paragraphs"][0]["qas"][0]["answers"][0]["answer_start"] = "47"
    with pytest.raises(ValueError, match=r"answers\[0\]\.answer_start should be a int, got str"):
        parse_squad_json(data, True, "v2.json")


def test_misaligned_answer_is_counted_warned_and_not_trained_on(uncased, caplog):
    data = json.load(open(os.path.join(FIXTURES, "squad_v1.json"), encoding="utf-8"))
    data["data"][0]["paragraphs"][0]["qas"][1]["answers"][0]["answer_start"] += 2  # "Émile Dubois" shifted
    with caplog.at_level(logging.WARNING):
        examples, stats = parse_squad_json(data, False, "shifted.json")
    assert stats.misaligned == ["v1-2"] and stats.questions == 8
    assert "1 of 8 answers do not match the context at answer_start (first: id v1-2" in caplog.text
    features = build_squad_features(examples, uncased, max_seq_length=96, is_training=True, show_progress=False)
    assert sorted({examples[f.example_index].qas_id for f in features}) == [f"v1-{i}" for i in (1, 3, 4, 5, 6, 7, 8)]


def test_paddlenlp_dataset_names_convert_and_fail_clearly_offline(monkeypatch):
    import paddlenlp.datasets

    from paddle_megatronbert.data.squad import load_squad_by_name

    records = [{"id": "a", "title": "t", "context": "Paris is in France.", "question": "Where is Paris?",
                "answers": ["France"], "answer_starts": [12], "is_impossible": False},
               {"id": "b", "title": "t", "context": "Paris is in France.", "question": "Where is Rome?",
                "answers": [], "answer_starts": [], "is_impossible": True}]
    monkeypatch.setattr(paddlenlp.datasets, "load_dataset", lambda name, splits: records if splits == "dev_v2" else None)
    examples, stats = load_squad_by_name("dev", version_2_with_negative=True)
    assert [(e.qas_id, e.answers, e.answer_starts, e.is_impossible) for e in examples] == [
        ("a", ["France"], [12], False), ("b", [], [], True)]
    assert stats.questions == 2 and stats.unanswerable == 1

    def offline(*args, **kwargs):
        raise RuntimeError("Download from https://bj.bcebos.com/paddlenlp/datasets/squad/dev-v1.1.json failed")

    monkeypatch.setattr(paddlenlp.datasets, "load_dataset", offline)
    with pytest.raises(OSError, match=r"cannot load PaddleNLP's squad/dev_v1 .* pass the official JSON with --predict_file"):
        load_squad_by_name("dev", version_2_with_negative=False)


# ---- the runner -------------------------------------------------------------------------------------
SEED_V1 = ("--do_train --do_predict --batch_size=8 --model_name_or_path=megatronbert-cased --learning_rate=1e-5 "
           "--output_dir=output/ --device=gpu --num_train_epochs=2").split()


def test_seed_command_lines_parse():
    run_squad = load_runner("run_squad")
    args = run_squad.parse_args(SEED_V1)
    assert (args.do_train, args.do_predict, args.batch_size, args.learning_rate, args.device) == (True, True, 8, 1e-5, "gpu")
    assert not args.version_2_with_negative and args.num_train_epochs == 2
    args = run_squad.parse_args(SEED_V1[:1] + ["--version_2_with_negative"] + SEED_V1[1:] + ["--use_amp", "true"])
    assert args.version_2_with_negative and args.use_amp is True
    with pytest.raises(SystemExit):
        run_squad.parse_args(["--batch_size=8"])  # neither --do_train nor --do_predict


def write_tiny_model(directory, vocab_file, num_layers=1, hidden=64, **overrides):
    """A from-scratch MegatronBERT (pretraining heads, as a released checkpoint) with its vocab."""
    import paddle

    from paddle_megatronbert import MegatronBertConfig, MegatronBertForPreTraining

    with open(vocab_file, encoding="utf-8") as f:
        vocab_size = sum(1 for _ in f)
    paddle.seed(0)
    # std 1/sqrt(hidden): with BERT-large's 0.02 a hidden-64 model's attention logits start ~0 and the
    # question-to-context matching takes hundreds of steps to appear.
    settings = dict(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=num_layers, num_attention_heads=4,
                    intermediate_size=2 * hidden, max_position_embeddings=64, initializer_range=hidden ** -0.5,
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config = MegatronBertConfig(**{**settings, **overrides})
    MegatronBertForPreTraining(config).save_pretrained(str(directory))
    shutil.copy(vocab_file, os.path.join(str(directory), "vocab.txt"))
    return str(directory)


V2_KEYS = ["exact", "f1", "total", "HasAns_exact", "HasAns_f1", "HasAns_total", "NoAns_exact", "NoAns_f1",
           "NoAns_total", "best_exact", "best_exact_thresh", "best_f1", "best_f1_thresh"]


def test_predict_on_the_fixture_writes_the_official_outputs(tmp_path):
    """--do_predict alone, accented fixture, tiny untrained model: the files are consistent with each other,
    every answer is a slice of its context, and the numbers equal PaddleNLP's evaluation of the same files."""
    from paddlenlp.metrics.squad import squad_evaluate as paddlenlp_squad_evaluate

    model_dir = write_tiny_model(tmp_path / "model", UNCASED_VOCAB, hidden=32, max_position_embeddings=128)
    out = tmp_path / "out"
    results = load_runner("run_squad").main(
        ["--do_predict", "--version_2_with_negative", "--predict_file", os.path.join(FIXTURES, "squad_v2.json"),
         "--model_name_or_path", model_dir, "--output_dir", str(out), "--device", "cpu", "--max_seq_length", "48",
         "--doc_stride", "16", "--no_progress"])
    assert sorted(os.listdir(out)) == ["eval_results.json", "nbest_predictions.json", "null_odds.json", "predictions.json"]
    saved = json.load(open(out / "eval_results.json"))
    assert list(saved) == V2_KEYS and saved == results
    predictions = json.load(open(out / "predictions.json", encoding="utf-8"))
    null_odds = json.load(open(out / "null_odds.json"))
    examples, _ = read_squad_examples(os.path.join(FIXTURES, "squad_v2.json"), True)
    assert set(predictions) == set(null_odds) == {e.qas_id for e in examples}
    for e in examples:
        assert predictions[e.qas_id] in e.context
        assert (predictions[e.qas_id] == "") == (null_odds[e.qas_id] > 0.0)
    gold = {e.qas_id: e.answers for e in examples}
    theirs = paddlenlp_squad_evaluate(
        [{"id": e.qas_id, "answers": {"text": e.answers, "answer_start": e.answer_starts}} for e in examples],
        predictions, null_odds, na_prob_thresh=0.0)
    assert squad_evaluate(gold, predictions, null_odds, na_prob_thresh=0.0) == pytest.approx(dict(theirs))
    assert results == pytest.approx(dict(theirs))


# ---- learning a synthetic task ------------------------------------------------------------------------
SYNTHETIC_WORDS = [f"w{i}" for i in range(60)]


def write_synthetic_vocab(path):
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "from", "to", "?"] + SYNTHETIC_WORDS)
                    + "\n", encoding="utf-8")
    return str(path)


def write_synthetic_squad(path, num_questions, seed, version_2):
    """Contexts of 10-16 distinct random words; "from wA to wB ?" asks for the span from wA to wB (1-4 words).
    With ``version_2`` a third of the questions name a wA that is not in the context: unanswerable."""
    rng = random.Random(seed)
    paragraphs = []
    for k in range(num_questions):
        words = rng.sample(SYNTHETIC_WORDS, rng.randint(10, 16))
        context = " ".join(words)
        i = rng.randrange(len(words))
        j = min(len(words) - 1, i + rng.randrange(4))
        qa = {"id": f"s{seed}-{k}"}
        if version_2 and rng.random() < 1 / 3:
            absent = rng.choice([w for w in SYNTHETIC_WORDS if w not in words])
            qa.update(question=f"from {absent} to {words[j]} ?", answers=[], is_impossible=True)
        else:
            text = " ".join(words[i : j + 1])
            qa.update(question=f"from {words[i]} to {words[j]} ?",
                      answers=[{"text": text, "answer_start": context.index(" ".join(words[i:]))}])
        paragraphs.append({"context": context, "qas": [qa]})
    path.write_text(json.dumps({"version": "synthetic", "data": [{"title": "synthetic", "paragraphs": paragraphs}]}),
                    encoding="utf-8")
    return str(path)


def synthetic_run_args(tmp_path, version_2, num_train):
    vocab = write_synthetic_vocab(tmp_path / "vocab.txt")
    model_dir = write_tiny_model(tmp_path / "model", vocab)
    train = write_synthetic_squad(tmp_path / "train.json", num_train, 1, version_2)
    dev = write_synthetic_squad(tmp_path / "dev.json", 200, 2, version_2)  # held out: other contexts and questions
    return (["--do_train", "--do_predict", "--train_file", train, "--predict_file", dev, "--model_name_or_path",
             model_dir, "--output_dir", str(tmp_path / "out"), "--batch_size", "32", "--learning_rate", "5e-3",
             "--warmup_proportion", "0.05", "--max_seq_length", "32", "--logging_steps", "25", "--seed", "7",
             "--no_progress"] + (["--version_2_with_negative"] if version_2 else []))


def test_tiny_model_learns_synthetic_squad_v1(tmp_path):
    args = synthetic_run_args(tmp_path, version_2=False, num_train=800)
    results = load_runner("run_squad").main(args + ["--num_train_epochs", "5", "--save_steps", "60", "--device", "cpu"])
    assert list(results) == ["exact", "f1", "total", "HasAns_exact", "HasAns_f1", "HasAns_total"]
    assert results["total"] == 200 and results["f1"] >= 90.0, results
    state = json.load(open(tmp_path / "out" / "trainer_state.json"))
    assert [h["step"] for h in state["history"]] == [60, 120, 125] and state["metric_name"] == "f1"
    assert max(h["f1"] for h in state["history"]) == results["f1"] == state["best_metric"]


def test_tiny_model_learns_synthetic_squad_v2_run_as_a_user_would(tmp_path):
    args = synthetic_run_args(tmp_path, version_2=True, num_train=2000)  # with 1000 it overfits (F1 ~80)
    args += ["--num_train_epochs=6", "--save_steps=1000", "--n_gpu", "0", "--model_type", "bert"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "run_squad.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "note: --model_type bert is ignored" in proc.stdout
    assert "global step 25/378, epoch: 1, batch: 25, loss: " in proc.stdout
    results = json.load(open(tmp_path / "out" / "eval_results.json"))
    assert list(results) == V2_KEYS
    assert results["f1"] >= 90.0 and results["HasAns_total"] + results["NoAns_total"] == 200, results
    assert json.dumps(results, indent=2) in proc.stdout  # printed at the end, as in the seed README
    out = tmp_path / "out"
    assert {"predictions.json", "nbest_predictions.json", "null_odds.json", "best_model"} <= set(os.listdir(out))
    assert {"config.json", "model.safetensors", "vocab.txt"} <= set(os.listdir(out / "best_model"))
    # The kept checkpoint reproduces the reported numbers, predicted as a user would: a second command.
    proc = subprocess.run([sys.executable, "run_squad.py", "--do_predict", "--version_2_with_negative",
                           "--predict_file", str(tmp_path / "dev.json"), "--model_name_or_path", str(out / "best_model"),
                           "--output_dir", str(tmp_path / "again"), "--max_seq_length", "32", "--device", "cpu",
                           "--no_progress"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.load(open(tmp_path / "again" / "eval_results.json")) == pytest.approx(results)
