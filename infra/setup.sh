#!/usr/bin/env bash
# Set up covseg on this machine: a virtual environment (.venv) with everything, telemetry off, and the
# data that data.dvc records (pulled from the DVC remote, or regenerated from the embedded default).
set -euo pipefail
cd "$(dirname "$0")/.."
export DVC_NO_ANALYTICS=1 DO_NOT_TRACK=true MLFLOW_DISABLE_TELEMETRY=true PREFECT_SERVER_ANALYTICS_ENABLED=false
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

# torch >= 2.6: before it, a crafted file runs code through torch.load(weights_only=True), which covseg loads
# every checkpoint and training state with (CVE-2025-32434). covseg refuses to load weights with it too.
require_safe_torch() {  # $1: a torch version
    local major=0 minor=0
    if [[ $1 =~ ^([0-9]+)\.([0-9]+) ]]; then major=$((10#${BASH_REMATCH[1]})) minor=$((10#${BASH_REMATCH[2]})); fi
    if (( major < 2 || (major == 2 && minor < 6) )); then
        echo "setup: torch $1 is older than 2.6, which fixed CVE-2025-32434 (weights_only bypass); install torch>=2.6" >&2
        return 1
    fi
}

if [ ! -x .venv/bin/python ]; then
    # a machine whose Python already has torch (a GPU image with its CUDA build) keeps using it; not a torch of
    # another activated virtual environment: the new one would see the machine's site-packages, not that one's
    if "$PYTHON" -c "import sys, torch; sys.exit(sys.prefix != sys.base_prefix)" 2>/dev/null; then
        "$PYTHON" -m venv --system-site-packages .venv
    else "$PYTHON" -m venv .venv; fi
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip

# torch first, pinned, so that a CPU machine never pulls the CUDA build.
if python -c "import torch" 2>/dev/null; then
    installed=$(python -c 'import torch; print(torch.__version__)')
    require_safe_torch "$installed" || exit 1       # an image's or a machine's torch is kept only with the fix
    echo "setup: using the installed torch $installed"
elif ! require_safe_torch "$TORCH_VERSION"; then
    exit 1
elif pip download -q --no-index --no-deps -d "$(mktemp -d)" "torch==$TORCH_VERSION" >/dev/null 2>&1; then
    pip install -q "torch==$TORCH_VERSION"          # a local wheel (this workplace ships the CPU build)
elif command -v nvidia-smi >/dev/null 2>&1; then
    pip install -q "torch==$TORCH_VERSION"          # GPU machine: the CUDA build from PyPI
else
    pip install -q "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu \
        --extra-index-url https://pypi.org/simple   # CPU machine: the CPU build
fi
# everything else at the exact versions tested (requirements.lock; docs/operations.md "Dependencies" says how to
# refresh), by uv where torch sits in .venv (about 20 s against pip's 47 s here), compiled to .pyc now as pip does (else
# every process compiles what it imports where PYTHONDONTWRITEBYTECODE is set: CI took 2x as long); pip where uv
# can't be had or fails, and where torch is the machine's own (uv would not see it in the system's site-packages)
if [ -z "$(python -c 'import sys, torch; print(torch.__file__.startswith(sys.prefix) or "")' 2>/dev/null)" ] \
    || ! { pip install -q -c requirements.lock uv \
           && uv pip install -q --compile-bytecode -c requirements.lock -e ".[test]"; }; then
    pip install -q -c requirements.lock -e ".[test]"
fi

# Data: data/raw as data.dvc records it.
if [ ! -f data/raw/images_medseg.npy ]; then
    if dvc pull -q data.dvc 2>/dev/null; then
        echo "setup: pulled data/raw from the DVC remote"
    else
        echo "setup: no data/raw in the DVC remote; writing the embedded synthetic default"
        covseg data synth
        git diff --quiet -- data.dvc 2>/dev/null || echo "setup: note: the regenerated data differ from data.dvc's version"
    fi
fi
# Training speed: without native bfloat16 (AVX512-BF16 or AMX) a CPU trains the default in float32, 2.5-4x slower.
if python -c "from covseg.model import bf16_autocast, pick_device; d = pick_device(); raise SystemExit(d.type != 'cpu' or bf16_autocast(d))"; then
    echo "setup: note: this CPU has no native bfloat16 (AVX512-BF16 or AMX), so the default's two networks train"
    echo "      in float32, 2.5-4x slower: 'dvc repro' takes about 5 minutes on the embedded data (estimated; 108 s"
    echo "      with it) and about 35 on the real data (estimated). 'dvc exp run -S recipe=fast' runs the one-network"
    echo "      recipe instead: 12.5 minutes on the real data, measured on such a CPU (docs/performance.md)."
fi
echo "setup: done. Next: . .venv/bin/activate && dvc repro"
