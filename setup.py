"""megatron-domain packaging.

CPU machines: install torch's CPU wheel first (`pip install torch==2.13.0`, or run
`bash tools/install.sh`), so that the `torch>=2.11` requirement below is already met and pip
never pulls a CUDA build. GPU machines keep their existing CUDA torch for the same reason.
"""

from setuptools import find_packages, setup

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
    ],
    extras_require={
        # torchao: NF4 base weights for QLoRA (and FP8 later); peft: the tests load our exported
        # LoRA adapters with it
        "test": ["pytest>=8", "torchao>=0.18", "peft>=0.21"],
        "qlora": ["torchao>=0.18"],
        "gpu": ["flash-attn", "transformer-engine[pytorch]", "vllm", "torchao>=0.18"],
    },
    entry_points={"console_scripts": ["mdt=megatron_domain.cli:main"]},
)
