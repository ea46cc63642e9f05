"""RoPE in checkpoints: weight layouts, and the RoPE settings of Hugging Face's config.json and Meta's
params.json as ModelConfig fields.

Layouts: lima_jax and Hugging Face rotate the two *halves* of each head; Meta and llama2.c rotate interleaved
*pairs* (2i, 2i+1). The q/k projections of an interleaved source are permuted into halves on import; nothing
else needs to change, since permuting q and k alike leaves every attention score unchanged.

Settings: `rope_type` "default" or "llama3" (LLaMA-3.1/3.2's scaled RoPE, `model.llama3_scaled_frequencies`).
transformers 4 reads `rope_theta` and `rope_scaling`; transformers 5 reads `rope_parameters`, but a non-null
`rope_scaling` takes its place there (with `rope_theta` beside it). An export writes all three with the same
values; an import takes what transformers 5 would and refuses a config.json on which the two disagree."""
from __future__ import annotations

from typing import Any

import numpy as np

from lima_jax.config import ModelConfig, rope_problem
from lima_jax.conversion.source import require

# Hugging Face's llama3 keys -> ModelConfig fields
HF_LLAMA3_KEYS = {"factor": "rope_scaling_factor", "low_freq_factor": "rope_low_freq_factor",
                  "high_freq_factor": "rope_high_freq_factor",
                  "original_max_position_embeddings": "rope_original_max_seq_len"}
_HF_ROPE_TYPES = ("default", "llama3")
# Meta's scaled RoPE (llama-models, models/llama3 `apply_scaling`): factor 8, low 1, high 4, original 8,192.
# Its params.json says only `use_scaled_rope: true`; LLaMA-3.2 1B and 3B were trained with factor 32 (the
# factor of their Hugging Face config.json, confirmed by Meta in meta-llama/llama-models#166 and #241, while the
# reference code keeps 8), so a params.json of their shape (dim, n_layers) gets 32. A params.json that gives
# rope_scaling_factor / rope_high_freq_factor (later releases) is taken at its word.
META_LLAMA3_ROPE = {"rope_scaling_factor": 8.0, "rope_low_freq_factor": 1.0, "rope_high_freq_factor": 4.0,
                    "rope_original_max_seq_len": 8192}
META_LLAMA32_SHAPES = {(2048, 16): "LLaMA-3.2 1B", (3072, 28): "LLaMA-3.2 3B"}
META_LLAMA32_FACTOR = 32.0


