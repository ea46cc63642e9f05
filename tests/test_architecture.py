"""The package's layers depend one way: core -> runtime -> workflows -> entry points.

Every import statement counts, at module level and inside functions. A module may import modules of its own
layer or below, never above, and no set of modules may import each other in a circle. Command-line flags are
defined only in entry points.
"""
from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "lima_jax"

CORE, RUNTIME, WORKFLOW, ENTRY = range(4)
LAYER_NAMES = ("core", "runtime", "workflow", "entry point")
# (module name or "prefix.*", layer); the first match wins.
LAYERS = (
    ("lima_jax.data.__main__", ENTRY),
    ("lima_jax", CORE), ("lima_jax.errors", CORE), ("lima_jax.paths", CORE), ("lima_jax.config", CORE),
    ("lima_jax.tokenizer", CORE), ("lima_jax.model", CORE), ("lima_jax.sharding", CORE), ("lima_jax.optim", CORE),
    ("lima_jax.attention", CORE), ("lima_jax.loss", CORE),
    ("lima_jax.distributed", CORE), ("lima_jax.data", CORE), ("lima_jax.data.*", CORE), ("lima_jax.records", CORE),
    ("lima_jax.checkpoint", CORE), ("lima_jax.rundir", CORE), ("lima_jax.metrics", CORE), ("lima_jax.manifest", CORE),
    ("lima_jax.runlock", CORE), ("lima_jax.preemption", CORE), ("lima_jax.xla_cpu", CORE),
    ("lima_jax.runtime", RUNTIME), ("lima_jax.train_step", RUNTIME),
    ("lima_jax.training", WORKFLOW), ("lima_jax.generation", WORKFLOW), ("lima_jax.dev_report", WORKFLOW),
    ("lima_jax.evaluation", WORKFLOW), ("lima_jax.evaluation.*", WORKFLOW),
    ("lima_jax.conversion", WORKFLOW), ("lima_jax.conversion.*", WORKFLOW),
    ("lima_jax.analysis", WORKFLOW), ("lima_jax.analysis.*", WORKFLOW),
    ("lima_jax.experiments.small_lima", ENTRY),
    ("lima_jax.experiments", WORKFLOW), ("lima_jax.experiments.*", WORKFLOW),
    ("lima_jax.cli", ENTRY), ("lima_jax.train", ENTRY), ("lima_jax.generate", ENTRY), ("lima_jax.report", ENTRY),
    ("lima_jax.eval", ENTRY), ("lima_jax.convert", ENTRY), ("lima_jax.layouts", ENTRY), ("lima_jax.bench", ENTRY),
    ("lima_jax.verify", ENTRY),
)
FLAG_DEFINERS = ("ArgumentParser", "DEFINE_", "config_flags")


def modules(package: pathlib.Path) -> dict[str, pathlib.Path]:
    """{dotted module name: file} of every module of the package."""
    found = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def import_edges(package: pathlib.Path) -> dict[str, set[str]]:
    """{module: the package's modules it imports}, counting imports inside functions too."""
    mods = modules(package)

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = mod if is_package else mod.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        anchor = anchor.rpartition(".")[0]
                    base = f"{anchor}.{base}" if base else anchor
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            else:
                continue
            for target in targets:
                resolved = resolve(target) if target.startswith(package.name) else None
                # `from pkg import sub` in pkg's own __init__ names a submodule, not itself
                if resolved and resolved != mod and not mod.startswith(resolved + "."):
                    edges[mod].add(resolved)
    return edges


def layer_of(module: str, layers=LAYERS) -> int | None:
    for pattern, layer in layers:
        if module == pattern or (pattern.endswith(".*") and module.startswith(pattern[:-1])):
            return layer
    return None


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def violations(package: pathlib.Path, layers=LAYERS) -> list[str]:
    """Every problem of the package's import graph, as a sentence."""
    edges = import_edges(package)
    problems = [f"{m}: no layer assigned (add it to LAYERS)" for m in sorted(edges) if layer_of(m, layers) is None]
    for mod, targets in sorted(edges.items()):
        for target in sorted(targets):
            src, dst = layer_of(mod, layers), layer_of(target, layers)
            if src is not None and dst is not None and dst > src:
                problems.append(f"{mod} ({LAYER_NAMES[src]}) imports {target} ({LAYER_NAMES[dst]}): upward")
    problems += [f"import cycle: {' <-> '.join(c)}" for c in cycles(edges)]
    return problems


def test_imports_run_one_way_without_cycles():
    assert violations(PACKAGE) == []


def test_flags_are_defined_only_in_entry_points():
    offenders = []
    for name, path in modules(PACKAGE).items():
        if layer_of(name) == ENTRY:
            continue
        text = path.read_text(encoding="utf-8")
        offenders += [f"{name}: {word}" for word in FLAG_DEFINERS if word in text]
    assert offenders == []


def _package(tmp_path: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
    root = tmp_path / "lima_jax"
    for name, text in {"__init__.py": "", **files}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize("files, expected", [
    # a cycle hidden in function-local imports
    ({"config.py": "def f():\n    from lima_jax import model\n", "model.py": "from lima_jax.config import x\n"},
     "import cycle: lima_jax.config <-> lima_jax.model"),
    # a core module reaching up into a workflow, inside a function
    ({"model.py": "def f():\n    from lima_jax.training import train\n", "training.py": ""},
     "lima_jax.model (core) imports lima_jax.training (workflow): upward"),
    # relative imports count too
    ({"runtime.py": "from . import generation\n", "generation.py": ""},
     "lima_jax.runtime (runtime) imports lima_jax.generation (workflow): upward"),
])
def test_the_checker_fails_on_a_bad_import(tmp_path, files, expected):
    assert expected in violations(_package(tmp_path, files))
