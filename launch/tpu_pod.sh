#!/usr/bin/env bash
# Cloud TPU VM slices for lima_jax: create, install, run (all workers at once, one log per worker),
# supervise (re-create and resume after preemptions), stop, delete. docs/launch.md has the recipes.
#
# There is no Google Cloud access where this repository is tested: tests/test_launch.py checks the exact
# commands of every subcommand with --dry-run, and the supervisor's decisions against a fake `gcloud`.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail

PROG=tpu_pod.sh
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh COMMAND [OPTIONS] [-- TRAIN FLAGS...]

Commands:
  create     create the slice: on demand, --spot, or as a queued resource (--queued, with --spot or
             --reserved; waits until it is ACTIVE)
  install    put lima_jax on every worker (--worker=all): this checkout, copied with scp, or a
             `git clone --depth 1` of --repo-url; then `pip install -e '.[tpu,gcs]'`
  run        `python -m lima_jax.train TRAIN FLAGS` on all workers at once, one `ssh --worker=N` each,
             the output of worker N in LOGS/worker-N.log; exits with the workers' combined status
  supervise  create (unless the slice is up), install, run; when the slice is preempted (state PREEMPTED
             or TERMINATED, queued resource SUSPENDED or FAILED) or training exits 75 (saved, restart me)
             or ssh fails (255): delete and re-create the slice if it is gone, reinstall, and run the same
             command again, which resumes from the workdir's latest checkpoint. Ends when training exits 0,
             or with a non-retryable status: 2 bad input, 3 diverged, 5 workdir locked by another run
  stop       SIGTERM the training on every worker (it saves a checkpoint and exits); stop a supervisor
             first (Ctrl-C), or it starts the run again
  delete     delete the slice (with --queued: the queued resource and its slice)

Options (environment variable in brackets):
  --name NAME          slice name [TPU_NAME], required
  --zone ZONE          zone [ZONE], required
  --project PROJECT    project [PROJECT]; default: gcloud's
  --accelerator TYPE   accelerator type, e.g. v5p-128 [ACCELERATOR]; required by create and supervise
  --runtime VERSION    TPU software version [RUNTIME]; default: by accelerator (v2-alpha-tpuv5 for v5p)
  --workers N          hosts in the slice [WORKERS]; default: from the accelerator type
  --spot               a spot slice (preemptible) [SPOT=1]
  --queued             a queued resource (gcloud compute tpus queued-resources) [QUEUED=1]
  --reserved           with --queued: use the project's reservation [RESERVED=1]
  --repo-url URL       install from `git clone URL` instead of copying this checkout [REPO_URL]
  --logs DIR           where run writes worker-N.log [LOG_DIR]; default: logs/NAME
  --max-restarts N     supervise: give up after N restarts (default 20)
  --stale-lock-wait S  supervise: after a preemption, a run that finds the workdir locked (5) waits S
                       seconds for the dead run's lock to go stale (train.lock_stale_s) and tries once
                       more (default 600)
  --poll S             seconds between state checks while waiting (default 30)
  --dry-run            print the commands (one a line, shell-quoted) instead of running them
                       [LIMA_DRY_RUN=1]; state queries are not printed: a dry run takes the path of a
                       slice that does not exist yet and a training run that succeeds
  -h, --help           this help

Every TRAIN FLAG after `--` is passed to `python -m lima_jax.train` on every worker, quoted. Use a gs://
workdir (--config.workdir=gs://...): a re-created slice has fresh disks, and training resumes from the
workdir's latest checkpoint.
EOF
}

# ---- options ---------------------------------------------------------------------------------------------
COMMAND=""
NAME=${TPU_NAME:-}
ZONE=${ZONE:-}
PROJECT=${PROJECT:-}
ACCELERATOR=${ACCELERATOR:-}
RUNTIME=${RUNTIME:-}
WORKERS=${WORKERS:-}
SPOT=${SPOT:-0}
QUEUED=${QUEUED:-0}
RESERVED=${RESERVED:-0}
REPO_URL=${REPO_URL:-}
LOG_DIR=${LOG_DIR:-}
MAX_RESTARTS=20
STALE_LOCK_WAIT=600
POLL=30
TRAIN_FLAGS=()

STOP_STATUSES=" 2 3 5 "    # lima_jax: bad input, diverged, workdir locked
RETRY_STATUSES=" 75 255 "  # preempted after saving; ssh lost the worker
# shellcheck disable=SC2088  # the tildes are for the workers' shell to expand
REMOTE_DIR='~/lima_jax' PID_FILE='~/lima_train.pid'

