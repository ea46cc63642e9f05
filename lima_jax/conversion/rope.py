"""RoPE layouts: lima_jax and Hugging Face rotate the two *halves* of each head; Meta and llama2.c rotate
interleaved *pairs* (2i, 2i+1). The q/k projections of an interleaved source are permuted into halves on
import; nothing else needs to change, since permuting q and k alike leaves every attention score unchanged."""
from __future__ import annotations

import numpy as np


def interleaved_to_halves(w: np.ndarray) -> np.ndarray:
    """Reorders the last (head_dim) axis from pairs (0,1),(2,3),... to halves [0,2,4,...,1,3,5,...]."""
    hd = w.shape[-1]
    return w.reshape(*w.shape[:-1], hd // 2, 2).swapaxes(-1, -2).reshape(w.shape)


def halves_to_interleaved(w: np.ndarray) -> np.ndarray:
    """Inverse of `interleaved_to_halves`."""
    hd = w.shape[-1]
    return w.reshape(*w.shape[:-1], 2, hd // 2).swapaxes(-1, -2).reshape(w.shape)
