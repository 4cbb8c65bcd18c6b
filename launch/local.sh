#!/usr/bin/env bash
# Runs N CPU processes on this machine joined by jax.distributed over loopback: the multi-host code path
# (one process per host, SPMD over one global mesh) without a cluster.
#
#   launch/local.sh N DEVICES_PER_PROCESS COMMAND [ARGS...]
#   launch/local.sh 2 4 python -m jaxalign.cli clutrr train-teacher --config ...
#
# Each process gets JAXALIGN_COORDINATOR / JAXALIGN_NUM_PROCESSES / JAXALIGN_PROCESS_ID (see
# jaxalign/distributed.py) and DEVICES_PER_PROCESS fake CPU devices. Output of process i goes to
# ${LOG_DIR:-runs/launch}/process_i.log; the script fails if any process fails.
set -euo pipefail
if [ $# -lt 3 ]; then sed -n '2,12p' "$0"; exit 2; fi
n=$1; per=$2; shift 2
port=${PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
log_dir=${LOG_DIR:-runs/launch}
mkdir -p "$log_dir"
pids=()
for ((i = 0; i < n; i++)); do
  JAXALIGN_COORDINATOR="127.0.0.1:$port" JAXALIGN_NUM_PROCESSES="$n" JAXALIGN_PROCESS_ID="$i" \
  JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$per --xla_cpu_collective_call_terminate_timeout_seconds=600 --xla_cpu_collective_timeout_seconds=600" \
    "$@" >"$log_dir/process_$i.log" 2>&1 &
  pids+=($!)
done
status=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then echo "process $i failed; see $log_dir/process_$i.log" >&2; status=1; fi
done
exit $status