parse_args() {
  while [[ $# -gt 0 ]]; do
    case "$1" in
      -h|--help) usage; exit 0 ;;
      --name) need_value "$1" $#; NAME=$2; shift ;;
      --zone) need_value "$1" $#; ZONE=$2; shift ;;
      --project) need_value "$1" $#; PROJECT=$2; shift ;;
      --accelerator) need_value "$1" $#; ACCELERATOR=$2; shift ;;
      --runtime) need_value "$1" $#; RUNTIME=$2; shift ;;
      --workers) need_value "$1" $#; WORKERS=$2; shift ;;
      --spot) SPOT=1 ;;
      --queued) QUEUED=1 ;;
      --reserved) RESERVED=1 ;;
      --repo-url) need_value "$1" $#; REPO_URL=$2; shift ;;
      --logs) need_value "$1" $#; LOG_DIR=$2; shift ;;
      --max-restarts) need_value "$1" $#; MAX_RESTARTS=$2; shift ;;
      --stale-lock-wait) need_value "$1" $#; STALE_LOCK_WAIT=$2; shift ;;
      --poll) need_value "$1" $#; POLL=$2; shift ;;
      --dry-run) DRY_RUN=1 ;;
      --) shift; TRAIN_FLAGS=("$@"); break ;;
      -*) bad_usage "unknown option $1" ;;
      *)
        [[ -z "$COMMAND" ]] || bad_usage "one command at a time (got $COMMAND and $1)"
        COMMAND=$1 ;;
    esac
    shift
  done
  case "$COMMAND" in
    create|install|run|supervise|stop|delete) ;;
    "") bad_usage "no command" ;;
    *) bad_usage "unknown command $COMMAND" ;;
  esac
  [[ -n "$NAME" ]] || bad_usage "--name is required"
  [[ -n "$ZONE" ]] || bad_usage "--zone is required"
  if [[ "$COMMAND" == create || "$COMMAND" == supervise ]]; then
    [[ -n "$ACCELERATOR" ]] || bad_usage "$COMMAND needs --accelerator"
  fi
  if [[ "$COMMAND" == run || "$COMMAND" == supervise ]]; then
    [[ ${#TRAIN_FLAGS[@]} -gt 0 ]] || bad_usage "$COMMAND needs the train flags after --"
    [[ -n "$WORKERS" || -n "$ACCELERATOR" ]] || bad_usage "$COMMAND needs --accelerator or --workers"
  fi
  [[ "$RESERVED" == 0 || "$QUEUED" == 1 ]] || bad_usage "--reserved needs --queued"
  [[ "$RESERVED" == 0 || "$SPOT" == 0 ]] || bad_usage "--spot and --reserved exclude each other"
  local n
  for n in "$MAX_RESTARTS" "$STALE_LOCK_WAIT" "$POLL" ${WORKERS:+"$WORKERS"}; do
    is_uint "$n" || bad_usage "not a non-negative integer: $n"
  done
  [[ -n "$WORKERS" || -z "$ACCELERATOR" ]] || WORKERS=$(workers_of "$ACCELERATOR")
  [[ -n "$RUNTIME" ]] || RUNTIME=$(runtime_of "$ACCELERATOR")
  LOG_DIR=${LOG_DIR:-logs/$NAME}
}

# workers_of TYPE: the number of TPU VM hosts of an accelerator type. v2/v3/v4/v5p count TensorCores
# (8 a host), v5e/v6e count chips (a single host up to 8, else 4 a host).
workers_of() {
  local type=$1 n=${1##*-}
  is_uint "$n" || bad_usage "cannot tell the number of workers of accelerator '$type': pass --workers"
  case "$type" in
    v2-*|v3-*|v4-*|v5p-*) echo $(( n <= 8 ? 1 : n / 8 )) ;;
    v5litepod-*|v5e-*|v6e-*) echo $(( n <= 8 ? 1 : n / 4 )) ;;
    *) bad_usage "cannot tell the number of workers of accelerator '$type': pass --workers" ;;
  esac
}

runtime_of() {
  case "$1" in
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) echo tpu-ubuntu2204-base ;;
  esac
}

# ---- gcloud ----------------------------------------------------------------------------------------------
gcloud_cmd() {
  run_cmd gcloud "$@" ${PROJECT:+--project "$PROJECT"}
}

