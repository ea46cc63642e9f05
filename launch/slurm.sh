#!/usr/bin/env bash
# Multi-node GPU training under SLURM: writes an sbatch script whose srun starts one lima_jax process per
# node (each process drives all the GPUs of its node) and submits it. docs/launch.md has the recipe.
#
# jax.distributed gets its parameters as explicit flags, from SLURM's environment: the coordinator is the
# first host of SLURM_JOB_NODELIST (`scontrol show hostnames`) at --port, --num_processes=$SLURM_NTASKS,
# --process_id=$SLURM_PROCID. JAX would find the first three by itself (jax._src.clusters.slurm_cluster),
# but lima_jax checks an explicit coordinator before joining and says clearly what went wrong, and the port
# is ours to choose. What JAX's SLURM detection would also do, and must not here, is limit each process to
# the GPU numbered SLURM_LOCALID (0 with one task a node): JAX_LOCAL_DEVICE_IDS lists every GPU of the node.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail

PROG=slurm.sh
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/slurm.sh [OPTIONS] -- TRAIN FLAGS...

Writes an sbatch script that runs `python -m lima_jax.train TRAIN FLAGS` on every node of the job, one
process a node with all its GPUs, and submits it with sbatch. The log of process N is
LOGS/JOBNAME-JOBID/process-N.log; the batch script's own output is LOGS/JOBNAME-JOBID.out.

Options:
  --nodes N            nodes (default 1)
  --gpus-per-node G    GPUs of each node (default 8)
  --job-name NAME      job name (default lima_jax)
  --partition P        SLURM partition
  --account A          SLURM account
  --time T             time limit, e.g. 2-00:00:00
  --cpus-per-task C    CPUs of each process (the input pipeline and checkpointing use them)
  --sbatch-arg ARG     one more #SBATCH line, e.g. --sbatch-arg=--qos=high (repeatable)
  --setup CMD          a shell command run on the first node before srun, e.g. 'module load cuda/12.4'
                       or 'source .venv/bin/activate' (repeatable)
  --python PYTHON      the Python that has lima_jax installed (default python3)
  --port PORT          the coordinator's port on the first node (default 12355)
  --logs DIR           log folder, relative to this checkout (default logs/slurm)
  --script FILE        where to write the sbatch script (default LOGS/JOBNAME.sbatch)
  --dry-run            print the commands instead: the script as a here-document, then the sbatch command
                       [LIMA_DRY_RUN=1]
  -h, --help           this help
EOF
}

NODES=1
GPUS_PER_NODE=8
JOB_NAME=lima_jax
PARTITION=""
ACCOUNT=""
TIME_LIMIT=""
CPUS_PER_TASK=""
SBATCH_ARGS=()
SETUP=()
PYTHON=${PYTHON:-python3}
PORT=12355
LOG_DIR=logs/slurm
SCRIPT=""
TRAIN_FLAGS=()

