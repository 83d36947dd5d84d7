#!/usr/bin/env bash
# Every GPU figure of docs/BENCHMARKS.md still to measure, in one command (the logic is bench/suite.py):
#   bash bench/gpu_suite.sh --out DIR [--model /root/stash/model.gguf] [--budget part=seconds] [--parts a,b]
#   bash bench/gpu_suite.sh --cpu-smoke --out DIR     # every part's code path on CPU, tiny shapes, first
# Interpreter: $PYTHON, else the active virtualenv's, else ./.venv's, else python3 (a bare GPU machine, with the
# project's wheels under /tmp/site: export PYTHONPATH=/tmp/site:$PWD first, as docs/BENCHMARKS.md shows).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -n "${PYTHON:-}" ]]; then
  PY=$PYTHON
elif [[ -n "${VIRTUAL_ENV:-}" ]]; then
  PY=$VIRTUAL_ENV/bin/python
elif [[ -x "$ROOT/.venv/bin/python" ]]; then
  PY=$ROOT/.venv/bin/python
else
  PY=python3
fi
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m bench.suite "$@"
