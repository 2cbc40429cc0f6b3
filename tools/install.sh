#!/usr/bin/env bash
# bash tools/install.sh          install megatron-domain (editable) and its dependencies
# bash tools/install.sh test     ... plus the test extras
#
# torch comes first: with no torch installed, pip would resolve `torch>=2.11` to a multi-GB
# CUDA build. A CPU machine gets the CPU wheel (torch==2.13.0); a machine that already has a
# torch (e.g. your CUDA build on a GPU node) keeps it untouched.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import torch" >/dev/null 2>&1; then
  python -m pip install "torch==2.13.0"
fi
extras=""
if [ "${1:-}" = "test" ]; then extras="[test]"; fi
python -m pip install -e ".${extras}"
# pyenv installs console scripts behind shims that only appear after a rehash
if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
