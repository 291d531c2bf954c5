#!/usr/bin/env bash
# One H200, 15 minutes, no network: bf16 OLMoE-1B-7B slice (full width, 64 experts top-8, 4 layers,
# seq 4096) through the trainer's step with expert-load metrics, the distributed optimizer with
# overlapped reduce/gather, and a checkpoint round trip; prints tokens/s, MFU (989 TFLOP/s), memory.
#
# The machine has Python 3.12 and torch 2.11 (CUDA 13) but no megatron-core. Put the wheels beside
# this script first, on a machine with network (they are not committed; benchmarks/gpu/wheels/ is
# git-ignored):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 megatron-core==0.16.1 -d benchmarks/gpu/wheels
#   # megatron-core needs numpy and packaging, our config code pyyaml; in case the box lacks them:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 numpy packaging pyyaml -d benchmarks/gpu/wheels
#
# Usage (repository root): bash benchmarks/gpu/run.sh          # results also in $OUT/olmoe_slice.json
#   LAYERS=2 MICRO_BATCH=4 bash benchmarks/gpu/run.sh           # other slice shapes
#   bash benchmarks/gpu/run.sh --cpu-smoke                      # the same script on CPU, tiny width
set -uo pipefail
cd "$(dirname "$0")/../.."
HERE=benchmarks/gpu
WHEELS=$HERE/wheels
PY=${PYTHON:-python3}
LAYERS=${LAYERS:-4}
MICRO_BATCH=${MICRO_BATCH:-2}
OUT_DIR=${OUT:-benchmarks/results}
mkdir -p "$OUT_DIR"

if [[ "${1:-}" == "--cpu-smoke" ]]; then  # a check of the script, not a figure: its JSON stays out of results/
    exec "$PY" $HERE/olmoe_slice.py --cpu-smoke --json "${OUT:-${TMPDIR:-/tmp}}/olmoe_slice_cpu_smoke.json"
fi

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not found"
"$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda, "| gpu", torch.cuda.is_available() and torch.cuda.get_device_name())'

echo "== megatron-core"
pip_install() {  # into the interpreter's environment; a user install where that is read-only or externally managed
    "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" "$@" \
        || "$PY" -m pip install --quiet --user --break-system-packages --no-index --find-links "$WHEELS" "$@"
}
if ! "$PY" -c 'import megatron.core' 2>/dev/null; then
    ls "$WHEELS"/megatron_core-0.16.1-cp312-*.whl >/dev/null 2>&1 \
        || { echo "no megatron_core-0.16.1 cp312 wheel in $WHEELS: see the download commands at the top of $0"; exit 2; }
    # With its dependencies from the wheels dir when they are there; without them otherwise.
    pip_install megatron-core==0.16.1 || pip_install --no-deps megatron-core==0.16.1 || exit 2
    for module_wheel in yaml:pyyaml numpy:numpy packaging:packaging; do
        "$PY" -c "import ${module_wheel%%:*}" 2>/dev/null || pip_install "${module_wheel#*:}" \
            || echo "warning: ${module_wheel#*:} is missing and not in $WHEELS"
    done
fi
"$PY" -c 'import megatron.core; print("megatron-core", megatron.core.__version__)' || exit 2
"$PY" -c 'import transformer_engine.pytorch; print("transformer_engine", transformer_engine.__version__, "(te spec)")' 2>/dev/null \
    || echo "transformer_engine: not importable (local spec: DispatchingCoreAttention on torch SDPA, torch._grouped_mm experts)"

echo "== OLMoE-1B-7B slice: $LAYERS layers, micro-batch $MICRO_BATCH x 4096"
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
export CUDA_DEVICE_MAX_CONNECTIONS=1
run_slice() {
    timeout 420 "$PY" $HERE/olmoe_slice.py --layers "$LAYERS" --micro-batch "$1" --steps 10 --warmup 3 \
        --json "$OUT_DIR/olmoe_slice.json" 2>&1 | grep -v -E 'UserWarning|warnings.warn'
    return "${PIPESTATUS[0]}"
}
run_slice "$MICRO_BATCH"
rc=$?
if [[ $rc -ne 0 && $MICRO_BATCH -gt 1 ]]; then
    echo "== failed (exit $rc); once more with micro-batch 1"
    run_slice 1
    rc=$?
fi
exit $rc
