#!/usr/bin/env bash
# One-shot accelerator check, sized for a short GPU lease: each section has its own timeout,
# 590 s in all (a device call's limit is 600 s). On one H200 on 2026-11-27, in an earlier layout,
# the CTX section took 65 s, the tests about 245 s (over two calls) and DeiT 62 s; this layout
# has not yet run as a whole. In this order:
#   1. versions (JAX, flax, optax, orbax, torch, timm) and the GPU;
#   2. CrossTransformer train-step memory (XLA memory analysis) and time at a full 50-query
#      episode, with and without remat / query chunking (issue 5 target), the two class-sum
#      implementations of fewshot._class_sum alone and in whole steps;
#   3. the ViT parity, few-shot head and ResNet tests on the GPU (float32 matmuls at 'highest'
#      precision so the parity tolerances hold; the GPU image has no TensorFlow, so tests that
#      load configs or data cannot run there);
#   4. DeiT III-S/16 at 224 train + inference throughput against timm on the same GPU, bfloat16
#      (timm: torch.autocast + SDPA; JAX: XLA's attention).
# Usage (repository root): bash scripts/gpu_check.sh [OUTDIR]   (default $OUT or /tmp/gpu_check)
# Python packages the GPU image lacks (ml_collections, clu) travel as wheels in .whl/ (git-ignored
# through .git/info/exclude), fetched beforehand on a machine with pip access:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux2014_x86_64 -d .whl ml_collections==1.1.0 clu==0.0.12
set -uo pipefail
OUT_DIR=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
section() { echo; echo "=== $* ($(date +%T))"; }

section versions
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 - <<'EOF'
import sys, jax, flax, optax, orbax.checkpoint as ocp, numpy, torch, timm
print(f"python {sys.version.split()[0]}  jax {jax.__version__}  flax {flax.__version__}  "
      f"optax {optax.__version__}  numpy {numpy.__version__}  torch {torch.__version__}  "
      f"timm {timm.__version__}")
print("devices:", jax.devices())
EOF

# JAX and torch share the GPU in one process (DeiT) and 8 test workers share it: no
# preallocation of 75% of its memory by JAX.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
# Issue 5's target first: the ctx configs' 5-query chunks and 10-query chunks, the remat
# configurations only (plain always runs), to keep the compilations inside the limit.
section "CrossTransformer step: memory and time, 50-way 500-support 50-query 14x14x512"
timeout 170 python3 scripts/benchmark_ctx_memory.py --time --time_queries=50 --steps=5 \
    --chunk=5,10 --class_sum \
    --configs=remat,remat+chunk5,remat+chunk5+recompute,ckpt+chunk5,remat+chunk10,ckpt+chunk10 \
    2>&1 | grep -v "^[WE][0-9]\{4\} " | tee "$OUT_DIR/ctx_memory.txt"
section "CrossTransformer step with the segment sum for Eq. (2) (default on GPU: one-hot matmul)"
timeout 50 python3 scripts/benchmark_ctx_memory.py --time --time_queries=50 --steps=5 \
    --chunk=5 --configs=remat+chunk5,remat+chunk5+recompute --class_sum_impl=segment --no_memory \
    2>&1 | grep -v "^[WE][0-9]\{4\} " | tee "$OUT_DIR/ctx_segment_sum.txt"

section "tests on the GPU"
# Test selection: what runs without TensorFlow (absent there); ~75 tests, about 4 minutes with
# -n 8 on one H200 (2026-11-27: the float64 and torch-parity gradient tests take 40-60 s each).
JAX_PLATFORMS=cuda JAX_DEFAULT_MATMUL_PRECISION=highest \
  timeout 270 python3 -m pytest -q --tb=line --durations=10 -p no:cacheprovider -n 8 \
    tests/test_vit_parity.py tests/test_fewshot_heads.py tests/test_models_resnet.py 2>&1 \
    | grep -v "PytestBenchmarkWarning\|warner(" | tee "$OUT_DIR/tests.txt" | tail -30
section "DeiT III-S train+infer vs timm, bfloat16, batch 256"
timeout 90 python3 scripts/benchmark.py --model=deit3_small_patch16_224 --batch_size=256 \
    --dtype=bfloat16 --vs-timm --steps=10 --repeats=3 2>&1 | tee "$OUT_DIR/bench_bf16.txt"
section done
