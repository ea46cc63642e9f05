"""The recipe's cost estimate (`lima_jax.analysis.estimate`, `python -m lima_jax.layouts --estimate`): the step
plan from the data, the saves, the split of the wall time and its consistency."""
from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import pytest

from lima_jax import data
from lima_jax.analysis import estimate, hardware
from lima_jax.analysis.layouts import LayoutReport, analytic_flops
from lima_jax.config import model_config
from lima_jax.tokenizer import load_tokenizer

SLICE = estimate.SliceSpec("test slice", chips=8, hosts=2, peak_tflops=100.0, hbm_gbps=1000.0, source="test")


@pytest.fixture
def toy_examples(toy_config):
    tokenizer = load_tokenizer(toy_config)
    return data.load_examples(toy_config.data.train_path, tokenizer, toy_config.data.max_len).examples


def _report(**fields) -> LayoutReport:
    return LayoutReport(**{"layout": "fsdp_tp:1x4x2", "mesh": "1x4x2", "peak_gib": 1.5, "fits": "yes",
                           "compile_s": 20.0, **fields})


def test_step_plan_comes_from_the_datas_rows_and_tokens(toy_config, toy_examples):
    toy_config.data.packing = "none"
    plan = estimate.step_plan(toy_config, toy_examples)
    assert plan.rows_per_step == toy_config.train.batch_size and plan.row_tokens == toy_config.data.max_len
    assert plan.steps_per_epoch == math.ceil(len(toy_examples) / toy_config.train.batch_size)
    assert plan.real_tokens_per_epoch == sum(len(e) for e in toy_examples)
    assert plan.rows_for(batch_ways=8, grad_accum_steps=1) == toy_config.train.batch_size
    toy_config.data.packing = "examples"  # the paper's steps, in the rows training plans over all epochs
    examples = estimate.step_plan(toy_config, toy_examples)
    assert examples.steps_per_epoch == plan.steps_per_epoch and examples.rows_per_step < plan.rows_per_step
    assert examples.rows_per_step == data.plan_steps(
        toy_examples, batch_size=8, max_len=toy_config.data.max_len, seed=toy_config.seed, packing="examples",
        num_epochs=toy_config.train.num_epochs).rows_per_step
    assert examples.rows_for(batch_ways=8, grad_accum_steps=1) == 8  # rounded up to the batch's shards
    assert examples.rows_for(batch_ways=1, grad_accum_steps=1) == examples.rows_per_step
    toy_config.data.packing = "rows"
    packed = estimate.step_plan(toy_config, toy_examples)
    rows = data.row_layout(toy_examples, toy_config.data.max_len, packing="rows").num_rows
    assert packed.steps_per_epoch == math.ceil(rows / toy_config.train.batch_size) < plan.steps_per_epoch
    assert packed.real_tokens_per_epoch == plan.real_tokens_per_epoch  # packing moves tokens, adds none


def test_saves_per_epoch_and_every_n_steps_and_params_only_snapshots(toy_config):
    model_cfg = model_config(toy_config, vocab_size=513)
    n = model_cfg.num_params()
    full = estimate.save_plan(toy_config, model_cfg, steps_per_epoch=6)
    assert (full.saves, full.states_kept, full.snapshots) == (15, 15, 0)
    assert full.state_bytes == 3 * 4 * n and full.written_bytes == full.kept_bytes == 15 * 12 * n  # f32 + mu + nu
    toy_config.train.checkpoint_every_steps = 4  # 22 multiples of 4 up to 90, 7 of them (of 12) epoch ends
    assert estimate.save_plan(toy_config, model_cfg, 6).saves == 15 + 22 - 7
    toy_config.train.checkpoint_every_steps = 0
    toy_config.train.snapshots = "params"  # every epoch: full state (newest kept) + a bf16 snapshot (all kept)
    toy_config.train.snapshot_dtype = "bfloat16"
    params = estimate.save_plan(toy_config, model_cfg, 6)
    assert params.snapshot_bytes == 2 * n and "bfloat16" in params.what
    assert params.written_bytes == 15 * 12 * n + 15 * 2 * n and params.kept_bytes == 12 * n + 15 * 2 * n


def test_the_parts_add_up_and_scale_with_their_inputs(toy_config):
    model_cfg = model_config(toy_config, vocab_size=513)
    plan = estimate.StepPlan(steps_per_epoch=6, rows_per_step=8, real_tokens_per_epoch=2000, row_tokens=128,
                             description="test")
    base = estimate.Assumptions(dev_prompts=6)
    est = estimate.estimate_layout(_report(), toy_config, model_cfg, plan, SLICE, base)
    parts = est.compute_s + est.checkpoint_s + est.decode_s + est.startup_s
    assert min(est.compute_s, est.checkpoint_s, est.decode_s, est.startup_s) > 0
    assert est.total_s == pytest.approx(parts)
    assert est.chip_hours == pytest.approx(est.total_s / 3600 * SLICE.chips)
    assert est.steps == 6 * 15 and est.mfu_source == "default" and est.mfu == estimate.DEFAULT_MFU
    flops = analytic_flops(model_cfg, 8, 128)
    assert est.compute_s == pytest.approx(90 * flops / (0.4 * 100e12 * 8))
    assert est.storage_gb == pytest.approx(15 * 12 * model_cfg.num_params() / 1e9)
    assert est.checkpoint_s == pytest.approx(est.written_gb / (2 * base.write_gbps))  # 2 hosts write
    assert est.written_gb == pytest.approx(est.storage_gb)  # "full": every state written is kept

    faster_io = estimate.estimate_layout(_report(), toy_config, model_cfg, plan, SLICE,
                                         dataclasses.replace(base, write_gbps=2 * base.write_gbps))
    assert faster_io.checkpoint_s == pytest.approx(est.checkpoint_s / 2)
    assert (faster_io.compute_s, faster_io.decode_s, faster_io.startup_s) == (est.compute_s, est.decode_s,
                                                                             est.startup_s)
    half_mfu = estimate.estimate_layout(_report(), toy_config, model_cfg, plan, SLICE,
                                        dataclasses.replace(base, mfu=0.2))
    assert half_mfu.compute_s == pytest.approx(2 * est.compute_s) and half_mfu.mfu_source == "--mfu"
    measured = estimate.estimate_layout(_report(mfu=0.1), toy_config, model_cfg, plan, SLICE, base)
    assert measured.mfu_source == "measured" and measured.compute_s == pytest.approx(4 * est.compute_s)
    compile_flag = estimate.estimate_layout(_report(), toy_config, model_cfg, plan, SLICE,
                                            dataclasses.replace(base, compile_s=120.0))
    assert compile_flag.startup_s == pytest.approx(est.startup_s + 100.0)  # replaces the measured 20 s


