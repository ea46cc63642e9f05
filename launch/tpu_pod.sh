#!/usr/bin/env bash
# Create (or reuse) a Cloud TPU VM slice, install lima_jax on every worker, and run training on all hosts.
#
# NOT RUN HERE: this repository's CI and development machines have no Google Cloud access, so this script
# is untested end to end; every command in it is a plain `gcloud compute tpus tpu-vm` call as documented at
# cloud.google.com/tpu/docs. What it relies on in lima_jax *is* tested: on Cloud TPU `jax.distributed`
# finds the coordinator by itself (lima_jax.distributed), each host loads only its rows of the global batch,
# checkpoints are written by all hosts together, and only host 0 logs (tests/test_multihost.py).
#
# Usage:
#   launch/tpu_pod.sh NAME ZONE ACCELERATOR [TRAIN FLAGS...]
#   launch/tpu_pod.sh lima-65b us-east5-a v5p-128 --config configs/lima_65b.py \
#       --config.workdir=gs://BUCKET/lima65b --config.data.train_path=gs://BUCKET/lima/train.jsonl \
#       --config.tokenizer.path=gs://BUCKET/llama/tokenizer.model --config.init_from=gs://BUCKET/llama-65b
#
# Environment: PROJECT (default: gcloud's), RUNTIME (TPU software version, default v2-alpha-tpuv5 for
# v5p, tpu-ubuntu2204-base otherwise), SPOT=1 for a spot slice, REPO_URL (default: this checkout is
# copied to every worker with `gcloud ... scp`), DELETE_AFTER=1 to delete the slice when training ends.
# Before a big run, check the layout fits: python -m lima_jax.layouts --config ... --topology ACCELERATOR
set -euo pipefail

if [[ $# -lt 3 ]]; then
  sed -n '2,20p' "$0"; exit 2
fi
NAME=$1; ZONE=$2; ACCELERATOR=$3; shift 3
TRAIN_FLAGS=("$@")
PROJECT_FLAG=(); [[ -n "${PROJECT:-}" ]] && PROJECT_FLAG=(--project "$PROJECT")
case "$ACCELERATOR" in
  v5p-*) RUNTIME=${RUNTIME:-v2-alpha-tpuv5} ;;
  v5litepod-*|v5e-*) RUNTIME=${RUNTIME:-v2-alpha-tpuv5-lite} ;;
  v6e-*) RUNTIME=${RUNTIME:-v2-alpha-tpuv6e} ;;
  *) RUNTIME=${RUNTIME:-tpu-ubuntu2204-base} ;;
esac
TPU=(gcloud compute tpus tpu-vm "${PROJECT_FLAG[@]}")
on_all() { "${TPU[@]}" ssh "$NAME" --zone "$ZONE" --worker=all --command "$1"; }

if ! "${TPU[@]}" describe "$NAME" --zone "$ZONE" >/dev/null 2>&1; then
  echo "creating $ACCELERATOR slice $NAME in $ZONE (runtime $RUNTIME)"
  EXTRA=(); [[ "${SPOT:-0}" == 1 ]] && EXTRA=(--spot)
  "${TPU[@]}" create "$NAME" --zone "$ZONE" --accelerator-type "$ACCELERATOR" --version "$RUNTIME" "${EXTRA[@]}"
else
  echo "reusing slice $NAME"
fi

# The same code on every worker: clone a URL, or copy this checkout.
if [[ -n "${REPO_URL:-}" ]]; then
  on_all "rm -rf ~/lima_jax && git clone --depth 1 '$REPO_URL' ~/lima_jax"
else
  SRC=$(cd "$(dirname "$0")/.." && pwd)
  tar -C "$SRC" --exclude=.venv --exclude=.git --exclude=runs -czf /tmp/lima_jax_src.tgz .
  "${TPU[@]}" scp /tmp/lima_jax_src.tgz "$NAME":/tmp/lima_jax_src.tgz --zone "$ZONE" --worker=all
  on_all "rm -rf ~/lima_jax && mkdir -p ~/lima_jax && tar -C ~/lima_jax -xzf /tmp/lima_jax_src.tgz"
fi
on_all "cd ~/lima_jax && python3 -m pip install -q --upgrade pip && python3 -m pip install -q -e '.[tpu]'"

# Every host runs the same command; jax.distributed.initialize() discovers the slice (lima_jax.distributed).
# Quote each flag so that spaces survive the remote shell.
QUOTED=$(printf " %q" "${TRAIN_FLAGS[@]}")
on_all "cd ~/lima_jax && python3 -m lima_jax.train${QUOTED} 2>&1 | tee -a ~/lima_train.log"
status=$?
if [[ "${DELETE_AFTER:-0}" == 1 ]]; then
  "${TPU[@]}" delete "$NAME" --zone "$ZONE" --quiet
fi
exit $status
