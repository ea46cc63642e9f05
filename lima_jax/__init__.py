"""lima_jax: the LIMA recipe (full supervised fine-tuning of a pretrained LLaMA on ~1,000 curated examples)
in JAX/Flax, on TPU pod slices, GPUs and CPU.

One module per concern: `model`, `sharding`, `data`, `optim`, `checkpoint`, `train`, `generate`, `report`,
`eval`, `convert`, `layouts`, `bench`; each tool runs as `python -m lima_jax.<tool> --help`.
"""
__version__ = "0.1.0"
