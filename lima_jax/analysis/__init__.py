"""Analysis of the compiled train step: HLO accounting (`hlo`), the accelerators compiled for (`hardware`),
the comparison of sharding layouts (`layouts`) and its outputs (`layout_report`). The command line is
`python -m lima_jax.layouts`."""
