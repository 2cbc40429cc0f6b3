"""The compiled `csrc/` extension (C++ CPU kernels, plus CUDA kernels when built with a CUDA
torch). This module is its only importer.

`setup.py` builds it as `megatron_domain._C` when torch is importable at install time
(`pip install -e . --no-build-isolation`). Otherwise `load_extension()` compiles the same
sources once with `torch.utils.cpp_extension.load` into a cache folder (about a minute on two
cores); importing the package never needs either.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from pathlib import Path
from types import ModuleType

import torch

CSRC = Path(__file__).resolve().parents[2] / "csrc"
CPU_SOURCES = ("ops.cpp", "cpu/pack_metadata.cpp", "cpu/dpo_loss.cpp", "cpu/attention_forward.cpp",
               "cpu/attention_backward.cpp", "cpu/cross_entropy_rows.cpp")
CUDA_SOURCES = ("cuda/pack_metadata.cu", "cuda/dpo_loss.cu")


def cuda_buildable() -> bool:
    """Whether the JIT build includes the CUDA half: a CUDA torch, a CUDA toolkit, and a target
    GPU architecture (a visible GPU, or TORCH_CUDA_ARCH_LIST). Without either, torch cannot pick
    an architecture (torch 2.11-2.13 fail with an IndexError), and CUDA kernels could not run
    here anyway, so the CPU-only extension is built."""
    from torch.utils.cpp_extension import CUDA_HOME

    has_target = torch.cuda.is_available() or bool(os.environ.get("TORCH_CUDA_ARCH_LIST"))
    return torch.version.cuda is not None and CUDA_HOME is not None and has_target


def extension_sources(with_cuda: bool) -> list[str]:
    """Absolute paths of the sources to compile (CUDA ones only when `with_cuda`)."""
    names = CPU_SOURCES + (CUDA_SOURCES if with_cuda else ())
    return [str(CSRC / name) for name in names]


def prebuilt_extension() -> ModuleType | None:
    """`megatron_domain._C` when setup.py built it, else None (never compiles anything)."""
    try:
        return importlib.import_module("megatron_domain._C")
    except ImportError:
        return None


@functools.cache
def load_extension() -> ModuleType:
    """The extension module: the prebuilt `megatron_domain._C`, else a JIT build of csrc/
    (cached under $MDT_EXTENSION_DIR or ~/.cache/megatron_domain/extension)."""
    prebuilt = prebuilt_extension()
    if prebuilt is not None:
        return prebuilt
    if not (CSRC / "ops.cpp").exists():
        raise RuntimeError(f"the kernels' C++/CUDA sources are not at {CSRC} and megatron_domain._C is not built; "
                           "install from a source checkout (pip install -e .) or choose the 'reference' backend")
    from torch.utils.cpp_extension import load

    with_cuda = cuda_buildable()
    build_dir = Path(os.environ.get("MDT_EXTENSION_DIR", Path.home() / ".cache" / "megatron_domain" / "extension"))
    build_dir = build_dir / ("cuda" if with_cuda else "cpu") / f"torch-{torch.__version__}"
    build_dir.mkdir(parents=True, exist_ok=True)
    # -fopenmp: at::parallel_for is serial without it (see setup.py's openmp_flags)
    openmp = ["-fopenmp"] if "OpenMP" in torch.__config__.parallel_info() and sys.platform.startswith("linux") else []
    flags = ["-O3", *openmp] + (["-DWITH_CUDA"] if with_cuda else [])
    return load(name="megatron_domain_ext", sources=extension_sources(with_cuda), extra_cflags=flags,
                extra_cuda_cflags=["-O3"], extra_include_paths=[str(CSRC)], build_directory=str(build_dir),
                with_cuda=with_cuda, verbose=False)
