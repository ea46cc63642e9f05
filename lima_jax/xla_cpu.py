"""What the project sets on XLA's CPU backend for speed, so that users need not.

JAX lowers its threefry random-bit generator on the CPU as a rolled loop (`lax.fori_loop` over the 5 groups
of rounds), to keep compile times short. In a train step that loop is a `while` per random draw: 18 of them
in the toy model's step (key splits and the residual-dropout masks of every layer), each iteration a round
trip through XLA's thunk executor and none fused with its consumers. Measured on the 2-core development CPU
(docs/performance.md): the toy step 81.0 -> 65.8 ms (0.81x; without dropout 58.8 ms), the peer shape 0.955x.
`unroll_threefry` registers the straight-line lowering that JAX already uses on GPU and TPU for the CPU too.
The bits are the same (the same rounds in the same order), so dropout masks, sampling and exact resume are
unchanged; tests/test_xla_cpu.py checks both.
"""
from __future__ import annotations

import logging

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
