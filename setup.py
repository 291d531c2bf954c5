"""OLMoE-Megatron: pretrain OLMoE-family Mixture-of-Experts models on Megatron-Core.

`parallel/`, `data/` and `launcher/` live at the repository top level and install as
`olmoe_megatron.parallel`, `olmoe_megatron.data` and `olmoe_megatron.launcher`, so nothing with
a generic name lands at the top of site-packages.
"""

from setuptools import setup

_SUBPACKAGES = {
    "olmoe_megatron.parallel": "parallel",
    "olmoe_megatron.data": "data",
    "olmoe_megatron.launcher": "launcher",
}


def _packages():
    import os

    found = []
    roots = {"olmoe_megatron": "olmoe_megatron", **_SUBPACKAGES}
    for name, root in roots.items():
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            if "__init__.py" in filenames:
                rel = os.path.relpath(dirpath, root)
                found.append(name if rel == "." else name + "." + rel.replace(os.sep, "."))
    return sorted(found)


setup(
    name="olmoe-megatron",
    version="0.1.0",
    description="OLMoE-family Mixture-of-Experts pretraining on Megatron-Core, from a laptop to Slurm clusters",
    python_requires=">=3.10",
    packages=_packages(),
    package_dir={"olmoe_megatron": "olmoe_megatron", **_SUBPACKAGES},
    # The C source of the CPU kernels, compiled on first use (olmoe_megatron/ops/cpu).
    package_data={"olmoe_megatron": ["ops/cpu/kernels.c", "studies/builtin/*.yaml"]},
    install_requires=[
        # CPU machines: 2.13.0 from local disk; clusters: any CUDA build >= 2.6.
        "torch>=2.6",
        "megatron-core==0.16.1",
        "numpy>=1.24",
        "zarr>=3",
        "pyyaml>=6",
        "xxhash>=3",  # checkpoint manifests: the xxh3_64 checksum of every file
        "psutil>=5.9",  # dist_checkpointing.save hangs without it (megatron-core does not declare it)
        "tokenizers>=0.15",
        "tiktoken>=0.9",  # olmoe prep tokenize: the exact fast path for byte-level BPE (data/fast_tokenizer.py)
        "zstandard>=0.21",  # olmoe prep tokenize: .jsonl.zst inputs
        "pyarrow>=14",  # olmoe prep tokenize: parquet inputs
    ],
    extras_require={
        # Transformer Engine needs a CUDA torch; never install it on a CPU machine
        # (megatron-core then fails to import). Apex has no PyPI release: build it from source
        # on the cluster (see README).
        "gpu": ["transformer-engine[pytorch]>=2.9.0a0,<2.12.0"],  # megatron-core 0.16.1's declared range
        "hf": ["transformers>=4.46", "safetensors>=0.4"],
        # lm-evaluation-harness with our model adapter (`olmoe lm-eval` / `olmoe-lm-eval`).
        "eval": ["lm-eval>=0.4.13,<0.5"],
        "plot": ["matplotlib>=3.7"],
        "tb": ["tensorboard>=2.14"],
        "wandb": ["wandb>=0.17"],  # metrics.wandb_project (offline without network)
        "test": ["pytest>=7"],
    },
    entry_points={"console_scripts": [
        "olmoe=olmoe_megatron.launcher.cli:main",
        # lm-eval 0.4 has no model plugin entry points: this registers ours, then runs lm-eval's CLI.
        "olmoe-lm-eval=olmoe_megatron.launcher.commands.lm_eval:main",
    ]},
)
