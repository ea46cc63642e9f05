"""Pairwise preference evaluation (LIMA section 3): response pairs, human and model judges, statistics.
The command line is `python -m lima_jax.eval`."""
