"""The installed package: importable from anywhere (not only from the repository root), with its data."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import lima_jax


def test_lima_jax_is_a_regular_package_with_its_judge_prompt():
    # A namespace package (no __init__.py) imports from the repository root but is missed by
    # find_packages, so `pip install` would install nothing.
    spec = importlib.util.find_spec("lima_jax")
    assert spec.origin is not None and spec.origin.endswith("__init__.py")
    prompts = os.path.join(os.path.dirname(lima_jax.__file__), "prompts")
    assert any(name.endswith(".txt") for name in os.listdir(prompts))


def test_tools_run_from_outside_the_repository(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, "-m", "lima_jax.train", "--help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert "No module named" not in proc.stderr, proc.stderr
    assert "--config" in proc.stdout
