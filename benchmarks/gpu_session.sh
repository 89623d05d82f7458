#!/usr/bin/env bash
# The one script a session runs when the device tool lends it a GPU (issue 18, part 5).
#
# The lent machine has torch, nvcc, ninja, setuptools, typer, rich, pillow and pytest, but
# no registry: what else ipltool needs travels as wheels. Here, once per session:
#
#     bash benchmarks/gpu_session.sh --wheels        # downloads them into .whl/ (git-ignored)
#
# then one device call, carrying .whl (about 10 MB):
#
#     run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=590)
#
# It runs, each step with its own time limit so one hang cannot eat the lease, all of them
# inside one budget (BUDGET seconds, default 570: a device call may run 600), most
# important first, each writing its log under $OUT (they come back):
#   1. nvidia-smi, the install of ipltool and its wheels into /tmp/site;
#   2. the kernel build for sm_90 (timed) and the GPU-marked tests (compiled kernels
#      against the native ops, tests/test_kernels_compiled.py);
#   3. benchmarks/full_adapt.py: a whole `ipl adapt` at 1024 px, config-f and ViT-B/32 random
#      weights, bf16 with the compiled kernels, 30 + 30 steps projected to 300 + 300, with
#      `--chunk 4`: the layer choice's 8 images with gradients at once hold 11.9 GiB of
#      tensors in bf16, by 4 6.6 GiB (benchmarks/peak_memory.py on a CPU), and the target
#      is 12 GB of GPU memory. Its peak allocated and reserved memory come back in the JSON;
#   4. benchmarks/gpu_speed.py: native vs compiled kernels, fp32 vs bf16, stage 1, stage 2,
#      stylize, peak GPU memory, in whatever time is left (it prints each cell as it ends).
# The figures go into benchmarks/RESULTS.md by hand, with the device the reply names.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--wheels" ]; then
    # Python 3.12 wheels of what the device image lacks (KINDS.md lists what it has).
    exclude=$(git rev-parse --git-path info/exclude) && mkdir -p "$(dirname "$exclude")" \
        && { grep -qx "/.whl/" "$exclude" 2>/dev/null || echo "/.whl/" >> "$exclude"; }
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
        open_clip_torch ftfy wcwidth pydantic pydantic_core annotated_types typing_inspection typing_extensions tomli_w platformdirs
    ls -la .whl
    exit 0
fi

OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
BUDGET=${BUDGET:-570}
step() { echo "== $1 ($(date +%T), ${SECONDS}s of ${BUDGET}s)"; }
# A step's time limit: its own, or what is left of the budget if that is less.
limit() { local left=$((BUDGET - SECONDS)); [ "$left" -lt "$1" ] && echo $((left > 1 ? left : 1)) || echo "$1"; }

step "machine"
nvidia-smi 2>&1 | tee "$OUT/nvidia-smi.txt" | head -15
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"

step "install"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
# ipltool itself, so its entry points (mappers, encoders) are registered
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site . || exit 1
export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=9.0 IPL_CACHE=/tmp/ipl-cache

step "kernels build"
( time timeout "$(limit 240)" ipl kernels build --arch 9.0 ) 2>&1 | tee "$OUT/kernels.log" | tail -5

step "GPU tests"
timeout "$(limit 120)" python3 -m pytest -q -n 0 -p no:cacheprovider -m gpu tests/test_kernels_compiled.py 2>&1 | tee "$OUT/tests.log" | tail -15

step "whole adapt, 1024 px, bf16, compiled kernels"
IPL_KERNELS=cuda timeout "$(limit 150)" python3 benchmarks/full_adapt.py --size 1024 --device cuda --precision bf16 \
    --mapper-steps 30 --adapt-steps 30 --chunk 4 2>&1 | tee "$OUT/full_adapt.log" | tail -3

step "gpu_speed"
timeout "$(limit 300)" python3 benchmarks/gpu_speed.py --steps 3 --photos 16 --repeats 10 --no-write 2>&1 | tee "$OUT/gpu_speed.log" | tail -30
step "done"