on_all() {
  gcloud_cmd compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker=all --command "$1"
}

# slice_state: the slice's state (READY, PREEMPTED, ...; a queued resource's ACTIVE, SUSPENDED, ...), or
# ABSENT when it does not exist (any failure of describe). A dry run assumes ABSENT.
slice_state() {
  [[ "$DRY_RUN" == 1 ]] && { echo ABSENT; return; }
  local state
  if [[ "$QUEUED" == 1 ]]; then
    state=$(gcloud compute tpus queued-resources describe "$NAME" --zone "$ZONE" \
      --format='value(state.state)' ${PROJECT:+--project "$PROJECT"} 2>/dev/null) || state=ABSENT
  else
    state=$(gcloud compute tpus tpu-vm describe "$NAME" --zone "$ZONE" \
      --format='value(state)' ${PROJECT:+--project "$PROJECT"} 2>/dev/null) || state=ABSENT
  fi
  echo "${state:-ABSENT}"
}

is_up() {
  [[ "$1" == READY || "$1" == ACTIVE ]]
}

create() {
  local capacity=()
  [[ "$SPOT" == 1 ]] && capacity=(--spot)
  [[ "$RESERVED" == 1 ]] && capacity=(--reserved)
  say "creating $ACCELERATOR slice $NAME in $ZONE (runtime $RUNTIME${capacity[*]:+, ${capacity[*]}})"
  if [[ "$QUEUED" == 1 ]]; then
    gcloud_cmd compute tpus queued-resources create "$NAME" --node-id "$NAME" --zone "$ZONE" \
      --accelerator-type "$ACCELERATOR" --runtime-version "$RUNTIME" "${capacity[@]}"
    wait_active
  else
    gcloud_cmd compute tpus tpu-vm create "$NAME" --zone "$ZONE" --accelerator-type "$ACCELERATOR" \
      --version "$RUNTIME" "${capacity[@]}"
  fi
}

# wait_active: polls a queued resource until it is ACTIVE; fails when it ends FAILED or SUSPENDED.
wait_active() {
  [[ "$DRY_RUN" == 1 ]] && return 0
  local state
  while true; do
    state=$(slice_state)
    case "$state" in
      ACTIVE) return 0 ;;
      FAILED|SUSPENDED) say "queued resource $NAME is $state"; return 1 ;;
    esac
    say "queued resource $NAME is $state; waiting"
    sleep "$POLL"
  done
}

delete() {
  if [[ "$QUEUED" == 1 ]]; then
    gcloud_cmd compute tpus queued-resources delete "$NAME" --zone "$ZONE" --force --quiet
  else
    gcloud_cmd compute tpus tpu-vm delete "$NAME" --zone "$ZONE" --quiet
  fi
}

install() {
  if [[ -n "$REPO_URL" ]]; then
    on_all "rm -rf $REMOTE_DIR && git clone --depth 1 $(quote "$REPO_URL") $REMOTE_DIR"
  else
    local src tgz
    src=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    tgz="${TMPDIR:-/tmp}/lima_jax_src-$NAME.tgz"
    run_cmd tar -C "$src" --exclude=.venv --exclude=.git --exclude=logs --exclude=runs -czf "$tgz" .
    gcloud_cmd compute tpus tpu-vm scp "$tgz" "$NAME:/tmp/lima_jax_src.tgz" --zone "$ZONE" --worker=all
    on_all "rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar -C $REMOTE_DIR -xzf /tmp/lima_jax_src.tgz"
  fi
  on_all "cd $REMOTE_DIR && python3 -m pip install -q --upgrade pip && python3 -m pip install -q -e '.[tpu,gcs]'"
}

# train_command: what every worker runs. Its shell's pid, which exec hands to python, goes to PID_FILE
# for `stop`.
train_command() {
  echo "cd $REMOTE_DIR && echo \$\$ > $PID_FILE && exec python3 -m lima_jax.train $(quote "${TRAIN_FLAGS[@]}")"
}

