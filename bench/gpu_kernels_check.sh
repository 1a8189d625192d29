#!/usr/bin/env bash
# Every GPU check of the kernels work (issue 13) in one run, sized for one device call:
# the CUDA tests (cuBLASLt products on awkward shapes, training against the CPU, the parity and
# data-parallel tests), the matrix products of the 1.5B shapes in Burn (three paths) and PyTorch,
# then bench/gpu_train.sh, and with the time left bench/gpu_qlora.sh (issue 15's 70B QLoRA
# steps). The whole script stays inside 570 s. Results: bench/RESULTS-gpu-train.md,
# bench/RESULTS-gpu-qlora.md.
#
# Build here (the GPU machine has no Rust toolchain), then carry .devbin:
#   cargo build --release -p distill-student --features cuda --example train_step --example matmul_bench
#   cargo test --release -p distill-student --features cuda --test it --no-run   # -> release/deps/it-*
#   strip the three into .device/, then: tar -cJf .devbin/bins.tar.xz -C .device it matmul_bench train_step
# On the GPU machine, from the repository root: OUT=somewhere bash bench/gpu_kernels_check.sh
set -u
OUT=${OUT:?set OUT to a folder for the results}
START=$SECONDS
BIN=$(mktemp -d)
tar -xJf .devbin/bins.tar.xz -C "$BIN"
export PYTHONUNBUFFERED=1
# cuBLASLt is loaded at run time: PyTorch's wheels (or the CUDA toolkit) ship it.
LT=$(python3 - <<'EOF'
import glob, os, site
roots = site.getsitepackages() + ["/usr/local/cuda/lib64", "/usr/lib/x86_64-linux-gnu"]
hits = [p for r in roots for p in glob.glob(os.path.join(r, "**", "libcublasLt.so*"), recursive=True)]
print(os.path.dirname(sorted(hits)[0]) if hits else "")
EOF
)
export LD_LIBRARY_PATH=${LT}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export DISTILL_AUTOTUNE_CACHE=/tmp/distill-autotune
{
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    echo "cuBLASLt from: ${LT:-not found}"; ls "$LT" 2>/dev/null | grep -i cublaslt
    echo "== CUDA tests"
    DISTILL_STUDENT_DIR=$PWD/student timeout 150 "$BIN/it" cuda_ --test-threads 1 --nocapture 2>&1 | grep -v "^\s*$"
    echo "exit ${PIPESTATUS[0]} at $((SECONDS - START)) s"
    echo "== bf16 products of the 1.5B training shapes: Burn (untuned CubeCL and cuBLASLt)"
    # Autotuning each shape took most of 120 s on 2026-11-30 (its figures for six shapes are in
    # RESULTS); MATMUL_SKIP_AUTOTUNE=0 measures it again.
    MATMUL_SKIP_AUTOTUNE=${MATMUL_SKIP_AUTOTUNE:-1} timeout 120 "$BIN/matmul_bench" cuda bf16
    echo "exit $? at $((SECONDS - START)) s"
    echo "== the same products in PyTorch (cuBLAS)"
    timeout 30 python3 bench/gpu_train_report.py matmul
    echo "exit $? at $((SECONDS - START)) s"
} 2>&1 | tee "$OUT/kernels.log"
echo "== bench/gpu_train.sh"
BIN="$BIN/train_step" BUDGET=$((420 - (SECONDS - START))) bash bench/gpu_train.sh 2>&1 | tee "$OUT/train.log"
LEFT=$((570 - (SECONDS - START)))
echo "== bench/gpu_qlora.sh ($LEFT s left)"
if [ "$LEFT" -ge 90 ]; then
    mkdir -p /tmp/qlora
    BIN="$BIN/train_step" STEPS=2 LIMIT=$LEFT OUT=/tmp/qlora bash bench/gpu_qlora.sh 2>&1 | tee "$OUT/qlora.log"
fi
echo "total $((SECONDS - START)) s"
