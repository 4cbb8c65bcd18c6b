#!/usr/bin/env bash
# Runs a jaxalign command on every worker of a Cloud TPU VM pod slice (one process per host).
#
#   launch/tpu_pod.sh TPU_NAME ZONE [--project P] -- jaxalign train --config jaxalign/configs/tinyalign_qwen2.py --workdir gs://...
#
# JAX detects the TPU pod by itself: JAXALIGN_DISTRIBUTED=1 makes each process call
# jax.distributed.initialize() with no arguments. The repo must already be installed on every worker
# (for example: launch/tpu_pod.sh NAME ZONE -- pip install -e /path/to/jaxalign).
set -euo pipefail
if [ $# -lt 4 ]; then sed -n '2,9p' "$0"; exit 2; fi
tpu=$1; zone=$2; shift 2
extra=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do extra+=("$1"); shift; done
if [ $# -lt 2 ]; then echo "tpu_pod.sh: put -- before the command to run" >&2; sed -n '2,9p' "$0"; exit 2; fi
shift
printf -v remote '%q ' "$@"
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" "${extra[@]}" --worker=all \
  --command "cd ~/jaxalign 2>/dev/null || true; JAXALIGN_DISTRIBUTED=1 $remote"
