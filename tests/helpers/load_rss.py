"""Peak host memory of ``from_pretrained`` against the size of the ``model.safetensors`` it reads.

    python tests/helpers/load_rss.py --size 345m   # the 345M model (~1.3 GB file, random weights)
    python tests/helpers/load_rss.py --size small  # ~100 MB, what tests/test_checkpoint.py runs

Writes the file in one process, then loads it in a fresh one and prints one JSON line: file size, RSS
before loading, peak RSS during it (``VmHWM``), and the peak above the start. The loaded model's own
parameters are one copy (1.0x the file); anything above is what loading costs on top.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SIZES = {
    "345m": dict(vocab_size=30592, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                 intermediate_size=4096, max_position_embeddings=512),
    # the 345M model's shape of memory (no tensor above 4% of the file) at a twelfth of its size
    "small": dict(vocab_size=1024, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                  intermediate_size=2048, max_position_embeddings=512),
}


def _status_mb(field: str) -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def write(size: str, directory: str) -> None:
    """Random weights straight to safetensors (no model is built: building one would double the time)."""
    import numpy as np

    sys.path.insert(0, REPO)
    from paddle_megatronbert.checkpoint.weights import write_safetensors
    from paddle_megatronbert.configuration import MegatronBertConfig

    config = MegatronBertConfig(**SIZES[size])
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    shapes = {"bert.embeddings.word_embeddings.weight": (v, h), "bert.embeddings.position_embeddings.weight":
              (config.max_position_embeddings, h), "bert.embeddings.token_type_embeddings.weight": (2, h),
              "bert.encoder.ln.weight": (h,), "bert.encoder.ln.bias": (h,)}
    for n in range(config.num_hidden_layers):
        p = f"bert.encoder.layer.{n}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            shapes.update({p + name + ".weight": (h, h), p + name + ".bias": (h,)})
        shapes.update({p + "intermediate.dense.weight": (h, i), p + "intermediate.dense.bias": (i,),
                       p + "output.dense.weight": (i, h), p + "output.dense.bias": (h,)})
        for ln in ("attention.ln", "ln"):
            shapes.update({p + ln + ".weight": (h,), p + ln + ".bias": (h,)})
    rng = np.random.default_rng(0)
    state = {name: rng.standard_normal(shape, dtype=np.float32) * 0.02 for name, shape in shapes.items()}
    config.save_pretrained(directory)
    write_safetensors(state, os.path.join(directory, "model.safetensors"))


def load(directory: str) -> dict:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import paddle  # noqa: F401  (imported before the baseline: its own footprint is not loading's)

    sys.path.insert(0, REPO)
    from paddle_megatronbert import MegatronBertModel

    before = _status_mb("VmRSS")
    MegatronBertModel.from_pretrained(directory)
    peak = _status_mb("VmHWM")
    file_mb = os.path.getsize(os.path.join(directory, "model.safetensors")) / 2**20
    return {"file_mb": round(file_mb, 1), "rss_before_mb": round(before, 1), "peak_mb": round(peak, 1),
            "peak_extra_mb": round(peak - before, 1), "peak_extra_over_file": round((peak - before) / file_mb, 2)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="345m")
    parser.add_argument("--dir", required=True, help="where the model directory is written")
    parser.add_argument("--load_only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    directory = os.path.join(args.dir, f"megatronbert-{args.size}")
    if args.load_only:
        print(json.dumps(load(directory)))
        return 0
    os.makedirs(directory, exist_ok=True)
    write(args.size, directory)
    # A fresh process: the writer's arrays are not in the measured peak.
    return subprocess.call([sys.executable, os.path.abspath(__file__), "--size", args.size, "--dir", args.dir,
                            "--load_only"])


if __name__ == "__main__":
    sys.exit(main())
