#!/usr/bin/env bash
# N lima_jax training processes on this machine, joined by jax.distributed at 127.0.0.1: a multi-host run
# in miniature (tests/test_multihost.py runs the toy recipe through it), or one process a GPU group.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail

PROG=local.sh
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/local.sh [OPTIONS] N -- TRAIN FLAGS...

Starts N processes of `python -m lima_jax.train TRAIN FLAGS --coordinator_address=127.0.0.1:PORT
--num_processes=N --process_id=I` (no distributed flags when N is 1), the output of process I in
LOGS/process-I.log, and waits for all of them. Exit status: 0 when all exit 0, else the first non-zero
status to come; after the first failure the others get --grace seconds to end (they usually fail at their
next barrier) before they are sent SIGTERM.

Options:
  --platform cpu|gpu       cpu (default): JAX_PLATFORMS=cpu, gloo collectives (--cpu_collectives=gloo),
                           --devices-per-process CPU devices each; gpu: process I gets GPUs
                           I*D .. I*D+D-1 (JAX_LOCAL_DEVICE_IDS), D = --devices-per-process
  --devices-per-process D  devices of each process (default 1; with gpu and N=1: all GPUs)
  --port PORT              the coordinator's port (default: a free one)
  --logs DIR               log folder (default logs/local)
  --grace S                seconds the others get after the first failure (default 30)
  --python PYTHON          the Python with lima_jax installed [PYTHON] (default python3)
  --dry-run                print the commands instead of running them [LIMA_DRY_RUN=1]
  -h, --help               this help
EOF
}

NUM=""
PLATFORM=cpu
DEVICES=""
PORT=""
LOG_DIR=logs/local
GRACE=30
PYTHON=${PYTHON:-python3}
TRAIN_FLAGS=()

parse_args() {
  while [[ $# -gt 0 ]]; do
    case "$1" in
      -h|--help) usage; exit 0 ;;
      --platform) need_value "$1" $#; PLATFORM=$2; shift ;;
      --devices-per-process) need_value "$1" $#; DEVICES=$2; shift ;;
      --port) need_value "$1" $#; PORT=$2; shift ;;
      --logs) need_value "$1" $#; LOG_DIR=$2; shift ;;
      --grace) need_value "$1" $#; GRACE=$2; shift ;;
      --python) need_value "$1" $#; PYTHON=$2; shift ;;
      --dry-run) DRY_RUN=1 ;;
      --) shift; TRAIN_FLAGS=("$@"); break ;;
      -*) bad_usage "unknown option $1" ;;
      *)
        [[ -z "$NUM" ]] || bad_usage "unexpected argument $1 (train flags go after --)"
        NUM=$1 ;;
    esac
    shift
  done
  [[ -n "$NUM" ]] || bad_usage "the number of processes N is required"
  [[ ${#TRAIN_FLAGS[@]} -gt 0 ]] || bad_usage "the train flags go after --"
  [[ "$PLATFORM" == cpu || "$PLATFORM" == gpu ]] || bad_usage "--platform must be cpu or gpu"
  local n
  for n in "$NUM" ${DEVICES:+"$DEVICES"} ${PORT:+"$PORT"}; do
    is_uint "$n" && [[ "$n" -gt 0 ]] || bad_usage "not a positive integer: $n"
  done
  is_uint "$GRACE" || bad_usage "--grace: not a non-negative integer: $GRACE"
  if [[ "$PLATFORM" == gpu && "$NUM" -gt 1 && -z "$DEVICES" ]]; then
    bad_usage "--platform gpu with several processes needs --devices-per-process"
  fi
  ((BASH_VERSINFO[0] > 5 || (BASH_VERSINFO[0] == 5 && BASH_VERSINFO[1] >= 1))) || die "needs bash 5.1 or later"
}

free_port() {
  "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# process_command I: the command line of process I (an `env` with its environment, then python).
process_command() {
  local i=$1 env=() flags=() xla=() f
  if [[ "$PLATFORM" == cpu ]]; then
    for f in ${XLA_FLAGS:-}; do  # the caller's XLA flags, less any device count
      [[ "$f" == --xla_force_host_platform_device_count=* ]] || xla+=("$f")
    done
    xla+=("--xla_force_host_platform_device_count=${DEVICES:-1}")
    env=(JAX_PLATFORMS=cpu "XLA_FLAGS=${xla[*]}")
  elif [[ -n "$DEVICES" ]]; then
    env=("JAX_LOCAL_DEVICE_IDS=$(seq -s, $((i * DEVICES)) $((i * DEVICES + DEVICES - 1)))")
  fi
  if [[ "$NUM" -gt 1 ]]; then
    flags=("--coordinator_address=127.0.0.1:$PORT" "--num_processes=$NUM" "--process_id=$i")
    [[ "$PLATFORM" == gpu ]] || flags+=(--cpu_collectives=gloo)
  fi
  PROCESS_COMMAND=(env "${env[@]}" "$PYTHON" -m lima_jax.train "${TRAIN_FLAGS[@]}" "${flags[@]}")
}

PIDS=()
stop_all() {
  [[ ${#PIDS[@]} -eq 0 ]] || kill -TERM "${PIDS[@]}" 2>/dev/null || true
}

main() {
  parse_args "$@"
  [[ -n "$PORT" ]] || PORT=$(free_port)
  run_cmd mkdir -p "$LOG_DIR"
  local i
  declare -A index=()
  for ((i = 0; i < NUM; i++)); do
    process_command "$i"
    [[ "$DRY_RUN" == 1 ]] || : >"$LOG_DIR/process-$i.log"
    run_bg "$LOG_DIR/process-$i.log" "${PROCESS_COMMAND[@]}"
    if [[ "$DRY_RUN" != 1 ]]; then
      PIDS+=("$!")
      index[$!]=$i
    fi
  done
  [[ "$DRY_RUN" == 1 ]] && { run_cmd wait; return 0; }
  trap 'stop_all; exit 130' INT TERM
  say "$NUM processes, coordinator 127.0.0.1:$PORT, logs in $LOG_DIR/process-N.log"
  local result=0 status done_pid p remaining killer=""
  while [[ ${#PIDS[@]} -gt 0 ]]; do
    status=0
    wait -n -p done_pid "${PIDS[@]}" || status=$?
    remaining=()
    for p in "${PIDS[@]}"; do
      [[ "$p" == "$done_pid" ]] || remaining+=("$p")
    done
    PIDS=("${remaining[@]}")
    say "process ${index[$done_pid]} exited with status $status"
    if [[ "$status" != 0 && "$result" == 0 ]]; then
      result=$status
      tail -n 20 "$LOG_DIR/process-${index[$done_pid]}.log" >&2 || true
      if [[ ${#PIDS[@]} -gt 0 ]]; then
        # The others usually fail at their next barrier; whatever is left after the grace period is stopped.
        (sleep "$GRACE"; kill -TERM "${PIDS[@]}" 2>/dev/null || true) &
        killer=$!
      fi
    fi
  done
  [[ -z "$killer" ]] || kill "$killer" 2>/dev/null || true
  return "$result"
}

main "$@"
