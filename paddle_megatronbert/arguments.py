"""The command-line flags of the three runners: one definition, one meaning, one set of spellings.

Every flag a runner shares with another is defined here once (:func:`add_training_arguments`), with the
same help and default everywhere except the few task defaults listed in :data:`TASK_DEFAULTS` (the seeds'
batch sizes and learning rates). The old and foreign spellings users bring are accepted too:

- PaddleNLP's: ``--use_amp [true] --amp_dtype float16|bfloat16`` (= ``--amp fp16|bf16``), ``--n_gpu``,
  ``--model_type bert`` (ignored with a note), and its BERT model names (``bert-base-uncased`` ...), taken as
  their MegatronBERT counterparts' configs with a one-line note (:data:`BERT_NAME_COUNTERPARTS`);
- Megatron-LM's: ``--lr``, ``--clip-grad``, ``--warmup``, ``--fp16``, ``--train-iters``, ``--save-interval``,
  ``--micro-batch-size``, ``--exit-interval`` ... are aliases of the equivalent flag; the ones without an
  equivalent here (``--num-layers``, ``--hidden-size``, ``--global-batch-size`` ...) are answered in one line
  with what to use instead (:data:`MEGATRON_EQUIVALENTS`).

``--max_steps`` overrides ``--num_train_epochs`` (as in PaddleNLP's Trainer and HF), and epochs round up
(:func:`total_optimizer_steps`) in every runner. Abbreviated flags are refused (``allow_abbrev=False``): with
Megatron's ``--warmup`` beside ``--warmup_steps``/``--warmup_proportion`` a prefix would be ambiguous.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import List, Optional, Sequence

from .training import AMP_CHOICES

AMP_DTYPE_TO_AMP = {"float16": "fp16", "bfloat16": "bf16"}
MEGATRONBERT_MODEL_TYPES = ("megatronbert", "megatron-bert", "megatron_bert")

# PaddleNLP's BERT names -> the MegatronBERT with the same WordPiece vocabulary (the model itself is
# MegatronBERT's 345M architecture, not BERT-base/large: the note says so).
BERT_NAME_COUNTERPARTS = {
    "bert-base-uncased": "megatronbert-uncased",
    "bert-large-uncased": "megatronbert-uncased",
    "bert-base-cased": "megatronbert-cased",
    "bert-large-cased": "megatronbert-cased",
}

# Flags whose default is a property of the task (the seeds' own values); every other shared flag has one
# default in all runners. {flag: {runner: default}}, checked by tests/test_arguments.py.
TASK_DEFAULTS = {
    "model_name_or_path": {"pretrain": None, "squad": "megatronbert-cased", "glue": "megatronbert-cased"},
    "output_dir": {"pretrain": None, "squad": "output", "glue": "output"},
    "batch_size": {"pretrain": 8, "squad": 8, "glue": 16},
    "learning_rate": {"pretrain": 1e-4, "squad": 1e-5, "glue": 1e-5},
    "adam_epsilon": {"pretrain": 1e-6, "squad": 1e-8, "glue": 1e-6},
    "warmup_proportion": {"pretrain": 0.01, "squad": 0.06, "glue": 0.06},
    "num_train_epochs": {"pretrain": 3, "squad": 2, "glue": 2},
    "save_steps": {"pretrain": 5000, "squad": 5000, "glue": 10000},
    # fine-tuning keeps its result in best_model/: its checkpoints are only for resuming, the newest suffices
    "save_total_limit": {"pretrain": None, "squad": 1, "glue": 1},
}

# Megatron-LM flags with no flag of the same meaning here: the one line that says what to do instead.
MEGATRON_EQUIVALENTS = {
    "--num-layers": "the model comes from a config: num_hidden_layers in --config_file "
                    "(e.g. configs/megatronbert-345m.json)",
    "--hidden-size": "the model comes from a config: hidden_size in --config_file"
                     " (e.g. configs/megatronbert-345m.json)",
    "--ffn-hidden-size": "the model comes from a config: intermediate_size in --config_file",
    "--num-attention-heads": "the model comes from a config: num_attention_heads in --config_file",
    "--max-position-embeddings": "the model comes from a config: max_position_embeddings in --config_file",
    "--seq-length": "pretraining reads the sequence length from the shards (tools/create_pretraining_data.py "
                    "--max_seq_length); fine-tuning takes --max_seq_length",
    "--global-batch-size": "the global batch is --batch_size x --gradient_accumulation_steps x data-parallel ranks: "
                           "set --gradient_accumulation_steps",
    "--load": "a run resumes from the newest checkpoint in --output_dir by itself (or --resume DIR); "
              "--model_name_or_path DIR starts from a model's weights",
    "--data-path": "pretraining takes --input_dir (a directory of HDF5 shards from tools/create_pretraining_data.py)",
    "--vocab-file": "pretraining takes --tokenizer_name_or_path; fine-tuning uses the model directory's vocab.txt",
    "--lr-decay-iters": "the learning rate decays linearly to 0 at --max_steps",
    "--lr-decay-style": "the schedule is linear warm-up then linear decay (PaddleNLP's LinearDecayWithWarmup)",
    "--min-lr": "the learning rate decays linearly to 0 at --max_steps",
    "--eval-interval": "fine-tuning evaluates every --save_steps; pretraining has no evaluation",
    "--eval-iters": "fine-tuning evaluates the whole --predict_file / dev split",
    "--split": "pretraining uses every shard in --input_dir for training",
    "--tokenizer-type": "the tokenizer is always BERT's WordPiece (MegatronBertTokenizer)",
    "--tensor-model-parallel-size": "use --tensor_parallel_degree",
    "--pipeline-model-parallel-size": "pipeline parallelism is not supported (use --tensor_parallel_degree)",
    "--use-distributed-optimizer": "use --sharding_degree N (ZeRO-1: the optimizer state split over N ranks)",
    "--hysteresis": "the fp16 loss scale halves after 2 overflows in a row (Megatron-LM's default hysteresis)",
    "--loss-scale": "use --scale_loss (the initial fp16 loss scale; the scale is always dynamic)",
}


def str_to_bool(value) -> bool:
    """``true/false, 1/0, yes/no, on/off`` (any case) as a bool, for ``--flag true`` spellings."""
    if isinstance(value, bool):
        return value
    lowered = str(value).strip().lower()
    if lowered in ("1", "true", "yes", "y", "on"):
        return True
    if lowered in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {value!r}")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every flag's default in ``--help``."""


class RunnerArgumentParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that answers a Megatron-LM flag without an equivalent here in one line.

    Args:
        runner: ``pretrain``, ``squad`` or ``glue``: which column of :data:`TASK_DEFAULTS` applies.
        **kwargs: passed to ``argparse.ArgumentParser`` (``allow_abbrev`` is always False).
    """

    def __init__(self, runner: str, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(allow_abbrev=False, **kwargs)
        self.runner = runner

    def parse_args(self, args: Optional[Sequence[str]] = None, namespace=None):
        argv = list(sys.argv[1:] if args is None else args)
        for token in argv:
            flag = token.split("=", 1)[0]
            if flag in MEGATRON_EQUIVALENTS and flag not in self._option_string_actions:
                self.error(f"{flag} is Megatron-LM's flag; here {MEGATRON_EQUIVALENTS[flag]}")
        return super().parse_args(argv, namespace)


def _default(runner: str, name: str, fallback=None):
    return TASK_DEFAULTS.get(name, {}).get(runner, fallback)


def add_training_arguments(parser: RunnerArgumentParser) -> None:
    """Every flag the runners share: model, optimisation, schedule, precision, logging, checkpoints, device,
    parallelism (:func:`distributed.add_parallel_arguments`), with their Megatron-LM spellings as aliases."""
    runner = parser.runner
    model = parser.add_argument_group("model")
    model.add_argument("--model_name_or_path", default=_default(runner, "model_name_or_path"),
                       help="registered name (megatronbert-uncased / megatronbert-cased; PaddleNLP's bert-*-uncased/"
                            "-cased names mean these) or a directory with config.json and weights (pretraining: None "
                            "means --config_file, else megatronbert-uncased)")
    model.add_argument("--model_type", default=None,
                       help="accepted for PaddleNLP's command lines and ignored: the model is always MegatronBERT")
    model.add_argument("--hidden_dropout_prob", "--hidden-dropout", type=float, default=None,
                       help="override the config's hidden dropout (None: the config's)")
    model.add_argument("--attention_probs_dropout_prob", "--attention-dropout", type=float, default=None,
                       help="override the config's attention dropout (None: the config's)")
    model.add_argument("--recompute", "--recompute-activations", action="store_true",
                       help="recompute each layer's activations in the backward pass (less memory, ~1/3 more compute)")

    train = parser.add_argument_group("training")
    train.add_argument("--output_dir", "--save", default=_default(runner, "output_dir"),
                       required=_default(runner, "output_dir") is None,
                       help="checkpoints, metrics.jsonl, trainer_state.json and results go here")
    train.add_argument("--batch_size", "--micro-batch-size", type=int, default=_default(runner, "batch_size"),
                       help="examples per micro-batch per data-parallel rank")
    train.add_argument("--learning_rate", "--lr", type=float, default=_default(runner, "learning_rate"),
                       help="peak learning rate of AdamW")
    train.add_argument("--weight_decay", "--weight-decay", type=float, default=0.01,
                       help="AdamW decoupled weight decay (not on biases/LayerNorm)")
    train.add_argument("--adam_epsilon", "--adam-eps", type=float, default=_default(runner, "adam_epsilon"),
                       help="AdamW epsilon")
    train.add_argument("--adam_beta1", "--adam-beta1", type=float, default=0.9, help="AdamW beta1")
    train.add_argument("--adam_beta2", "--adam-beta2", type=float, default=0.999, help="AdamW beta2")
    train.add_argument("--max_grad_norm", "--clip-grad", type=float, default=1.0,
                       help="global-norm gradient clipping; <= 0 disables it")
    train.add_argument("--warmup_steps", "--lr-warmup-iters", type=int, default=0,
                       help="linear warm-up steps; > 0 overrides --warmup_proportion")
    train.add_argument("--warmup_proportion", "--warmup", "--lr-warmup-fraction", type=float,
                       default=_default(runner, "warmup_proportion"), help="linear warm-up as a fraction of the steps")
    train.add_argument("--num_train_epochs", type=float, default=_default(runner, "num_train_epochs"),
                       help="passes over the training data (fractions allowed; rounded up to whole steps)")
    train.add_argument("--max_steps", "--train-iters", type=int, default=-1,
                       help="if > 0: optimizer steps of the run and of the LR schedule, overriding --num_train_epochs")
    train.add_argument("--gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    train.add_argument("--logging_steps", "--log-interval", type=int, default=100,
                       help="a log line and a metrics.jsonl record every N optimizer steps (and at the end)")
    train.add_argument("--save_steps", "--save-interval", type=int, default=_default(runner, "save_steps"),
                       help="checkpoint (fine-tuning: evaluate and keep the best) every N optimizer steps and at "
                            "the end")
    train.add_argument("--save_total_limit", type=int, default=_default(runner, "save_total_limit"),
                       help="keep only the newest N checkpoints (None: all)")
    train.add_argument("--seed", type=int, default=42, help="seed of the weights, dropout and data order")
    train.add_argument("--resume", nargs="?", const="auto", default="auto",
                       help="a checkpoint directory, or 'auto': the newest in --output_dir if any")
    train.add_argument("--overwrite_output_dir", action="store_true",
                       help="start from scratch even if --output_dir has checkpoints")
    train.add_argument("--exit_interval", "--exit-interval", type=int, default=None,
                       help="checkpoint and exit once the step is a multiple of N")
    train.add_argument("--exit_duration_in_mins", "--exit-duration-in-mins", type=float, default=None,
                       help="checkpoint and exit after this many minutes (a scheduler's time limit)")
    train.add_argument("--visualdl", type=str_to_bool, default=None,
                       help="VisualDL logs in OUTPUT_DIR/visualdl (None: when installed)")

    device = parser.add_argument_group("device and precision")
    device.add_argument("--device", default=None, choices=["cpu", "gpu", "xpu"],
                        help="None: gpu when this Paddle build has CUDA, else cpu")
    device.add_argument("--n_gpu", type=int, default=None,
                        help="PaddleNLP's flag: 0 means CPU, 1 one GPU (more: use paddle.distributed.launch)")
    device.add_argument("--amp", default="none", choices=AMP_CHOICES,
                        help="mixed precision: fp16 (dynamic loss scaling) or bf16; GPU only (fp32 on CPU, with a "
                             "note)")
    device.add_argument("--fp16", dest="amp", action="store_const", const="fp16", help="Megatron-LM's: --amp fp16")
    device.add_argument("--bf16", dest="amp", action="store_const", const="bf16", help="Megatron-LM's: --amp bf16")
    device.add_argument("--use_amp", type=str_to_bool, nargs="?", const=True, default=False,
                        help="PaddleNLP's spelling: --amp fp16 (or --amp_dtype's)")
    device.add_argument("--amp_dtype", default=None, choices=sorted(AMP_DTYPE_TO_AMP),
                        help="with --use_amp: float16 (= --amp fp16) or bfloat16 (= --amp bf16); None: float16")
    device.add_argument("--scale_loss", "--initial-loss-scale", type=float, default=2.0**15,
                        help="initial fp16 loss scale")
    from .distributed import add_parallel_arguments

    add_parallel_arguments(parser)


def add_finetune_arguments(parser: RunnerArgumentParser) -> None:
    """The flags both fine-tuning runners add to the shared ones."""
    group = parser.add_argument_group("fine-tuning")
    group.add_argument("--max_seq_length", "--seq-length", type=int, default=None,
                       help="longest input in tokens (SQuAD: split into windows); None: min(512, the model's "
                            "max_position_embeddings)")
    group.add_argument("--eval_batch_size", type=int, default=None, help="evaluation batch size (None: --batch_size)")
    group.add_argument("--no_progress", action="store_true", help="no progress bars")


def _is_main_process() -> bool:
    return int(os.environ.get("PADDLE_TRAINER_ID", "0")) == 0


def finish_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace,
                     extra_problems: Sequence[str] = ()) -> argparse.Namespace:
    """Resolve the aliases (``--use_amp``/``--amp_dtype`` -> ``--amp``, BERT names -> MegatronBERT names) and
    refuse, in one ``parser.error`` line before any work, every flag value no run can use."""
    from .training import training_argument_problems

    if args.use_amp and args.amp == "none":
        args.amp = AMP_DTYPE_TO_AMP[args.amp_dtype or "float16"]
    name = args.model_name_or_path
    if name in BERT_NAME_COUNTERPARTS and not os.path.exists(name):
        args.model_name_or_path = BERT_NAME_COUNTERPARTS[name]
        if _is_main_process():
            print(f"note: {name} is PaddleNLP's BERT name; using its MegatronBERT counterpart "
                  f"{args.model_name_or_path} (the same WordPiece vocab, MegatronBERT's 345M architecture)", flush=True)
    problems: List[str] = training_argument_problems(args) + list(extra_problems)
    from .distributed import sharding_stage_problem

    stage_problem = sharding_stage_problem(getattr(args, "sharding_stage", 1))
    if stage_problem:
        problems.append(f"--sharding_stage: {stage_problem}")
    if problems:
        parser.error("; ".join(problems))
    return args


def total_optimizer_steps(max_steps: int, num_train_epochs: float, steps_per_epoch: int) -> int:
    """Optimizer steps of a run: ``max_steps`` when > 0 (whatever the epochs), else the epochs rounded up to
    whole steps, as PaddleNLP's Trainer and HF's count them."""
    if max_steps > 0:
        return max_steps
    return max(1, int(math.ceil(num_train_epochs * steps_per_epoch)))


def resolve_max_seq_length(args: argparse.Namespace, config, is_main: bool = True) -> int:
    """``--max_seq_length``, or min(512, the model's positions) when it was not given (with a note when the
    model has fewer than 512)."""
    if args.max_seq_length is None:
        args.max_seq_length = min(512, config.max_position_embeddings)
        if is_main and args.max_seq_length < 512:
            print(f"note: --max_seq_length {args.max_seq_length}, the model's max_position_embeddings", flush=True)
    return args.max_seq_length


def config_overrides(args) -> dict:
    """The config fields a run's flags override: the dropouts when given, activation recompute."""
    overrides = {"recompute": bool(args.recompute)}
    for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    return overrides


def model_type_note(args) -> Optional[str]:
    """The one-line note for a ``--model_type`` other than MegatronBERT's, or None."""
    if args.model_type and args.model_type.lower() not in MEGATRONBERT_MODEL_TYPES:
        return f"note: --model_type {args.model_type} is ignored; the model is MegatronBERT ({args.model_name_or_path})"
    return None


