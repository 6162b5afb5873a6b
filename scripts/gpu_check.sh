#!/usr/bin/env bash
# One-shot accelerator check, sized for a short GPU lease (about 8 minutes on one H100):
#   1. versions (JAX, flax, optax, orbax, torch, timm) and the GPU;
#   2. DeiT III-S/16 at 224 train + inference throughput against timm on the same GPU, bfloat16
#      (timm: torch.autocast + SDPA), JAX with XLA's attention, then with cuDNN flash attention
#      (the default on GPU for 16-bit inputs);
#   3. CrossTransformer train-step memory (XLA memory analysis) and time at a full 50-query
#      episode, with and without remat / query chunking (issue 5 target);
#   4. the model, head, optimizer and benchmark tests on the GPU (float32 matmuls at 'highest'
#      precision so the parity tolerances hold; TensorFlow-based data tests need TF, not there).
# Usage (repository root): bash scripts/gpu_check.sh [OUTDIR]   (default $OUT or /tmp/gpu_check)
# Python packages the GPU image lacks (ml_collections, clu) travel as wheels in .whl/.
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

# JAX and torch share the GPU in one process: no preallocation of 75% of its memory by JAX.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
for attn in xla cudnn; do
  section "DeiT III-S train+infer vs timm, bfloat16, batch 256, JAX attention: $attn"
  timeout 140 python3 scripts/benchmark.py --model=deit3_small_patch16_224 --batch_size=256 \
      --dtype=bfloat16 --attention=$attn --vs-timm --steps=10 --repeats=3 2>&1 \
      | tee "$OUT_DIR/bench_bf16_$attn.txt"
done

section "CrossTransformer step: memory and time, 50-way 500-support 50-query 14x14x512"
timeout 120 python3 scripts/benchmark_ctx_memory.py --time --time_queries=50 --steps=5 \
    --chunk=5 2>&1 | tee "$OUT_DIR/ctx_memory.txt"

section "tests on the GPU"
JAX_PLATFORMS=cuda JAX_DEFAULT_MATMUL_PRECISION=highest XLA_PYTHON_CLIENT_PREALLOCATE=false \
  timeout 170 python3 -m pytest -q -p no:cacheprovider -n 4 -rfE --durations=5 \
    tests/test_models.py tests/test_models_conrec.py tests/test_models_deit_cait.py \
    tests/test_models_patchconvnet.py tests/test_models_resmlp.py tests/test_models_resnet.py \
    tests/test_vit_parity.py tests/test_fewshot_heads.py tests/test_optim.py tests/test_zoo.py \
    tests/test_distill.py -k "not end_to_end and not zoo_script" 2>&1 | tee "$OUT_DIR/tests.txt" | tail -40
section done