def test_decoding_is_memory_bound_over_the_dev_reports(toy_config):
    model_cfg = model_config(toy_config, vocab_size=513)
    plan = estimate.StepPlan(6, 8, 2000, 128, "test")
    est = estimate.estimate_layout(_report(), toy_config, model_cfg, plan, SLICE,
                                   estimate.Assumptions(dev_prompts=6))
    # 3 dev epochs (5, 10, 15) x 1 batch (6 prompts, batch 8 on 4 batch ways) x the 48-token cap
    assert est.decode_steps == 3 * 1 * 48
    m = model_cfg
    cache_len = toy_config.data.max_len + 48  # as generation sizes the cache: prompt + cap, not the context
    assert cache_len < m.max_seq_len
    kv = 2 * m.n_layers * 8 * cache_len * m.n_kv_heads * m.head_dim * 4
    assert est.decode_step_ms == pytest.approx(1e3 * (4 * m.num_params() + kv) / (8 * 1000e9))
    more = estimate.estimate_layout(_report(), toy_config, model_cfg, plan, SLICE,
                                    estimate.Assumptions(dev_prompts=17))
    assert more.decode_steps == 3 * 3 * 48  # 17 prompts: 3 batches of 8


def test_a_layout_that_did_not_compile_is_a_row_with_its_error(toy_config):
    model_cfg = model_config(toy_config, vocab_size=513)
    est = estimate.estimate_layout(_report(error="out of memory at compile time: x", fits="NO"), toy_config,
                                   model_cfg, estimate.StepPlan(6, 8, 2000, 128, "test"), SLICE,
                                   estimate.Assumptions())
    assert math.isnan(est.total_s) and est.fits == "NO"
    assert "invalid: out of memory" in estimate.format_table([est])


def test_slice_hardware_of_a_tpu_topology():
    topology = hardware.parse_topology("v5p-128")
    assert hardware.num_hosts(topology, 1) == 16 and hardware.device_hbm_gbps(None, topology) == 2765.0
    spec = estimate.slice_spec([object()] * 64, topology, None, 1)
    assert (spec.chips, spec.hosts, spec.peak_tflops, spec.hbm_gbps) == (64, 16, 459.0, 2765.0)
    assert spec.source.startswith("public Cloud TPU v5p")


def _estimate_tool(repo, out, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lima_jax.layouts", "--config", "configs/toy.py", "--layouts",
                           "data", "--steps", "0", "--estimate", "--out", str(out), *args], cwd=repo,
                          capture_output=True, text=True, timeout=300,
                          env={"JAX_PLATFORMS": "cpu", "PYTHONPATH": str(repo), "PATH": "/usr/bin:/bin"})


@pytest.mark.slow
def test_cli_estimate_prints_the_split_and_writes_consistent_figures(repo, tmp_path):
    proc = _estimate_tool(repo, tmp_path / "a")
    assert proc.returncode == 0, proc.stderr
    for column in ("compute h", "checkpoint I/O h", "decoding h", "start-up h", "total h", "chip-hours",
                   "storage TB"):
        assert column in proc.stdout
    assert "MFU: measured MFU of a timed layout, else 40%" in proc.stdout  # every assumption says its source
    assert "placeholders" in proc.stdout  # CPU: no known peak or bandwidth, and the tool says so
    row, = json.loads((tmp_path / "a" / "estimate.json").read_text())["layouts"]
    assert row["total_s"] == pytest.approx(row["compute_s"] + row["checkpoint_s"] + row["decode_s"] + row["startup_s"])
    assert row["chip_hours"] == pytest.approx(row["total_s"] / 3600 * row["chips"])
    assert row["steps"] == 6 * 15 and row["saves"] == 15
    proc = _estimate_tool(repo, tmp_path / "b", "--write_gbps", "2")
    assert proc.returncode == 0, proc.stderr
    doubled, = json.loads((tmp_path / "b" / "estimate.json").read_text())["layouts"]
    assert doubled["checkpoint_s"] == pytest.approx(row["checkpoint_s"] / 2)
    assert doubled["compute_s"] == pytest.approx(row["compute_s"])
    assert "checkpoint writes: 2 GB/s per host (--write_gbps)" in proc.stdout


def test_cli_rejects_a_bad_mfu(repo, tmp_path):
    proc = _estimate_tool(repo, tmp_path, "--mfu", "1.5")
    assert proc.returncode == 2 and "--mfu" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_estimate_without_training_data_names_the_field(repo, tmp_path):
    proc = _estimate_tool(repo, tmp_path, "--config.data.train_path=")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "config.data.train_path is unset" in proc.stderr
