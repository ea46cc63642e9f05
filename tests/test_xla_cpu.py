"""The CPU's straight-line threefry lowering (lima_jax.xla_cpu): no loop in the compiled draw, the same bits."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp

import lima_jax.model  # noqa: F401 (importing the model installs the lowering)

DRAW = ("import json, jax, jax.numpy as jnp; key = jax.random.key(7);"
        "f = jax.jit(lambda k: (jax.random.bits(jax.random.fold_in(k, 3), (1000,), jnp.uint32),"
        " jax.random.bernoulli(jax.random.split(k)[1], 0.9, (1000,))));"
        "bits, mask = f(key); print(json.dumps([bits.tolist(), mask.tolist()]))")


def draws(prefix: str = "") -> list:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-c", prefix + DRAW], capture_output=True, text=True, check=True, env=env)
    return json.loads(run.stdout)


def test_threefry_draw_compiles_without_a_loop_on_cpu():
    compiled = jax.jit(lambda k: jax.random.bits(k, (64,), jnp.uint32)).lower(jax.random.key(0)).compile()
    assert " while(" not in compiled.as_text()


def test_unrolled_lowering_gives_jaxs_own_bits():
    """The same draws in a process with JAX's default (rolled) lowering and in one with lima_jax's."""
    ours = draws("import lima_jax.model; ")
    assert ours == draws()
    assert 850 < sum(ours[1]) < 950  # a real draw at rate 0.9, not a constant


FAULTS = ("import lima_jax.model, resource, jax, jax.numpy as jnp;"
          "f = jax.jit(lambda a, b: (jnp.tanh(a @ b) @ b.T).sum());"  # its temporary: the 64 MiB tanh(a @ b)
          "a, b = jnp.ones((8192, 64)), jnp.ones((64, 2048)) / 64; [f(a, b).block_until_ready() for _ in range(3)];"
          "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt; f(a, b).block_until_ready();"
          "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)")


def minor_faults_of_one_step(malloc: str) -> int:
    env = dict(os.environ, JAX_PLATFORMS="cpu", LIMA_JAX_MALLOC=malloc)
    run = subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True, check=True, env=env)
    return int(run.stdout.split()[-1])


def test_a_repeated_step_reuses_the_pages_of_its_temporaries():
    """glibc's defaults mmap a fresh 64 MiB block each call (16,384 pages faulted in); with LIMA_JAX_MALLOC=keep
    (keep_freed_memory) a call reuses the last one's pages."""
    assert minor_faults_of_one_step("") > 12_000
    assert minor_faults_of_one_step("keep") < 2_000
