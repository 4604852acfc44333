"""Time one training step (forward + backward + AdamW) of MegatronBERT pretraining, side by side.

Contestants, on identical shapes and batches (MLM on ``--masked`` positions per sequence + NSP):
  ours-fast   paddle_megatronbert.MegatronBertForPreTraining, fast paths on (MLM head on the masked rows)
  ours-plain  the same model, fast paths off (plain Paddle ops; MLM head still on the masked rows)
  paddlenlp   paddlenlp.transformers.MegatronBertForPreTraining as its users run it: default Paddle flags,
              full logits, then the masked rows gathered for the loss
  torch       HF transformers MegatronBertForPreTraining, eager fp32, as its users run it (labels -> loss)
  torch-bf16  the same under torch.autocast(bfloat16), for reference
  ours-baseline  ours-fast imported from another checkout (``--baseline_tree DIR``, e.g. a ``git worktree``
              of an older commit): before vs after a change, in the same run (not in the default set)
  torch-masked  HF's modules with the MLM head on the masked rows only (not in the default set)
  paddlenlp-tuned  PaddleNLP with our process-level CPU settings (stride kernels off, MKL's AVX2 path on
              AMD, freed memory kept in the heap): how much of our lead is settings, not code (not default)

Every contestant starts from the same weights: a child process draws one random state of our model
(``--seed``; our names, Paddle's ``[in, out]`` Linear layout) into a temporary .npz, and each worker loads
it, renamed for PaddleNLP and transposed for HF torch. Before any step each worker computes the loss of the
first batch in eval mode (dropout off): these parity losses are printed, and the run stops with a non-zero
exit when an fp32 contestant's differs from ours by more than 1e-3 (bf16 ones are only reported). Every
model uses LayerNorm eps 1e-12, which PaddleNLP forces. Timed steps run in train mode (dropout 0.1).

Each contestant lives in its own worker process: flags (Paddle's stride kernels), thread pools (Paddle's
Intel OpenMP vs torch's GNU OpenMP) and peak memory stay separate. The driver asks the workers for one
step in turn (the order rotates each round), so a busy moment on the machine hits every contestant;
warm-up steps are excluded and the median of ``--steps`` is reported. Prints a table and one JSON line.

    OMP_NUM_THREADS=2 python benchmarks/bench_train.py --config base --batch_size 8 --seq_len 128
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIGS = {
    "tiny": dict(vocab_size=1024, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=512, max_position_embeddings=512),
    "base": dict(vocab_size=30592, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, max_position_embeddings=512),
    "345m": dict(vocab_size=30592, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                 intermediate_size=4096, max_position_embeddings=512),
}
# LayerNorm eps 1e-12: PaddleNLP's MegatronBert forces it on every LayerNorm whatever its config says, so
# ours and HF's use it too and every contestant computes the same function.
COMMON = dict(type_vocab_size=2, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, layer_norm_eps=1e-12,
              hidden_act="gelu")
TRAIN_MODELS = ("ours-fast", "ours-plain", "paddlenlp", "torch", "torch-bf16", "torch-masked", "paddlenlp-tuned",
                "ours-baseline")
DEFAULT_TRAIN_MODELS = ("ours-fast", "ours-plain", "paddlenlp", "torch", "torch-bf16")


# ---- batches and FLOPs (shared with bench_infer.py) ------------------------------------------------
def make_pretraining_batch(config, batch, seq, masked, seed=0):
    """Numpy arrays of one pretraining batch: no padding (every contestant sees the same work)."""
    import numpy as np

    rng = np.random.RandomState(seed)
    input_ids = rng.randint(1, config["vocab_size"], size=(batch, seq)).astype("int64")
    token_type_ids = np.zeros((batch, seq), dtype="int64")
    token_type_ids[:, seq // 2:] = 1
    positions = np.stack([np.sort(rng.choice(seq, masked, replace=False)) for _ in range(batch)]).astype("int64")
    mlm_labels = rng.randint(1, config["vocab_size"], size=(batch, masked)).astype("int64")
    full_labels = np.full((batch, seq), -100, dtype="int64")
    np.put_along_axis(full_labels, positions, mlm_labels, axis=1)
    return dict(input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=np.ones((batch, seq), "int64"),
                masked_positions=positions, mlm_labels=mlm_labels, full_labels=full_labels,
                nsp_labels=rng.randint(0, 2, size=(batch,)).astype("int64"))


def encoder_flops(config, batch, seq):
    """Forward FLOPs of the encoder (GEMMs and attention matmuls; element-wise work left out)."""
    h, f, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    tokens = batch * seq
    per_layer = 2 * tokens * (4 * h * h + 2 * h * f) + 2 * 2 * batch * seq * seq * h
    return layers * per_layer


def pretraining_flops(config, batch, seq, lm_rows):
    """FLOPs of one training step (forward x 3) with the LM head evaluated on ``lm_rows`` rows."""
    h, v = config["hidden_size"], config["vocab_size"]
    forward = encoder_flops(config, batch, seq) + 2 * lm_rows * (h * h + h * v) + 2 * batch * h * h
    return 3 * forward


# ---- one set of weights for every contestant -------------------------------------------------------
WORD_EMBEDDINGS = "bert.embeddings.word_embeddings.weight"
PARITY_TOLERANCE = 1e-3  # absolute, on the eval-mode loss of the first batch, fp32 contestants against ours
# Our names -> PaddleNLP's, applied in order (the inverse of paddle_megatronbert/convert/paddlenlp.py).


def write_shared_state(spec, path):
    """Random weights of our ``MegatronBertForPreTraining`` (seed ``spec["seed"]``) saved to ``path`` (.npz).

    Our names and layout (Linear ``[in, out]``); LayerNorm gains and biases are moved off 1 and 0 so a
    mis-mapped one shows in the parity losses; row 0 (the [PAD] id) of the word embeddings is zero because
    PaddleNLP's embedding has ``padding_idx=0`` and outputs zeros for it whatever the weights say.
    """
    import numpy as np

    _paddle_setup(spec)
    sys.path.insert(0, REPO)
    from paddle_megatronbert import MegatronBertConfig, MegatronBertForPreTraining

    model = MegatronBertForPreTraining(MegatronBertConfig(**spec["model_config"], use_fast_kernels=False))
    rng = np.random.RandomState(spec["seed"])
    state = {}
    for name, param in model.state_dict().items():
        value = param.numpy().astype("float32")
        if value.ndim == 1:
            value = value + rng.normal(0.0, 0.02, value.shape).astype("float32")
        state[name] = value
    state[WORD_EMBEDDINGS][0] = 0.0
    np.savez(path, **state)


def load_shared_state(path):
    import numpy as np

    with np.load(path) as archive:
        return {name: archive[name] for name in archive.files}


def to_paddlenlp_state(state):
    """Our state -> PaddleNLP's ``MegatronBertForPreTraining`` (same layout; its LM decoder is a separate
    parameter, given the word embeddings as ours and HF's tie them). The names come from the package's one
    PaddleNLP table (``convert/paddlenlp.py``)."""
    sys.path.insert(0, REPO)
    from paddle_megatronbert.convert.paddlenlp import to_paddlenlp_names

    out = to_paddlenlp_names(state)
    out["cls.predictions.decoder_weight"] = state[WORD_EMBEDDINGS]
    return out


def to_hf_state(state, model_config):
    """Our state -> HF's ``MegatronBertForPreTraining`` (numpy) through the package's one HF table
    (``convert/hf.py::to_hf_tensors``: 2-D Linear weights to torch's ``[out, in]``); the tied decoder is the word
    embeddings and its bias ``cls.predictions.bias``."""
    sys.path.insert(0, REPO)
    from paddle_megatronbert.configuration import MegatronBertConfig
    from paddle_megatronbert.convert.hf import to_hf_tensors

    config = MegatronBertConfig(**model_config)
    out = {}
    for name, value in state.items():
        out.update(to_hf_tensors(name, value, config))
    out["cls.predictions.decoder.weight"] = state[WORD_EMBEDDINGS]
    out["cls.predictions.decoder.bias"] = state["cls.predictions.bias"]
    return out


def _load_paddle_state(model, state, source):
    """``set_state_dict`` that fails on any parameter left out (Paddle's only warns)."""
    own = model.state_dict()
    missing = [k for k, v in own.items() if k not in state and not k.endswith("position_ids")]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise KeyError(f"{source} does not match {type(model).__name__}: missing {missing[:8]}, "
                       f"unexpected {unexpected[:8]}")
    model.set_state_dict({k: v for k, v in state.items()})


# ---- workers --------------------------------------------------------------------------------------
def peak_memory_mb(device):
    import resource

    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    if device == "gpu":
        out["gpu_max_allocated_mb"] = _gpu_max_allocated() / 2**20
    return out


_GPU_MAX_ALLOCATED = None


def _gpu_max_allocated():
    return _GPU_MAX_ALLOCATED() if _GPU_MAX_ALLOCATED else 0


def _paddle_setup(spec):
    global _GPU_MAX_ALLOCATED
    import paddle

    paddle.set_device("gpu" if spec["device"] == "gpu" else "cpu")
    if spec["device"] == "gpu":
        _GPU_MAX_ALLOCATED = paddle.device.cuda.max_memory_allocated
    paddle.seed(spec["seed"])
    return paddle


def _paddle_amp(paddle, spec):
    import contextlib

    if spec["amp"] == "none":
        return contextlib.nullcontext()
    return paddle.amp.auto_cast(enable=True, dtype="bfloat16" if spec["amp"] == "bf16" else "float16")


def _torch_setup(spec):
    global _GPU_MAX_ALLOCATED
    import torch

    torch.manual_seed(spec["seed"])
    torch.set_num_threads(spec["threads"])
    device = "cuda" if spec["device"] == "gpu" else "cpu"
    if device == "cuda":
        _GPU_MAX_ALLOCATED = torch.cuda.max_memory_allocated
    return torch, device


def _torch_amp(torch, device, dtype_name):
    import contextlib

    if dtype_name == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device, dtype=torch.bfloat16 if dtype_name == "bf16" else torch.float16)


def build_train_step(name, spec):
    """Build one contestant: returns ``(step, info)``. ``step()`` runs one training step and returns its
    loss (a float: the host sync is timed). ``info["parity_loss"]`` is the loss of the first batch in eval
    mode (dropout off, no gradients) before any step, with the shared weights when ``spec["state_path"]``
    names them: the proof that every contestant computes the same function."""
    config, batch = spec["model_config"], make_pretraining_batch(spec["model_config"], spec["batch_size"],
                                                                spec["seq_len"], spec["masked"], spec["seed"])
    state = load_shared_state(spec["state_path"]) if spec.get("state_path") else None
    if name in ("ours-fast", "ours-plain", "ours-baseline"):
        paddle = _paddle_setup(spec)
        sys.path.insert(0, spec["baseline_tree"] if name == "ours-baseline" else REPO)
        from paddle_megatronbert import MegatronBertConfig, MegatronBertForPreTraining

        model = MegatronBertForPreTraining(MegatronBertConfig(**config, use_fast_kernels=name != "ours-plain"))
        if state is not None:
            model.load_full_state_dict(state, source=spec["state_path"])
        opt = paddle.optimizer.AdamW(1e-4, parameters=model.parameters())
        inputs = {k: paddle.to_tensor(v) for k, v in batch.items()}

        def loss_of_batch():
            with _paddle_amp(paddle, spec):
                return model(inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"],
                             labels=inputs["mlm_labels"], next_sentence_label=inputs["nsp_labels"],
                             masked_lm_positions=inputs["masked_positions"], return_dict=True).loss

        no_grad, clear_grad = paddle.no_grad, opt.clear_grad

    elif name in ("paddlenlp", "paddlenlp-tuned"):
        paddle = _paddle_setup(spec)
        import numpy as np
        import paddle.nn.functional as F
        from paddlenlp.transformers import MegatronBertConfig, MegatronBertForPreTraining

        if name == "paddlenlp-tuned":
            sys.path.insert(0, REPO)
            from paddle_megatronbert import ops

            ops.apply_cpu_process_settings()  # our fast path's process settings; PaddleNLP never calls our ops
        model = MegatronBertForPreTraining(MegatronBertConfig(**config))
        if state is not None:
            _load_paddle_state(model, to_paddlenlp_state(state), spec["state_path"])
        opt = paddle.optimizer.AdamW(1e-4, parameters=model.parameters())
        inputs = {k: paddle.to_tensor(v) for k, v in batch.items()}
        b, s = spec["batch_size"], spec["seq_len"]
        flat_positions = paddle.to_tensor((batch["masked_positions"] + np.arange(b)[:, None] * s).reshape(-1))

        def loss_of_batch():
            # As PaddleNLP's BERT pretraining example does: logits over every position, then the masked rows.
            # No attention_mask: PaddleNLP builds it from the [PAD] ids (a 2-D 0/1 mask would not be converted).
            with _paddle_amp(paddle, spec):
                scores, nsp = model(inputs["input_ids"], token_type_ids=inputs["token_type_ids"])
                rows = paddle.gather(scores.reshape([-1, scores.shape[-1]]), flat_positions)
                mlm = F.cross_entropy(rows.astype("float32"), inputs["mlm_labels"].reshape([-1, 1]))
                return mlm + F.cross_entropy(nsp.astype("float32"), inputs["nsp_labels"].reshape([-1, 1]))

        no_grad, clear_grad = paddle.no_grad, opt.clear_grad

    elif name in ("torch", "torch-bf16", "torch-masked"):
        torch, device = _torch_setup(spec)
        import torch.nn.functional as TF
        from transformers import MegatronBertConfig, MegatronBertForPreTraining

        model = MegatronBertForPreTraining(MegatronBertConfig(**config))
        if state is not None:
            hf_state = to_hf_state(state, config)
            model.load_state_dict({k: torch.from_numpy(v) for k, v in hf_state.items()}, strict=True)
        model = model.to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        inputs = {k: torch.from_numpy(v).to(device) for k, v in batch.items()}
        amp = "bf16" if name == "torch-bf16" else spec["amp"]
        rows_index = torch.arange(spec["batch_size"], device=device).unsqueeze(-1)

        def loss_of_batch():
            with _torch_amp(torch, device, amp):
                if name == "torch-masked":
                    seq_out, pooled = model.bert(inputs["input_ids"], inputs["attention_mask"],
                                                 inputs["token_type_ids"])[:2]
                    rows = seq_out[rows_index, inputs["masked_positions"]]
                    scores, nsp = model.cls(rows, pooled)
                    return TF.cross_entropy(scores.float().flatten(0, 1), inputs["mlm_labels"].flatten()) + \
                        TF.cross_entropy(nsp.float(), inputs["nsp_labels"])
                return model(inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"],
                             labels=inputs["full_labels"], next_sentence_label=inputs["nsp_labels"]).loss

        no_grad, clear_grad = torch.no_grad, opt.zero_grad

    else:
        raise ValueError(f"unknown contestant {name!r}; choose from {TRAIN_MODELS}")
    del state  # the model holds its own copy now

    model.eval()
    with no_grad():
        parity_loss = float(loss_of_batch())
    model.train()

    def step():
        loss = loss_of_batch()
        loss.backward()
        opt.step()
        clear_grad()
        return float(loss.detach())

    return step, {"parity_loss": parity_loss}


def run_worker(name, spec, build):
    """Serve ``step`` requests on stdin; answer each with one JSON line on stdout."""
    built = build(name, spec)  # a step, or (step, info): info goes back in the "ready" line
    step, info = built if isinstance(built, tuple) else (built, {})
    reply = sys.stdout
    sys.stdout = sys.stderr  # library prints must not corrupt the protocol
    print(json.dumps({"ready": True, **info}), file=reply, flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "step":
            start = time.perf_counter()
            loss = step()
            print(json.dumps({"time": time.perf_counter() - start, "loss": loss}), file=reply, flush=True)
        elif command == "stats":
            print(json.dumps(peak_memory_mb(spec["device"])), file=reply, flush=True)
        elif command == "quit":
            return
        else:
            raise ValueError(f"unknown command {command!r}")


class Worker:
    """One contestant in its own process (own flags, own thread pool, own peak memory)."""

    def __init__(self, script, name, spec, threads):
        tree = spec["baseline_tree"] if name == "ours-baseline" else REPO
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=tree + os.pathsep +
                   os.environ.get("PYTHONPATH", ""))
        self.name = name
        self.proc = subprocess.Popen([sys.executable, script, "--worker", name, "--spec", json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.ready = self._read()  # {"ready": true, ...what the builder reported}

    def _read(self):
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.name} died (its stderr is above)")
        return json.loads(line)

    def request(self, command):
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self):
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        self.proc.wait(timeout=60)


def time_interleaved(script, names, spec, warmup, steps, gap_s, threads, check_ready=None):
    """Median step time per contestant, measured round-robin; warm-up excluded.

    ``check_ready``, when given, is called with ``{name: ready line}`` of every worker once all are built,
    before any step: it may raise to stop the run (the workers are closed)."""
    workers = []
    try:
        for name in names:  # one at a time: building a model is not timed, but it loads the CPU
            workers.append(Worker(script, name, spec, threads))
        if check_ready is not None:
            check_ready({w.name: w.ready for w in workers})
        for worker in workers:
            for _ in range(warmup):
                worker.request("step")
        times = {w.name: [] for w in workers}
        losses = {w.name: [] for w in workers}
        for round_index in range(steps):
            shift = round_index % len(workers)
            for worker in workers[shift:] + workers[:shift]:
                # Idle OpenMP threads of the previous worker spin for a while after its step: let them sleep.
                time.sleep(gap_s)
                answer = worker.request("step")
                times[worker.name].append(answer["time"])
                losses[worker.name].append(answer["loss"])
        memory = {w.name: w.request("stats") for w in workers}
    finally:
        for worker in workers:
            worker.close()
    return times, losses, memory


def machine_description(device):
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return {"cpu": cpu, "cores": os.cpu_count(), "device": device, "load_avg_1min": round(load, 2)}


def summarize(times, losses, memory, flops, tokens, reference="ours-fast", parity_losses=None):
    results = {}
    for name, values in times.items():
        median = statistics.median(values)
        results[name] = {
            "median_s": round(median, 4),
            "min_s": round(min(values), 4),
            "tokens_per_s": round(tokens / median, 1),
            "tflops": round(flops[name] / median / 1e12, 4),
            "first_loss": round(losses[name][0], 4),
            **{k: round(v, 1) for k, v in memory[name].items()},
        }
        if parity_losses and name in parity_losses:
            results[name]["parity_loss"] = round(parity_losses[name], 6)
    # Ratios of medians (the headline) and of minima: on a shared machine a step that lost its cores to
    # another process's work inflates the median; the minimum is the least disturbed step of each.
    ratios = {}
    if reference in results:
        for name, row in results.items():
            if name != reference:
                ratios[f"{name}/{reference}"] = round(row["median_s"] / results[reference]["median_s"], 3)
                ratios[f"{name}/{reference} (min)"] = round(row["min_s"] / results[reference]["min_s"], 3)
    return results, ratios


def print_table(title, results, ratios):
    print(title)
    with_parity = any("parity_loss" in row for row in results.values())
    with_loss = any("first_loss" in row for row in results.values())
    header = f"{'model':<15} {'median s':>9} {'min s':>8} {'tokens/s':>9} {'TFLOP/s':>8} {'peak RSS MB':>11}"
    header += f" {'parity loss':>11}" if with_parity else ""
    header += f" {'1st step loss':>13}" if with_loss else ""
    print(header)
    print("-" * len(header))
    for name, row in results.items():
        line = (f"{name:<15} {row['median_s']:>9.4f} {row['min_s']:>8.4f} {row['tokens_per_s']:>9.1f} "
                f"{row['tflops']:>8.4f} {row['peak_rss_mb']:>11.0f}")
        line += f" {row.get('parity_loss', float('nan')):>11.5f}" if with_parity else ""
        print(line + (f" {row['first_loss']:>13.3f}" if with_loss else ""))
    if with_parity:
        print("parity loss: the first batch in eval mode (dropout off) with the shared weights, before any step; "
              "1st step loss: the first timed step (train mode, dropout 0.1, after warm-up)")
    for key, value in ratios.items():
        if not key.endswith("(min)"):
            other, reference = key.split("/")
            print(f"speed-up of {reference} over {other}: {value:.2f}x (medians), "
                  f"{ratios[key + ' (min)']:.2f}x (minima)")


def make_parser(models=TRAIN_MODELS, default_models=DEFAULT_TRAIN_MODELS, seq_len=128, doc=__doc__, train=True):
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="base")
    parser.add_argument("--seq_len", type=int, default=seq_len)
    if train:
        parser.add_argument("--batch_size", type=int, default=8)
        parser.add_argument("--masked", type=int, default=20, help="masked positions per sequence")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none",
                        help="mixed precision for every contestant (Paddle's CPU auto_cast runs fp32 silently)")
    parser.add_argument("--fast", action=argparse.BooleanOptionalAction, default=None,
                        help="--fast: only ours with fast paths; --no-fast: only ours without; default both")
    parser.add_argument("--models", default=",".join(default_models),
                        help=f"comma-separated contestants out of {','.join(models)}")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per contestant (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", os.cpu_count())))
    parser.add_argument("--gap", type=float, default=0.3, help="seconds between two timed steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baseline_tree", help="checkout whose paddle_megatronbert the ours-baseline contestant "
                        "imports (before vs after a change, in one run)")
    if train:
        parser.add_argument("--profile", choices=("ours-fast", "ours-plain", "paddlenlp"),
                            help="instead of timing, profile one step of this contestant (in this process)")
        parser.add_argument("--ops", action="store_true",
                            help="instead of timing steps, time each fast-path op against its plain version")
    parser.add_argument("--write_state", help=argparse.SUPPRESS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    return parser


def parse_args(argv=None, parser=None, models=TRAIN_MODELS):
    parser = parser or make_parser()
    args = parser.parse_args(argv)
    names = [n for n in args.models.split(",") if n]
    unknown = [n for n in names if n not in models]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {','.join(models)}")
    if args.fast is True:
        names = [n for n in names if n != "ours-plain"]
    elif args.fast is False:
        names = [n for n in names if n != "ours-fast"]
    if "ours-baseline" in names and not getattr(args, "baseline_tree", None):
        parser.error("the ours-baseline contestant needs --baseline_tree DIR (a checkout of the code to compare)")
    args.names = names
    return args


def profile_step(name, spec, top=15):
    """Where one step of a Paddle contestant spends its time: Paddle's profiler over one step after a
    warm-up, operators grouped by name; GEMMs (matmul and its gradient) summed as a share of the step."""
    import collections
    import re
    import tempfile

    import paddle.profiler as profiler

    step, _ = build_train_step(name, spec)
    step()
    with tempfile.TemporaryDirectory() as trace_dir:
        prof = profiler.Profiler(targets=[profiler.ProfilerTarget.CPU],
                                 on_trace_ready=profiler.export_chrome_tracing(trace_dir))
        prof.start()
        start = time.perf_counter()
        step()
        wall = time.perf_counter() - start
        prof.step()
        prof.stop()
        events = []
        for file_name in os.listdir(trace_dir):
            with open(os.path.join(trace_dir, file_name)) as f:
                events += json.load(f)["traceEvents"]
    per_op = collections.Counter()
    for event in events:
        if event.get("cat") == "Operator":  # top-level ops and grad nodes (kernels nest inside them)
            per_op[re.sub(r"\[.*$", "", event["name"]).strip()] += event["dur"] / 1e6
    gemm = sum(t for op, t in per_op.items() if "matmul" in op.lower() or op.lower().startswith("linear"))
    print(f"profile of {name}: step {wall:.3f} s (under the profiler), operators {sum(per_op.values()):.3f} s, "
          f"GEMM {gemm:.3f} s = {100 * gemm / wall:.0f}% of the step")
    for op, seconds in per_op.most_common(top):
        print(f"  {op:<55} {seconds * 1e3:9.1f} ms  {100 * seconds / wall:5.1f}%")
    print(json.dumps({"profile": name, "step_s": round(wall, 4), "gemm_s": round(gemm, 4),
                      "gemm_share": round(gemm / wall, 3),
                      "top_ops_ms": {op: round(t * 1e3, 1) for op, t in per_op.most_common(top)}}))


def time_ops(config, batch, seq, repeats=10):
    """Forward + backward of each op the fast paths replace, fast vs plain, at this config's shapes, in
    one process. The process settings (allocator, MKL path) are applied first and kept for both, so the
    table isolates the kernels; the stride flag follows the switch."""
    import numpy as np
    import paddle

    sys.path.insert(0, REPO)
    from paddle_megatronbert import ops
    from paddle_megatronbert.parallel import ColumnParallelLinear, RowParallelLinear

    ops.use_fast_kernels(True)
    ops.apply_cpu_process_settings()  # before the first GEMM, for both columns
    h, f, heads = config["hidden_size"], config["intermediate_size"], config["num_attention_heads"]

    def leaf(*shape):
        t = paddle.randn(list(shape))
        t.stop_gradient = False
        return t

    x, x4h, residual = leaf(batch, seq, h), leaf(batch, seq, f), leaf(batch, seq, h)
    q, k, v = (leaf(batch, heads, seq, h // heads) for _ in range(3))
    mask = paddle.zeros([batch, 1, 1, seq])
    ln_w, ln_b = leaf(h), leaf(h)
    to_4h, from_4h, proj = ColumnParallelLinear(h, f), RowParallelLinear(f, h), ColumnParallelLinear(h, h)
    cases = {
        "layer_norm": lambda: ops.layer_norm(x, ln_w, ln_b, 1e-5),
        "linear + bias + gelu (h->4h)": lambda: ops.linear_activation(to_4h, x, "gelu"),
        "linear + bias + dropout + residual (4h->h)": lambda: ops.linear_dropout_add(from_4h, x4h, residual, 0.1, True),
        "linear + bias + head split (h->h)": lambda: ops.linear_split_heads(proj, x, heads),
        "attention core (mask, softmax, dropout)": lambda: ops.attention(q, k, v, mask, 0.1, True),
        "head merge": lambda: ops.merge_heads(q),
    }
    print(f"fwd + bwd per op, ms (median of {repeats}), batch {batch} x seq {seq}, hidden {h}, "
          f"{os.environ.get('OMP_NUM_THREADS')} threads")
    print(f"{'op':<45} {'plain':>9} {'fast':>9}")
    table = {}
    for name, fn in cases.items():
        row = []
        for fast in (False, True):
            ops.use_fast_kernels(fast)
            run = lambda: fn().sum().backward()  # noqa: E731
            run()
            samples = []
            for _ in range(repeats):
                start = time.perf_counter()
                run()
                samples.append(time.perf_counter() - start)
            row.append(float(np.median(samples)) * 1e3)
        table[name] = {"plain_ms": round(row[0], 2), "fast_ms": round(row[1], 2)}
        print(f"{name:<45} {row[0]:>9.2f} {row[1]:>9.2f}")
    print(json.dumps({"ops": table}))


def make_shared_state(spec, directory, threads):
    """Write the one set of random weights every contestant loads (in a child process, so this driver
    never imports Paddle nor holds the weights); returns the .npz path."""
    path = os.path.join(directory, "shared_state.npz")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=REPO + os.pathsep +
               os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, os.path.abspath(__file__), "--write_state", path, "--spec", json.dumps(spec)],
                   check=True, env=env, stdout=sys.stderr)
    return path


def fp32_contestants(names, amp):
    return [n for n in names if amp == "none" and n != "torch-bf16"]


def parity_summary(parity_losses, amp):
    reference = next((n for n in ("ours-fast", "ours-plain") if n in parity_losses), None)
    fp32 = [n for n in fp32_contestants(parity_losses, amp) if reference]
    return {"losses": {n: round(v, 6) for n, v in parity_losses.items()}, "reference": reference,
            "tolerance": PARITY_TOLERANCE, "checked": fp32,
            "max_abs_diff": max((round(abs(parity_losses[n] - parity_losses[reference]), 7) for n in fp32),
                                default=None)}


def check_parity(parity_losses, amp):
    """Print each contestant's eval-mode loss of the first batch; exit non-zero when an fp32 contestant
    differs from ours by more than ``PARITY_TOLERANCE`` (then they would not do the same computation)."""
    reference = next((n for n in ("ours-fast", "ours-plain") if n in parity_losses), None)
    print("parity losses (first batch, eval mode, shared weights): " +
          ", ".join(f"{n} {v:.5f}" for n, v in parity_losses.items()), flush=True)
    if reference is None:
        return
    bad = {n: parity_losses[n] for n in fp32_contestants(parity_losses, amp)
           if abs(parity_losses[n] - parity_losses[reference]) > PARITY_TOLERANCE}
    if bad:
        raise SystemExit(f"parity check failed: {bad} differ from {reference}'s {parity_losses[reference]:.5f} "
                         f"by more than {PARITY_TOLERANCE} (the contestants do not compute the same function)")


def main(argv=None):
    args = parse_args(argv)
    if args.write_state:
        return write_shared_state(json.loads(args.spec), args.write_state)
    if args.worker:
        return run_worker(args.worker, json.loads(args.spec), build_train_step)
    if args.profile:
        os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
        spec = dict(model_config={**CONFIGS[args.config], **COMMON}, batch_size=args.batch_size,
                    seq_len=args.seq_len, masked=args.masked, device=args.device, amp=args.amp, seed=args.seed,
                    threads=args.threads)
        return profile_step(args.profile, spec)
    if args.ops:
        os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
        return time_ops({**CONFIGS[args.config], **COMMON}, args.batch_size, args.seq_len)
    config = {**CONFIGS[args.config], **COMMON}
    spec = dict(model_config=config, batch_size=args.batch_size, seq_len=args.seq_len, masked=args.masked,
                device=args.device, amp=args.amp, seed=args.seed, threads=args.threads,
                baseline_tree=os.path.abspath(args.baseline_tree) if args.baseline_tree else None)
    parity_losses = {}
    with tempfile.TemporaryDirectory(prefix="bench_train_") as state_dir:
        spec["state_path"] = make_shared_state(spec, state_dir, args.threads)

        def check_ready(ready):
            parity_losses.update({name: line["parity_loss"] for name, line in ready.items()})
            check_parity(parity_losses, spec["amp"])

        times, losses, memory = time_interleaved(os.path.abspath(__file__), args.names, spec, args.warmup,
                                                 args.steps, args.gap, args.threads, check_ready)
    masked_rows = args.batch_size * args.masked
    full_rows = args.batch_size * args.seq_len
    lm_rows = {n: full_rows if n in ("paddlenlp", "paddlenlp-tuned", "torch", "torch-bf16") else masked_rows
               for n in args.names}
    flops = {n: pretraining_flops(config, args.batch_size, args.seq_len, lm_rows[n]) for n in args.names}
    reference = "ours-fast" if "ours-fast" in times else "ours-plain"
    results, ratios = summarize(times, losses, memory, flops, args.batch_size * args.seq_len, reference,
                                parity_losses)
    print_table(f"training step, {args.config}, batch {args.batch_size} x seq {args.seq_len}, {args.masked} masked "
                f"per sequence, {args.threads} threads, {args.device}, amp {args.amp}, median of {args.steps}",
                results, ratios)
    print(json.dumps({"bench": "train", "config": args.config, "batch_size": args.batch_size,
                      "seq_len": args.seq_len, "masked": args.masked, "amp": args.amp, "steps": args.steps,
                      "machine": machine_description(args.device), "results": results, "ratios": ratios,
                      "parity": parity_summary(parity_losses, spec["amp"])}))


if __name__ == "__main__":
    main()
