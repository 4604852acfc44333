#!/usr/bin/env bash
# The README's first command: set up .venv (pinned CPU set + this package), then run the demo
# (shards -> tiny pretraining -> plot -> SQuAD-format fine-tuning -> metrics). Extra arguments go to the demo,
# e.g. `bash scripts/quickstart.sh --model_name_or_path megatronbert-cased --device gpu` on a GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python scripts/demo.py "$@"