# run_training: one ssh per worker, all at once, worker N's output appended to LOG_DIR/worker-N.log; then
# the combined exit status (combine_statuses).
run_training() {
  local cmd i pids=() statuses=()
  cmd=$(train_command)
  run_cmd mkdir -p "$LOG_DIR"
  say "training on $WORKERS workers of $NAME; logs: $LOG_DIR/worker-N.log"
  for ((i = 0; i < WORKERS; i++)); do
    [[ "$DRY_RUN" == 1 ]] || echo "==== $(date -u +%FT%TZ) $PROG run on $NAME" >>"$LOG_DIR/worker-$i.log"
    run_bg "$LOG_DIR/worker-$i.log" \
      gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" "--worker=$i" --command "$cmd" \
      ${PROJECT:+--project "$PROJECT"}
    [[ "$DRY_RUN" == 1 ]] || pids+=("$!")
  done
  [[ "$DRY_RUN" == 1 ]] && { run_cmd wait; return 0; }
  for i in "${!pids[@]}"; do
    if wait "${pids[$i]}"; then statuses+=(0); else statuses+=("$?"); fi
  done
  say "worker exit statuses: ${statuses[*]}"
  return "$(combine_statuses "${statuses[@]}")"
}

# combine_statuses S...: 0 when all are 0; else the first non-retryable one (2, 3, 5, or any other non-zero
# status that is not 75 or 255); else the first retryable one.
combine_statuses() {
  local s first_retryable=0
  for s in "$@"; do
    [[ "$s" == 0 ]] && continue
    if [[ "$RETRY_STATUSES" == *" $s "* ]]; then
      [[ "$first_retryable" != 0 ]] || first_retryable=$s
    else
      echo "$s"
      return
    fi
  done
  echo "$first_retryable"
}

stop_training() {
  on_all "if [ -f $PID_FILE ]; then kill -TERM \"\$(cat $PID_FILE)\" 2>/dev/null || true; fi"
}

# ---- supervise -------------------------------------------------------------------------------------------
# The slice up (reused when READY/ACTIVE, else deleted if present and created) and lima_jax installed.
bring_up() {
  local state
  state=$(slice_state)
  if is_up "$state"; then
    say "reusing slice $NAME ($state)"
  else
    [[ "$state" == ABSENT ]] || { say "slice $NAME is $state: deleting it"; delete; }
    create
  fi
  install
}

supervise() {
  local workdir="" f status state restarts=0 fresh=1 after_preemption=0 lock_waited=0
  for f in "${TRAIN_FLAGS[@]}"; do
    [[ "$f" == --config.workdir=* ]] && workdir=${f#--config.workdir=}
  done
  [[ "$workdir" == gs://* ]] || say "warning: --config.workdir=${workdir:-<unset>} is not gs://: a re-created" \
    "slice starts with empty disks, so training there cannot resume from a checkpoint"
  while true; do
    if [[ "$fresh" == 1 ]]; then
      bring_up
      fresh=0
    fi
    status=0
    run_training || status=$?
    if [[ "$status" == 0 ]]; then
      say "training finished (exit status 0)"
      [[ "$DRY_RUN" == 1 ]] && say "(a dry run stops here; on preemption the supervisor repeats from delete)"
      return 0
    fi
    state=$(slice_state)
    say "training exited with status $status; slice $NAME is $state"
    if [[ "$status" == 5 && "$after_preemption" == 1 && "$lock_waited" == 0 ]]; then
      # The preempted run could not release its lock: it goes stale after train.lock_stale_s.
      say "workdir locked after a preemption: waiting ${STALE_LOCK_WAIT}s for the dead run's lock to go stale"
      sleep "$STALE_LOCK_WAIT"
      lock_waited=1
      is_up "$state" || fresh=1
      continue
    fi
    if [[ "$STOP_STATUSES" == *" $status "* ]]; then
      say "not retrying: exit status $status (2 bad input, 3 diverged, 5 workdir locked by another run)"
      return "$status"
    fi
    if ! is_up "$state"; then
      fresh=1  # preempted: delete, create, install, run
    elif [[ "$RETRY_STATUSES" != *" $status "* ]]; then
      say "not retrying: exit status $status on a healthy slice (see $LOG_DIR/worker-*.log)"
      return "$status"
    fi
    if ((restarts >= MAX_RESTARTS)); then
      say "giving up after $restarts restarts"
      return "$status"
    fi
    restarts=$((restarts + 1))
    after_preemption=1
    lock_waited=0
    say "restart $restarts of at most $MAX_RESTARTS ($([[ "$fresh" == 1 ]] && echo "re-creating the slice" || echo "same slice"))"
  done
}

main() {
  parse_args "$@"
  case "$COMMAND" in
    create) create ;;
    install) install ;;
    run) run_training ;;
    supervise) supervise ;;
    stop) stop_training ;;
    delete) delete ;;
  esac
}

main "$@"
