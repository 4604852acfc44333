#!/usr/bin/env bash
# Creates .venv with the pinned CPU set (requirements.txt), the test oracles (requirements-test.txt),
# and this package in editable mode. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -r requirements.txt -r requirements-test.txt
.venv/bin/python -m pip install -q --no-deps -e .
# megatron-core is a test oracle only (like torch and transformers). Its wheel declares Python >= 3.12 but runs
# on 3.11 with torch CPU and needs nothing else, so it goes in without its metadata checks.
.venv/bin/python -m pip install -q --no-deps --ignore-requires-python megatron-core==0.19.2
echo "environment ready: $(.venv/bin/python -c 'import paddle, paddlenlp; print("paddle", paddle.__version__, "paddlenlp", paddlenlp.__version__)' 2>/dev/null)"
