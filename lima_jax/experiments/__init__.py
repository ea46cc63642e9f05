"""Experiments that reproduce LIMA's findings with the project's own workflows (train, dev report, generate)."""
