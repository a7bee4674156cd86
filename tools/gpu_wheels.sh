#!/usr/bin/env bash
# Download, on a machine with the package registry, the wheels a GPU machine without network needs
# beyond what its image has, so that there
#
#     python3 -m pip install -q --no-index --no-deps DIR/*.whl
#
# installs them offline (into the image's own Python, beside its nvidia-cuda-runtime headers, where
# reft's toolchain looks for CCCL; see docs/gpu-validation.md). Then tools/gpu_check.py runs there.
#
# usage: tools/gpu_wheels.sh [DIR] [--full]       DIR defaults to .whl (git-ignored); PYVER (3.12) is the GPU
#                                                 machine's Python, PYTHON the one whose installed
#                                                 versions are pinned (.venv/bin/python)
#
# default  what the H200 image lacks (its package list is in the device notes): CCCL 13.0 (cuda/std
#          for CuTe; 13.3's CCCL 3.5 breaks CUTLASS 4.2), CUTLASS/CuTe headers, and reft's own
#          dependencies it lacks: about 25 MB.
# --full   also the CUDA toolchain as CI pins it (cuda-python, NVRTC 13.5, the runtime headers,
#          cuobjdump, nvdisasm): about 75 MB more, over what one device call carries (64 MiB with the
#          working tree), and it replaces the image's NVRTC 13.0 that its PyTorch was built with.
#          Only for when the image's own NVRTC cannot be used.
set -euo pipefail
cd "$(dirname "$0")/.."

dir=.whl
full=0
for a in "$@"; do
    case "$a" in
        --full) full=1 ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        -*) echo "error: unknown option $a" >&2; exit 2 ;;
        *) dir=$a ;;
    esac
done
pyver=${PYVER:-3.12}
python=${PYTHON:-.venv/bin/python}
[ -x "$python" ] || python=python3

# name==version as installed in $python (what CI tests), else the pin given here
pin() {
    local name=$1 fallback=$2 v
    v=$("$python" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name" 2>/dev/null) || v=$fallback
    echo "$name==$v"
}

wheels=(
    "$(pin nvidia-cuda-cccl 13.0.85)"
    "$(pin nvidia-cutlass 4.2.0.0)"
    # reft's dependencies missing from the image (the server's; the image has numpy, ml-dtypes,
    # click, jinja2, tokenizers, tqdm, networkx, prometheus-client, h11, annotated-doc)
    "$(pin fastapi 0.165.0)" "$(pin starlette 1.10.0)" "$(pin pydantic 2.14.4)" "$(pin pydantic-core 2.50.5)"
    "$(pin annotated-types 0.8.0)" "$(pin typing-inspection 0.4.5)" "$(pin uvicorn 0.54.0)"
    "$(pin scipy-openblas32 0.3.34.481.3)" "$(pin llguidance 1.9.1)"
)
if [ "$full" = 1 ]; then
    wheels+=("$(pin cuda-python 13.4.4)" "$(pin cuda-bindings 13.4.4)" "$(pin cuda-pathfinder 1.9.1)"
             "$(pin nvidia-cuda-nvrtc 13.5.37)" "$(pin nvidia-cuda-runtime 13.5.37)"
             "$(pin nvidia-cuda-cuobjdump 13.5.37)" "$(pin nvidia-cuda-nvdisasm 13.5.37)")
fi

platforms=()
for p in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_24_x86_64 manylinux_2_27_x86_64 \
         manylinux_2_28_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64 \
         manylinux_2_12_x86_64 manylinux2010_x86_64 manylinux1_x86_64 linux_x86_64; do
    platforms+=(--platform "$p")
done

mkdir -p "$dir"
for w in "${wheels[@]}"; do
    # one at a time, without dependencies: each name above is the whole list, one version each
    "$python" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
        "${platforms[@]}" -d "$dir" "$w"
done
du -ch "$dir"/*.whl | tail -1 | sed "s|total|in $dir (one version of each: pip install refuses two)|"
ls "$dir"
