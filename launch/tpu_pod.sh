#!/usr/bin/env bash
# TPU v4 pod slice: run the same command on every host; jax.distributed.initialize() is
# automatic on Cloud TPU (main.py detects multi-host slices).
#
#   launch/tpu_pod.sh my-v4-32 us-central2-b --config=configs/deit3.py:variant=B --workdir=gs://bucket/deit3_b
set -euo pipefail
TPU=${1:?TPU name}; ZONE=${2:?zone}; shift 2
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command \
  "cd ~/visrep_jax && python3 -m visrep_jax.main --distributed $*"