def interleaved_to_halves(w: np.ndarray) -> np.ndarray:
    """Reorders the last (head_dim) axis from pairs (0,1),(2,3),... to halves [0,2,4,...,1,3,5,...]."""
    hd = w.shape[-1]
    return w.reshape(*w.shape[:-1], hd // 2, 2).swapaxes(-1, -2).reshape(w.shape)


def halves_to_interleaved(w: np.ndarray) -> np.ndarray:
    """Inverse of `interleaved_to_halves`."""
    hd = w.shape[-1]
    return w.reshape(*w.shape[:-1], 2, hd // 2).swapaxes(-1, -2).reshape(w.shape)


def hf_rope_config(cfg: ModelConfig) -> dict[str, Any]:
    """config.json's RoPE keys for `cfg`: `rope_parameters` (transformers 5), `rope_scaling` (null for the
    default RoPE) and `rope_theta` (transformers 4; 5 uses them too), all with the same values."""
    scaling = None
    if cfg.rope_type != "default":
        scaling = {"rope_type": cfg.rope_type, **{key: getattr(cfg, field) for key, field in HF_LLAMA3_KEYS.items()}}
    parameters = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta, **(scaling or {})}
    return {"rope_parameters": parameters, "rope_scaling": scaling, "rope_theta": cfg.rope_theta}


def _hf_rope_dict(hf: dict, key: str, where: Any) -> dict | None:
    value = hf.get(key)
    require(value is None or isinstance(value, dict), where, f"{key}={value!r}: expected an object or null")
    if not value:
        return None
    value = dict(value)
    value["rope_type"] = value.pop("type", value.get("rope_type", "default"))  # "type": transformers < 4.45
    return value


def hf_rope_fields(hf: dict, where: Any) -> dict[str, Any]:
    """ModelConfig's RoPE fields (rope_theta, rope_type and the llama3 parameters) of a config.json in the
    transformers 4 form (`rope_theta`, `rope_scaling`) or 5 form (`rope_parameters`); ConversionError naming
    the key for another RoPE type, a missing or illegal llama3 parameter, or forms that disagree."""
    scaling, parameters = _hf_rope_dict(hf, "rope_scaling", where), _hf_rope_dict(hf, "rope_parameters", where)
    name, rope = ("rope_scaling", scaling) if scaling else ("rope_parameters", parameters or {})
    if scaling and parameters:
        differing = sorted(k for k in (set(scaling) | set(parameters)) - {"rope_theta"}
                           if scaling.get(k) != parameters.get(k))
        require(not differing, where, f"rope_scaling and rope_parameters disagree on {differing} "
                f"({scaling} vs {parameters}): transformers 4 reads rope_scaling and ignores rope_parameters")
    rope_type = rope.get("rope_type", "default")
    require(rope_type in _HF_ROPE_TYPES, where, f"{name}.rope_type={rope_type!r}: only {_HF_ROPE_TYPES} RoPE is "
            "supported")
    known = {"rope_type", "rope_theta"} | (set(HF_LLAMA3_KEYS) if rope_type == "llama3" else set())
    unknown = sorted(set(rope) - known)
    require(not unknown, where, f"{name} has {unknown}, unknown to the converter for rope_type={rope_type!r} (it "
            f"may change the model; supported: {sorted(known)})")
    thetas = {key: value for key, value in (("rope_theta", hf.get("rope_theta")),
                                            ("rope_scaling.rope_theta", (scaling or {}).get("rope_theta")),
                                            ("rope_parameters.rope_theta", (parameters or {}).get("rope_theta")))
              if value is not None}
    require(len(set(thetas.values())) <= 1, where, "rope_theta differs: " + ", ".join(
        f"{key}={value!r}" for key, value in thetas.items()) + " (transformers 4 and 5 would read different ones)")
    fields: dict[str, Any] = {"rope_theta": float(next(iter(thetas.values()), 10000.0)), "rope_type": rope_type}
    if rope_type == "llama3":
        for key, field in HF_LLAMA3_KEYS.items():
            require(rope.get(key) is not None, where, f"{name}.{key} missing (needed with rope_type 'llama3')")
            fields[field] = rope[key]
        problem = rope_problem(**_problem_args(fields))
        if problem is not None:
            key = {v: k for k, v in HF_LLAMA3_KEYS.items()}[problem[0]]
            require(False, where, f"{name}.{key}={rope[key]!r}: {problem[1]}")
        for field in ("rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor"):
            fields[field] = float(fields[field])
    return fields


def _problem_args(fields: dict[str, Any]) -> dict[str, Any]:
    return {"rope_type": fields["rope_type"], "factor": fields.get("rope_scaling_factor"),
            "low_freq_factor": fields.get("rope_low_freq_factor"),
            "high_freq_factor": fields.get("rope_high_freq_factor"),
            "original_max_seq_len": fields.get("rope_original_max_seq_len")}


def meta_rope_fields(params: dict, where: Any) -> dict[str, Any]:
    """ModelConfig's RoPE fields of a Meta params.json: `use_scaled_rope: true` is Meta's llama3 scaling
    (`META_LLAMA3_ROPE`; factor 32 for the LLaMA-3.2 1B/3B shapes, see above), with params.json's own
    rope_scaling_factor / rope_high_freq_factor when it gives them."""
    fields: dict[str, Any] = {"rope_theta": float(params.get("rope_theta", 10000.0)), "rope_type": "default"}
    if not params.get("use_scaled_rope"):
        return fields
    fields.update(rope_type="llama3", **META_LLAMA3_ROPE)
    if (params.get("dim"), params.get("n_layers")) in META_LLAMA32_SHAPES:
        fields["rope_scaling_factor"] = META_LLAMA32_FACTOR
    for key in ("rope_scaling_factor", "rope_high_freq_factor"):
        if params.get(key) is not None:
            fields[key] = params[key]
    problem = rope_problem(**_problem_args(fields))
    require(problem is None, where, f"use_scaled_rope=true with {problem and problem[0]}="
            f"{problem and fields[problem[0]]!r}: {problem and problem[1]}")
    for key in ("rope_scaling_factor", "rope_high_freq_factor"):
        fields[key] = float(fields[key])
    return fields


def describe_rope(cfg: ModelConfig) -> str:
    """One phrase for the tools' output, e.g. "RoPE theta 500000, llama3 scaling (factor 8, ...)"."""
    text = f"RoPE theta {cfg.rope_theta:g}"
    if cfg.rope_type == "default":
        return text
    return (f"{text}, {cfg.rope_type} scaling (factor {cfg.rope_scaling_factor:g}, low/high frequency factors "
            f"{cfg.rope_low_freq_factor:g}/{cfg.rope_high_freq_factor:g}, original context "
            f"{cfg.rope_original_max_seq_len})")
