"""``resize_token_embeddings`` at TP=2 (neither peer resizes a tensor-parallel model on CPU): one 2-process
launch of tests/dist/resize_checks.py, whose numbers are asserted here; and the same at TP=1 in this process
(the translated suites' test_resize_tokens_embeddings check shapes and kept rows at TP=1 too). The same launch
checks ``output_attentions`` at TP=2: every head's probabilities, equal to TP=1's."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import paddle
import pytest

from paddle_megatronbert import MegatronBertConfig, MegatronBertForPreTraining

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "tests", "dist", "resize_checks.py")
TIMEOUT_S = 180  # a hang fails the test instead of blocking the suite


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("resize")
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", str(out / "log"),
           SCRIPT, "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PADDLE_")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        output = proc.communicate(timeout=TIMEOUT_S)[0].decode(errors="replace")
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"resize_checks hung: no exit within {TIMEOUT_S} s")
    logs = "\n".join((out / "log" / f"workerlog.{r}").read_text(errors="replace")[-3000:]
                     for r in range(2) if (out / "log" / f"workerlog.{r}").exists())
    assert proc.returncode == 0, f"resize_checks failed (rc {proc.returncode}):\n{output[-2000:]}\n{logs}"
    return [json.loads((out / f"resize.rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("tag,vocab", [("up", 1043), ("down", 700)])
def test_resize_keeps_rows_tie_and_loss_at_tp2(results, tag, vocab):
    for rank, result in enumerate(results):
        assert result[f"{tag}_vocab"] == vocab and result[f"{tag}_full_rows"] == vocab
        assert result[f"{tag}_local_rows"] == result[f"{tag}_local_bias"] == -(-vocab // 2)  # padded halves
        assert result[f"{tag}_tied"], f"rank {rank}: the decoder is no longer the word embedding"
        assert result[f"{tag}_kept_rows_diff"] == 0.0 and result[f"{tag}_kept_bias_diff"] == 0.0
        assert abs(result[f"{tag}_loss"] - result[f"{tag}_tp1_loss"]) < 1e-5  # TP=2 computes what TP=1 does
    assert results[0][f"{tag}_loss"] == pytest.approx(results[1][f"{tag}_loss"], abs=1e-6)


def test_resized_model_saves_and_loads_at_tp2_and_tp1(results):
    for result in results:
        assert result["reloaded_vocab"] == 700
        assert abs(result["reloaded_loss"] - result["down_loss"]) < 1e-5
        assert abs(result["reloaded_tp1_loss"] - result["down_loss"]) < 1e-5


@pytest.mark.parametrize("new_vocab", [1043, 700], ids=["up", "down"])
def test_resize_then_save_load_at_tp1(tmp_path, new_vocab):
    paddle.seed(0)
    model = MegatronBertForPreTraining(MegatronBertConfig(
        vocab_size=1001, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    with paddle.no_grad():
        model.cls.predictions.bias.set_value(paddle.full([1001], 0.25))
    before = model.get_input_embeddings().weight.numpy().copy()
    model.resize_token_embeddings(new_vocab)
    kept = min(1001, new_vocab)
    np.testing.assert_array_equal(model.get_input_embeddings().weight.numpy()[:kept], before[:kept])
    np.testing.assert_array_equal(model.cls.predictions.bias.numpy()[:kept], np.full([kept], 0.25, "float32"))
    assert model.get_output_embeddings().decoder is model.get_input_embeddings().weight
    model.eval()
    ids = paddle.to_tensor(np.random.RandomState(0).randint(1, 700, size=(2, 8)))
    inputs = dict(input_ids=ids, labels=ids, next_sentence_label=paddle.to_tensor([0, 1]), return_dict=True)
    out = model(**inputs)
    assert out.prediction_logits.shape == [2, 8, new_vocab] and np.isfinite(float(out.loss))
    model.save_pretrained(str(tmp_path))
    reloaded = MegatronBertForPreTraining.from_pretrained(str(tmp_path))
    reloaded.eval()
    assert reloaded.config.vocab_size == new_vocab
    np.testing.assert_allclose(float(reloaded(**inputs).loss), float(out.loss), rtol=1e-6)


def test_attention_probabilities_at_tp2_hold_every_head_and_equal_tp1(results):
    for result in results:
        assert result["attention_heads"] == 4  # both ranks' 2 heads
        assert result["attention_probs_diff"] < 1e-6
