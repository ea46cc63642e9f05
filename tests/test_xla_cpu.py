"""What lima_jax.xla_cpu sets on the CPU: the straight-line threefry lowering (no loop in the compiled draw, the
same bits) and a step that reuses its temporaries' pages."""
import json
import os
import pathlib
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


REPO = pathlib.Path(__file__).resolve().parent.parent
FAULTS = ("import lima_jax.model, lima_jax.sharding, lima_jax.config, resource, jax, jax.numpy as jnp;"
          f"lima_jax.sharding.make_mesh(lima_jax.config.load_config_file({str(REPO / 'configs' / 'toy.py')!r}),"
          " jax.devices()[:1]);"  # a CPU mesh, as every tool makes one: glibc keeps freed memory from here on
          "f = jax.jit(lambda a, b: (jnp.tanh(a @ b) @ b.T).sum());"  # its temporary: the 64 MiB tanh(a @ b)
          "a, b = jnp.ones((8192, 64)), jnp.ones((64, 2048)) / 64; [f(a, b).block_until_ready() for _ in range(3)];"
          "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt; f(a, b).block_until_ready();"
          "print(jax.config.values['jax_cpu_enable_async_dispatch'],"
          " resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)")


def one_step(malloc: str | None) -> tuple[str, int]:
    """(JAX's async-dispatch flag, minor page faults of one call after three) in a fresh process."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("LIMA_JAX_MALLOC", None)
    env.pop("JAX_CPU_ENABLE_ASYNC_DISPATCH", None)
    if malloc is not None:
        env["LIMA_JAX_MALLOC"] = malloc
    run = subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True, check=True, env=env)
    dispatch, faults = run.stdout.split()[-2:]
    return dispatch, int(faults)


def test_a_repeated_cpu_step_reuses_the_pages_of_its_temporaries():
    """lima_jax runs a CPU computation on the calling thread and keeps freed memory, so a call reuses the last
    one's pages; with LIMA_JAX_MALLOC=default (JAX's async dispatch, glibc's defaults) glibc mmaps a fresh
    64 MiB block for each call (16,384 pages faulted in)."""
    dispatch, faults = one_step(None)
    assert dispatch == "False" and faults < 2_000
    dispatch, faults = one_step("default")
    assert dispatch == "True" and faults > 12_000
