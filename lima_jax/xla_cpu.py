"""What the project sets on XLA's CPU backend for speed, so that users need not.

JAX lowers its threefry random-bit generator on the CPU as a rolled loop (`lax.fori_loop` over the 5 groups
of rounds), to keep compile times short. In a train step that loop is a `while` per random draw: 18 of them
in the toy model's step (key splits and the residual-dropout masks of every layer), each iteration a round
trip through XLA's thunk executor and none fused with its consumers. Measured on the 2-core development CPU
(docs/performance.md): the toy step 81.0 -> 65.8 ms (0.81x; without dropout 58.8 ms), the peer shape 0.955x.
`unroll_threefry` registers the straight-line lowering that JAX already uses on GPU and TPU for the CPU too.
The bits are the same (the same rounds in the same order), so dropout masks, sampling and exact resume are
unchanged; tests/test_xla_cpu.py checks both.

XLA's CPU client allocates each execution's temporaries with `malloc` from its worker threads and frees them
when the step ends. A block that large (the peer shape's step: one 699 MiB buffer) comes from a fresh `mmap`
each time (glibc's per-thread arenas cannot hold it), so every step page-faults all of it in again: 179,000
minor faults per step, about a sixth of the step. `keep_freed_memory` (opt-in: `LIMA_JAX_MALLOC=keep` in the
environment) tells glibc to serve every thread from the main heap, never to `mmap` a block and never to give
freed memory back, so a step reuses the last one's pages. On the 2-core development CPU: the peer step
1,215 -> 1,015 ms (0.83x), but the toy step (small temporaries, many small allocations from two threads on one
arena) 26-28 -> 31-32 ms (1.15x), hence not the default. The process then keeps its peak heap until it exits.
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


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def keep_freed_memory() -> bool:
    """Makes glibc keep freed memory for reuse (one arena, no mmap'd blocks, no trimming; see the module
    docstring) when LIMA_JAX_MALLOC=keep. Takes effect for threads that start afterwards, so call it before JAX's
    backend exists. False when not asked for or where the C library is not glibc."""
    if os.environ.get("LIMA_JAX_MALLOC", "") != "keep":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl without mallopt)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in
               ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2 ** 31 - 1)))
