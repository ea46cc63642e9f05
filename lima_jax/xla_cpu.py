"""What the project sets on XLA's CPU backend for speed, so that users need not.

JAX lowers its threefry random-bit generator on the CPU as a rolled loop (`lax.fori_loop` over the 5 groups
of rounds), to keep compile times short. In a train step that loop is a `while` per random draw: 18 of them
in the toy model's step (key splits and the residual-dropout masks of every layer), each iteration a round
trip through XLA's thunk executor and none fused with its consumers. Measured on the 2-core development CPU
(docs/performance.md): the toy step 81.0 -> 65.8 ms (0.81x; without dropout 58.8 ms), the peer shape 0.955x.
`unroll_threefry` registers the straight-line lowering that JAX already uses on GPU and TPU for the CPU too.
The bits are the same (the same rounds in the same order), so dropout masks, sampling and exact resume are
unchanged; tests/test_xla_cpu.py checks both.

XLA's CPU client allocates each execution's temporaries with `malloc` and frees them when the step ends. By
default JAX dispatches CPU computations asynchronously, so that `malloc` runs on one of the client's worker
threads, and glibc serves a block that large (the peer shape's step: one 699 MiB buffer) from a fresh `mmap`
each time, since a worker thread's arena cannot hold it and glibc's `M_MMAP_MAX` does not bind there. Every
step then page-faults all of it in again: 179,000 minor faults per step, about a sixth of the step. The
project therefore (1) runs CPU computations on the thread that calls them (`run_cpu_computations_inline`,
when `lima_jax.model` is imported: JAX's `jax_cpu_enable_async_dispatch=False`), so the block comes from the
main heap, and (2) once a mesh of CPU devices is made (`sharding.make_mesh`), tells glibc never to `mmap` a
block and never to give freed memory back (`keep_freed_memory`), so a step reuses the last one's pages. On
the 2-core development CPU: the peer step 1,236-1,268 -> 1,050 ms (0.83x), the toy step unchanged (27-29 vs
27-30 ms). What asynchronous dispatch overlapped with a step, the training loop now does on threads (the next
batch: `data.prefetch`; the metrics' writing: `metrics.MetricsWriter`); the toy's training loop, whose steps
are small, still lost a little: median step 20.3-20.9 against 18.2-20.3 ms. Accelerator hosts keep glibc's
defaults (their steps' temporaries are device memory). The process keeps its peak heap until it exits.
`LIMA_JAX_MALLOC=default` (or JAX's own `JAX_CPU_ENABLE_ASYNC_DISPATCH`) leaves JAX's and glibc's defaults.
"""
from __future__ import annotations

import ctypes
import logging
import os

import jax

log = logging.getLogger(__name__)


def unroll_threefry() -> bool:
    """Lowers threefry2x32 on the CPU without the rolled loop; False (and a warning) if this JAX version
    lacks the private names it needs, leaving JAX's default."""
    try:
        from jax._src.interpreters import mlir
        from jax._src.random import threefry2x32 as threefry

        primitive, unrolled = threefry.threefry2x32_p, threefry._threefry2x32_lowering_rule
    except (ImportError, AttributeError) as e:
        log.warning("jax %s: threefry's lowering not found (%s); CPU random draws keep JAX's rolled loop",
                    jax.__version__, e)
        return False
    mlir.register_lowering(primitive, unrolled, platform="cpu")
    return True


def _left_to_defaults() -> bool:
    """LIMA_JAX_MALLOC=default, or the user chose JAX's CPU dispatch: JAX's and glibc's defaults both."""
    return os.environ.get("LIMA_JAX_MALLOC", "") == "default" or "JAX_CPU_ENABLE_ASYNC_DISPATCH" in os.environ


def run_cpu_computations_inline() -> bool:
    """Makes JAX's CPU client run a computation on the calling thread (see the module docstring). Must run
    before JAX's backends exist; False (and a warning) if they already do, or when the user chose JAX's
    dispatch (JAX_CPU_ENABLE_ASYNC_DISPATCH) or LIMA_JAX_MALLOC=default."""
    chosen = os.environ.get("LIMA_JAX_MALLOC", "")
    if chosen not in ("", "default"):
        log.warning("LIMA_JAX_MALLOC=%r is not a known setting (only 'default', which leaves JAX's and glibc's "
                    "defaults, is read): lima_jax's CPU memory setting applies", chosen)
    if _left_to_defaults():
        return False
    try:
        from jax._src import xla_bridge

        started = xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):
        started = False
    if started:
        log.warning("JAX's backends were created before lima_jax.model was imported: CPU computations keep "
                    "JAX's asynchronous dispatch, and each step's temporaries are page-faulted in again")
        return False
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    return True


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory(platform: str) -> bool:
    """On the CPU platform, makes glibc keep freed memory for reuse (no mmap'd blocks, no trimming; see the
    module docstring). False on other platforms, when left to the defaults (LIMA_JAX_MALLOC=default,
    JAX_CPU_ENABLE_ASYNC_DISPATCH set), or where the C library is not glibc."""
    if platform != "cpu" or _left_to_defaults():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl without mallopt)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2 ** 31 - 1)))
