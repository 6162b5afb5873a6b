#!/usr/bin/env bash
# Launch N processes of visrep_jax.main on this machine (multi-process on one host, e.g. to
# test multi-host code paths on CPU, or one process per GPU).
#
#   launch/local.sh 2 --config=configs/deit3.py:runlocal --workdir=/tmp/mp
#
# On CPU each process gets DEVICES_PER_PROCESS simulated devices (default 1).
set -euo pipefail
N=${1:?usage: launch/local.sh NUM_PROCESSES ARGS...}
shift
PORT=${PORT:-$((20000 + RANDOM % 20000))}
PYTHON=${PYTHON:-python}
if [ -n "${DEVICES_PER_PROCESS:-}" ]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${DEVICES_PER_PROCESS}"
fi
pids=()
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' INT TERM
for ((i = 0; i < N; i++)); do
  if [ -n "${GPUS_PER_PROCESS:-}" ]; then
    export CUDA_VISIBLE_DEVICES=$(seq -s, $((i * GPUS_PER_PROCESS)) $(((i + 1) * GPUS_PER_PROCESS - 1)))
  fi
  "$PYTHON" -m visrep_jax.main --coordinator_address="localhost:${PORT}" \
      --num_processes="$N" --process_id="$i" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
