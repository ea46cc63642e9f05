"""The benchmark tool: variants from the command line, packed random rows, the records of a short toy run."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from lima_jax import bench as bench_cli
from lima_jax.analysis import bench
from lima_jax.errors import ConfigError


def test_sweeps_cross_and_override_sets_follow():
    variants = bench.parse_variants(["model.remat_policy=none,full", "config.data.max_len=64,128"],
                                    ["model.compute_dtype=bfloat16 train.batch_size=4"])
    assert [v.overrides for v in variants] == [
        (("model.remat_policy", "none"), ("data.max_len", "64")),
        (("model.remat_policy", "none"), ("data.max_len", "128")),
        (("model.remat_policy", "full"), ("data.max_len", "64")),
        (("model.remat_policy", "full"), ("data.max_len", "128")),
        (("model.compute_dtype", "bfloat16"), ("train.batch_size", "4")),
    ]
    assert variants[1].label == "model.remat_policy=none data.max_len=128"
    assert bench.parse_variants([], []) == [bench.Variant("base")]
    with pytest.raises(ConfigError, match="expected FIELD=VALUE"):
        bench.parse_variants(["model.remat_policy"], [])


def test_a_bad_override_is_refused_before_compiling(toy_config):
    with pytest.raises(ConfigError, match="has no field 'model.no_such'"):
        next(bench.run(toy_config, bench.parse_variants(["model.remat_policy=none"], ["model.no_such=1"])))
    with pytest.raises(ConfigError, match="model.remat_policy"):
        next(bench.run(toy_config, bench.parse_variants(["model.remat_policy=sometimes"], [])))


def test_packed_rows_restart_positions_and_never_target_across_segments(toy_config):
    batch = bench.packed_batch(toy_config, vocab_size=100, rows=2, segments=3)
    length = toy_config.data.max_len
    assert all(v.shape == (2, length) for v in batch.values())
    ids, positions, weights = batch["segment_ids"][0], batch["positions"][0], batch["weights"][0]
    assert sorted(set(ids)) == [1, 2, 3]
    for segment in (1, 2, 3):
        where = np.flatnonzero(ids == segment)
        assert list(positions[where]) == list(range(len(where)))
        assert weights[where[-1]] == 0 and weights[where[:-1]].all()
    assert (batch["targets"][:, :-1] == batch["tokens"][:, 1:]).all()
    with pytest.raises(ConfigError, match="--segments"):
        bench.packed_batch(toy_config, 100, 2, segments=length)


def test_ratios_divide_by_the_first_variant():
    records = [{"kind": "train", "variant": "a", "step_s_median": 2.0, "tokens_per_s": 10.0,
                "compiled_peak_gib": 4.0, "compile_s": 1.0},
               {"kind": "decode", "variant": "a"},
               {"kind": "train", "variant": "b", "step_s_median": 1.0, "tokens_per_s": 20.0,
                "compiled_peak_gib": None, "compile_s": 3.0}]
    assert bench.ratios(records) == [{"kind": "ratio", "variant": "b", "baseline": "a", "step_s": 0.5,
                                      "tokens_per_s": 2.0, "compiled_peak_gib": None, "compile_s": 3.0}]


def test_toy_run_writes_sane_json_lines(toy_config, tmp_path, capsys):
    """Two timed steps of the toy model on packed rows and a short decode: every figure present, finite and
    consistent; the analytic FLOPs are the HLO's loop-aware dot count and exceed XLA's (which counts the
    scanned layers once)."""
    out = tmp_path / "bench.jsonl"
    # reference attention: the blocked kernel's backward recomputes QK^T, FLOPs the analytic model count omits;
    # the layer scan kept as on accelerators (not unrolled), whose body XLA's cost analysis counts once
    bench_cli.main(["--config", toy_config.source_file, "--config.model.attention=reference",
                    "--config.model.scan_unroll=1", "--steps", "2", "--warmup", "1", "--segments", "2",
                    "--peak_tflops", "0.5", "--decode_batches", "2", "--decode_tokens", "4", "--decode_runs", "1",
                    "--out", str(out)])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["kind"] for r in records] == ["train", "decode", "decode"]
    train, greedy, sampled = records
    for key in ("step_s_median", "step_s_min", "tokens_per_s", "analytic_tflop", "xla_cost_tflop",
                "hlo_dot_tflop", "achieved_tflops_analytic", "compile_s", "compiled_peak_gib", "mfu"):
        assert isinstance(train[key], float) and math.isfinite(train[key]) and train[key] > 0, key
    assert train["tokens_per_step"] == 8 * toy_config.data.max_len and train["segments_per_row"] == 2
    assert train["tokens_per_s"] == pytest.approx(train["tokens_per_step"] / train["step_s_median"])
    assert train["step_s_min"] <= train["step_s_median"]
    assert train["hlo_dot_tflop"] == pytest.approx(train["analytic_tflop"], rel=0.02)
    assert train["analytic_tflop"] > train["xla_cost_tflop"]
    assert train["mfu"] == pytest.approx(train["achieved_tflops_analytic"] / (0.5 * train["num_devices"]))
    assert train["device_peak_gib"] is None and train["platform"] == "cpu"  # CPU devices keep no statistics
    assert math.isfinite(train["last_loss"])
    assert (greedy["mode"], sampled["mode"]) == ("greedy", "lima_sampling")
    for r in (greedy, sampled):
        assert r["batch"] == 2 and r["rows_decoded"] == 8  # rounded up to the 8 data-parallel devices
        assert r["tokens_per_s"] == pytest.approx(2 * 4 / r["s_median"]) and r["s_median"] > 0
    assert sampled["vs_greedy"] == pytest.approx(sampled["tokens_per_s"] / greedy["tokens_per_s"])
    stdout = capsys.readouterr().out.splitlines()
    assert [json.loads(line) for line in stdout if line.startswith("{")] == records


def test_help_exits_0():
    result = subprocess.run([sys.executable, "-m", "lima_jax.bench", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "--vs" in result.stdout and "MFU" in result.stdout
