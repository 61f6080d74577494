"""Imports run downward: each package of smoe may import only from its own layer or the layers below it, and no
two modules import each other, directly or around a longer loop. Lazy imports inside functions count too."""

import ast
from pathlib import Path

import pytest

import smoe

# The allowed order, bottom first, written once. A module belongs to the first entry that is its name or a package
# above it. The package itself (ROOT_PACKAGE) is listed by its exact name only: as a prefix it would take in any new
# package nobody listed, at the top where it may import anything.
LAYERS = [
    ("smoe.errors", "smoe.config", "smoe.config_rules", "smoe.config_attention", "smoe.accounting", "smoe.hardware",
     "smoe.cost", "smoe.presets", "smoe.offload.budget"),  # no torch (smoe.hardware imports it inside its
    # measurements only; smoe.offload's __init__ imports nothing, so its budget module stays torch-free)
    ("smoe.nn",),
    ("smoe.kernels",),  # the expert backends and the quantised weight format they read (smoe.kernels.qweight)
    ("smoe.device",),  # the device and precision a process runs in (reads the kernels' native low precision)
    ("smoe.moe",),
    ("smoe.quant",),  # quantises into the kernels' format and swaps quantised experts in for the moe's
    ("smoe.models",),
    ("smoe.offload",),  # routed experts read from disk into a cache (the loaders in io and interop attach it)
    ("smoe.io",),
    ("smoe.parallel",),
    ("smoe.interop", "smoe.generation", "smoe.train", "smoe.upcycling"),
    ("smoe.eval", "smoe.bench", "smoe.serve"),
    ("smoe.cli", "smoe.__main__", "smoe"),  # the package itself re-exports (lazily) from everywhere
]
ROOT_PACKAGE = "smoe"
ROOT = Path(smoe.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _layer(module: str) -> int:
    for rank, prefixes in enumerate(LAYERS):
        if any(module == p or p != ROOT_PACKAGE and module.startswith(p + ".") for p in prefixes):
            return rank
    raise AssertionError(f"{module}: in no layer of tests/test_layers.py; add its package to LAYERS")


def _imports(path: Path, known: set[str]) -> set[str]:
    """The smoe modules ``path`` imports (``from smoe import kernels`` is smoe.kernels)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "smoe"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "smoe":
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in known else node.module)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(path, known) - {name} for name, path in modules.items()}


def test_every_module_has_a_layer():
    for name in _modules():
        _layer(name)


def test_a_module_nobody_listed_has_no_layer():
    with pytest.raises(AssertionError, match="in no layer"):
        _layer("smoe.unlisted")
    with pytest.raises(AssertionError, match="in no layer"):
        _layer("smoe.unlisted.child")
    assert _layer("smoe") == len(LAYERS) - 1 and _layer("smoe.config.model") == 0


def test_every_layer_entry_names_a_module():
    modules = set(_modules())
    stale = [p for prefixes in LAYERS for p in prefixes if p not in modules]
    assert not stale, f"LAYERS lists modules that do not exist: {stale}"


def test_imports_run_downward():
    upward = [f"{a} (layer {_layer(a)}) imports {b} (layer {_layer(b)})"
              for a, targets in _graph().items() for b in sorted(targets) if _layer(b) > _layer(a)]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    graph = _graph()
    graph.pop(ROOT_PACKAGE)  # the package's lazy re-exports point up by design; nothing below imports it
    for targets in graph.values():
        targets.discard(ROOT_PACKAGE)
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)
