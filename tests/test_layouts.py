"""The layout comparison tool: HLO accounting, the per-layout report, outputs, the command line, and the TPU
AOT path."""
from __future__ import annotations

import json
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lima_jax.analysis import hardware, hlo, layout_report, layouts
from lima_jax.config import model_config
from lima_jax.errors import ConfigError

_HLO = """HloModule jit_step, entry_computation_layout={(f32[8,16]{1,0})->f32[8,16]{1,0}}

%body (p: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {
  %p = (s32[], f32[8,16]{1,0}) parameter(0)
  %x = f32[8,16]{1,0} get-tuple-element(%p), index=1
  %ag = f32[32,16]{1,0} all-gather(%x), channel_id=1, replica_groups={{0,1,2,3}}, dimensions={0}
  %w = f32[16,16]{1,0} constant({...})
  %d = f32[32,16]{1,0} dot(%ag, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %ar-start = f32[8,16]{1,0} all-reduce-start(%x), channel_id=2, replica_groups={{0,1,2,3}}, to_apply=%add
  ROOT %ar-done = f32[8,16]{1,0} all-reduce-done(%ar-start)
}

%cond (p: (s32[], f32[8,16])) -> pred[] {
  %p = (s32[], f32[8,16]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(5)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

ENTRY %main (x: f32[8,16]) -> f32[8,16] {
  %x = f32[8,16]{1,0} parameter(0)
  %t = (s32[], f32[8,16]{1,0}) tuple(%c, %x)
  %loop = (s32[], f32[8,16]{1,0}) while(%t), condition=%cond, body=%body
  %y = bf16[8,16]{1,0} all-reduce(%x), channel_id=3, replica_groups={{0,1}}, to_apply=%add
  ROOT %r = f32[8,16]{1,0} get-tuple-element(%loop), index=1
}
"""


def test_collectives_count_loop_trips_and_async_pairs_once():
    module = hlo.HloModule.parse(_HLO)
    assert module.runs["body"] == 5  # the trip count comes from the condition's bound
    stats = hlo.collective_stats(module)
    assert stats["all-gather"] == {"count": 5, "bytes": 5 * 32 * 16 * 4}
    assert stats["all-reduce"] == {"count": 5 + 1, "bytes": 5 * 8 * 16 * 4 + 8 * 16 * 2}  # start/done once
    assert stats["reduce-scatter"]["count"] == 0
    assert hlo.dot_flops(module) == 5 * 2 * 32 * 16 * 16


def test_dot_flops_of_a_compiled_scan_match_the_arithmetic():
    def f(x, ws):
        return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, ws)[0]

    x, ws = jnp.ones((32, 64)), jnp.ones((6, 64, 64))
    module = hlo.HloModule.parse(jax.jit(f).lower(x, ws).compile().as_text())
    assert hlo.dot_flops(module) == pytest.approx(6 * 2 * 32 * 64 * 64)


@pytest.mark.parametrize("name,generation,shape", [
    ("v5p-128", "v5p", (4, 4, 4)), ("v4-64", "v4", (2, 4, 4)), ("v5e-16", "v5e", (4, 4)),
    ("v5litepod-32", "v5e", (4, 8)), ("v6e-256", "v6e", (16, 16)), ("v5p:4x4x8", "v5p", (4, 4, 8))])
def test_parse_topology(name, generation, shape):
    topology = hardware.parse_topology(name)
    assert (topology.generation, topology.shape) == (generation, shape)


@pytest.mark.parametrize("name", ["v7x-8", "v5p", "tpu-128", "v5e-24"])
def test_bad_topology_names_are_rejected(name):
    with pytest.raises(ConfigError, match="--topology|power of two"):
        hardware.parse_topology(name)


def test_analytic_flops_is_6n_plus_attention(toy_config):
    cfg = model_config(toy_config, vocab_size=513)  # padded to 640 (model.vocab_multiple 128)
    matmul = cfg.num_params() - cfg.padded_vocab_size * cfg.dim - cfg.n_layers * 2 * cfg.dim - cfg.dim
    tokens = 8 * 128
    assert layouts.analytic_flops(cfg, 8, 128) == 6 * matmul * tokens + 12 * cfg.n_layers * 128 * cfg.dim * tokens