parse_args() {
  while [[ $# -gt 0 ]]; do
    case "$1" in
      -h|--help) usage; exit 0 ;;
      --nodes) need_value "$1" $#; NODES=$2; shift ;;
      --gpus-per-node) need_value "$1" $#; GPUS_PER_NODE=$2; shift ;;
      --job-name) need_value "$1" $#; JOB_NAME=$2; shift ;;
      --partition) need_value "$1" $#; PARTITION=$2; shift ;;
      --account) need_value "$1" $#; ACCOUNT=$2; shift ;;
      --time) need_value "$1" $#; TIME_LIMIT=$2; shift ;;
      --cpus-per-task) need_value "$1" $#; CPUS_PER_TASK=$2; shift ;;
      --sbatch-arg) need_value "$1" $#; SBATCH_ARGS+=("$2"); shift ;;
      --sbatch-arg=*) SBATCH_ARGS+=("${1#--sbatch-arg=}") ;;
      --setup) need_value "$1" $#; SETUP+=("$2"); shift ;;
      --python) need_value "$1" $#; PYTHON=$2; shift ;;
      --port) need_value "$1" $#; PORT=$2; shift ;;
      --logs) need_value "$1" $#; LOG_DIR=$2; shift ;;
      --script) need_value "$1" $#; SCRIPT=$2; shift ;;
      --dry-run) DRY_RUN=1 ;;
      --) shift; TRAIN_FLAGS=("$@"); break ;;
      *) bad_usage "unknown argument $1 (train flags go after --)" ;;
    esac
    shift
  done
  [[ ${#TRAIN_FLAGS[@]} -gt 0 ]] || bad_usage "the train flags go after --"
  local n
  for n in "$NODES" "$GPUS_PER_NODE" "$PORT" ${CPUS_PER_TASK:+"$CPUS_PER_TASK"}; do
    is_uint "$n" && [[ "$n" -gt 0 ]] || bad_usage "not a positive integer: $n"
  done
  [[ "$JOB_NAME" =~ ^[A-Za-z0-9_.-]+$ ]] || bad_usage "--job-name may use letters, digits, _ . - only"
  SCRIPT=${SCRIPT:-$LOG_DIR/$JOB_NAME.sbatch}
  SCRIPT_DIR_EXTRA=$(dirname "$SCRIPT")
  [[ "$SCRIPT_DIR_EXTRA" != "$LOG_DIR" && "$SCRIPT_DIR_EXTRA" != . ]] || SCRIPT_DIR_EXTRA=""
}

# sbatch_script: the batch script, on stdout.
sbatch_script() {
  local repo arg device_ids
  repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  device_ids=$(seq -s, 0 $((GPUS_PER_NODE - 1)))
  echo "#!/usr/bin/env bash"
  echo "#SBATCH --job-name=$JOB_NAME"
  echo "#SBATCH --nodes=$NODES"
  echo "#SBATCH --ntasks-per-node=1"
  echo "#SBATCH --gpus-per-node=$GPUS_PER_NODE"
  [[ -z "$CPUS_PER_TASK" ]] || echo "#SBATCH --cpus-per-task=$CPUS_PER_TASK"
  [[ -z "$PARTITION" ]] || echo "#SBATCH --partition=$PARTITION"
  [[ -z "$ACCOUNT" ]] || echo "#SBATCH --account=$ACCOUNT"
  [[ -z "$TIME_LIMIT" ]] || echo "#SBATCH --time=$TIME_LIMIT"
  echo "#SBATCH --exclusive"
  echo "#SBATCH --chdir=$repo"
  echo "#SBATCH --output=$LOG_DIR/%x-%j.out"
  for arg in "${SBATCH_ARGS[@]}"; do
    echo "#SBATCH $arg"
  done
  cat <<EOF
# Written by launch/slurm.sh: one lima_jax process a node, each with all $GPUS_PER_NODE GPUs of its node.
set -euo pipefail
EOF
  for arg in "${SETUP[@]}"; do
    echo "$arg"
  done
  cat <<EOF
# jax.distributed from SLURM's environment: process 0 runs on the first node and listens on the port.
LIMA_COORDINATOR=\$(scontrol show hostnames "\$SLURM_JOB_NODELIST" | head -n 1):$PORT
export LIMA_COORDINATOR
# All GPUs of the node for its one process (JAX's SLURM detection would keep only GPU \$SLURM_LOCALID).
export JAX_LOCAL_DEVICE_IDS=$device_ids
LOGS=$(quote "$LOG_DIR")/\$SLURM_JOB_NAME-\$SLURM_JOB_ID
mkdir -p "\$LOGS"
echo "coordinator \$LIMA_COORDINATOR, \$SLURM_NTASKS processes; logs in \$LOGS/process-N.log"
srun --nodes=$NODES --ntasks-per-node=1 --kill-on-bad-exit=1 --output="\$LOGS/process-%t.log" \\
  bash -c 'exec "\$0" -m lima_jax.train "\$@" --coordinator_address="\$LIMA_COORDINATOR" --num_processes="\$SLURM_NTASKS" --process_id="\$SLURM_PROCID"' \\
  $(quote "$PYTHON" "${TRAIN_FLAGS[@]}")
EOF
}

main() {
  parse_args "$@"
  local script
  script=$(sbatch_script)
  if [[ "$DRY_RUN" == 1 ]]; then
    quote mkdir -p "$LOG_DIR" ${SCRIPT_DIR_EXTRA:+"$SCRIPT_DIR_EXTRA"}
    printf 'cat > %s <<'\''LIMA_SBATCH'\''\n%s\nLIMA_SBATCH\n' "$(quote "$SCRIPT")" "$script"
    quote sbatch "$SCRIPT"
    return 0
  fi
  mkdir -p "$LOG_DIR" ${SCRIPT_DIR_EXTRA:+"$SCRIPT_DIR_EXTRA"}
  printf '%s\n' "$script" >"$SCRIPT"
  say "wrote $SCRIPT"
  sbatch "$SCRIPT"
}

main "$@"