@pytest.mark.slow
def test_compare_on_toy_reports_memory_flops_collectives_and_speed(toy_config, tmp_path):
    toy_config.model.attention = "reference"  # the blocked kernel's backward recomputes QK^T (not model FLOPs)
    reports = layouts.compare(toy_config, ["data", "fsdp_tp:1x4x2", "tensor:1x1x8"], steps=1)
    data, fsdp_tp, bad = reports
    assert "heads size 4 is not divisible by mesh axes tensor of size 8" in bad.error
    for r in (data, fsdp_tp):
        assert not r.error and r.peak_gib > r.argument_gib > 0 and r.temp_gib > 0
        assert r.step_s > 0 and r.tokens_per_s == pytest.approx(8 * 128 / r.step_s)
    # Pure data parallelism: parameters replicated, gradients all-reduced, nothing gathered.
    assert data.collectives["all-reduce"]["count"] > 0 and data.collectives["all-gather"]["count"] == 0
    # 2-way tensor x 4-way fsdp: each device holds ~1/8 of the data-parallel replica's state.
    assert fsdp_tp.argument_gib < data.argument_gib / 4
    assert fsdp_tp.collectives["all-gather"]["count"] > 0
    # The compiled program's matmuls, loop trips included, are the analytic 6N + attention figure.
    assert data.hlo_dot_tflop == pytest.approx(data.analytic_tflop, rel=0.02)
    assert fsdp_tp.hlo_dot_tflop >= data.analytic_tflop * 0.98

    paths = layout_report.write_outputs(reports, tmp_path, "toy")
    assert [p.name for p in paths] == ["layouts.csv", "layouts.json", "layouts.png", "layouts.md"]
    assert "| fsdp_tp:1x4x2 | 1x4x2 |" in paths[3].read_text()
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = json.loads(paths[1].read_text())["layouts"]
    assert [r["layout"] for r in rows] == ["data", "fsdp_tp:1x4x2", "tensor:1x1x8"]
    assert "all-reduce_bytes" in paths[0].read_text().splitlines()[0]
    table = layout_report.format_table(reports)
    assert "invalid: " in table and "fsdp_tp:1x4x2" in table
    print(table)


@pytest.mark.slow
def test_fsdp_gathers_weights_and_never_moves_whole_batch_activations(toy_config):
    """ZeRO-3: per layer, every weight matrix is all-gathered and the only all-reduce is the gradient's
    (at most one parameter-sized sum). A lost activation constraint once let XLA all-gather the batch and
    all-reduce [batch, length, mlp] activations instead: 14x the parameter bytes on this model."""
    toy_config.mesh.update(layout="fsdp", data=1, fsdp=8, tensor=1)
    model_cfg = model_config(toy_config, vocab_size=513)
    compiled, model, *_ = layouts.compile_layout(toy_config, model_cfg, jax.devices())
    stats = hlo.collective_stats(hlo.HloModule.parse(compiled.as_text()))
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    param_bytes = sum(4 * x.size for x in jax.tree.leaves(nn.meta.unbox(shapes)))
    weight_matrices = 7  # wq, wk, wv, wo, w1, w2, w3
    assert stats["all-gather"]["count"] >= weight_matrices * model_cfg.n_layers
    assert 0 < stats["all-reduce"]["bytes"] <= 1.05 * param_bytes


def test_unknown_layout_is_a_config_error(toy_config):
    with pytest.raises(ConfigError, match="'zero3' is not one of"):
        layouts.compare(toy_config, ["zero3"], steps=0)
    with pytest.raises(ConfigError, match="data x fsdp x tensor"):
        layouts.parse_layout_spec("fsdp:2x4")
    with pytest.raises(ConfigError, match="--layouts: no layout given"):
        layouts.compare(toy_config, [], steps=0)


def test_step_rows_with_examples_packing_round_up_as_training_does(toy_config):
    from lima_jax import sharding
    config = layouts.layout_config(toy_config, "fsdp:2x4x1", 1)  # the batch over data x fsdp: 8 shards
    mesh = sharding.make_mesh(config, jax.devices())
    batch_sharding = sharding.batch_sharding(mesh, sharding.layout_rules(config, shape=mesh.devices.shape))
    assert sharding.batch_shards(batch_sharding) == 8
    config.data.packing, config.train.batch_size = "examples", 32
    assert layouts.step_rows(config, batch_sharding) == 32  # no --rows: one example per row, the most a step needs
    assert layouts.step_rows(config, batch_sharding, 11) == 16
    config.train.grad_accum_steps = 4
    assert layouts.step_rows(config, batch_sharding, 11) == 32  # 8 shards x 4 micro-batches
    config.data.packing = "none"
    assert layouts.step_rows(config, batch_sharding, 11) == 32
    with pytest.raises(ConfigError, match="--rows=11: only with config.data.packing='examples'"):
        layouts.compare(config, ["data"], steps=0, rows=11)


def _run_tool(repo, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lima_jax.layouts", *args], cwd=repo, capture_output=True,
                          text=True, timeout=300, env={"JAX_PLATFORMS": "cpu", "PYTHONPATH": str(repo),
                                                       "PATH": "/usr/bin:/bin"})


def _one_error_paragraph(proc: subprocess.CompletedProcess) -> str:
    """The `error:` paragraph of a failed run, checked to be its only one and to come without a traceback."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("error:") == 1, proc.stderr
    return proc.stderr[proc.stderr.index("error:"):]


def test_help_runs(repo):
    proc = _run_tool(repo, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "--topology" in proc.stdout and "--layouts" in proc.stdout and "Traceback" not in proc.stderr
    assert "--config.FIELD" in proc.stdout and "--dump_hlo" in proc.stdout
    assert "--estimate" in proc.stdout and "--write_gbps" in proc.stdout and "46.2%" in proc.stdout


def test_bad_config_value_is_one_error_paragraph(repo):
    error = _one_error_paragraph(_run_tool(repo, "--config", "configs/toy.py", "--config.model.dim=-3",
                                           "--steps", "0"))
    assert "model.dim" in error


@pytest.mark.parametrize("flag,named", [("--layouts=zero3", "'zero3' is not one of"),
                                        ("--layouts=fsdp:2x4", "data x fsdp x tensor"),
                                        ("--topology=v7x-8", "--topology='v7x-8'")])
def test_bad_layouts_or_topology_is_one_error_paragraph(repo, flag, named):
    assert named in _one_error_paragraph(_run_tool(repo, "--config", "configs/toy.py", flag, "--steps", "0"))


@pytest.mark.slow
def test_cli_writes_to_the_runs_layouts_folder(repo, tmp_path):
    workdir = tmp_path / "run"
    proc = _run_tool(repo, "--config", "configs/toy.py", f"--config.workdir={workdir}", "--layouts", "data",
                     "--steps", "0", "--dump_hlo")
    assert proc.returncode == 0, proc.stderr
    assert f"output folder: {workdir / 'layouts'}" in proc.stdout
    assert sorted(p.name for p in (workdir / "layouts").iterdir()) == [
        "data.hlo.txt", "layouts.csv", "layouts.json", "layouts.md", "layouts.png"]


def _libtpu_missing() -> str | None:
    try:
        import libtpu  # noqa: F401
    except ImportError:
        return "libtpu is not installed (pip install 'lima_jax[tpu]'): the TPU ahead-of-time path is untested"
    return None


@pytest.mark.skipif(_libtpu_missing() is not None, reason=_libtpu_missing() or "")
def test_aot_compile_for_a_tpu_slice(toy_config, monkeypatch):
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    topology = hardware.parse_topology("v5e-4")
    reports = layouts.compare(toy_config, ["fsdp_tp:1x2x2"], topology=topology)
    for r in reports:
        assert not r.error, r.error
        assert r.device_memory_gib == 16 and r.fits == "yes" and 0 < r.peak_gib < 1
        assert np.isnan(r.step_s)  # nothing runs without a TPU
        assert r.collectives["all-gather"]["count"] >= toy_config.model.n_layers  # per-layer gathers, per trip
    print(layout_report.format_table(reports))
