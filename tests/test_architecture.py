"""The shape of the package: no import cycles, no side effects at import or plotting time, and a
public surface whose every name resolves."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import steerx_lens

PACKAGE = Path(steerx_lens.__file__).resolve().parent
ROOT = "steerx_lens"
# Settings that libraries read from the environment: removed for the subprocesses, so that a
# module that sets one (even with ``setdefault``) is caught.
LIBRARY_SETTINGS = ("HF_HUB_OFFLINE", "WANDB_MODE", "TOKENIZERS_PARALLELISM", "MPLBACKEND")
BACKEND = "svg"  # a non-interactive backend that no steerx_lens code would pick


def module_files() -> dict[str, Path]:
    """Every module of the package by dotted name (``pkg/__init__.py`` is ``pkg``)."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _type_checking_only(tree: ast.Module) -> set[ast.AST]:
    """Import nodes under ``if TYPE_CHECKING:`` (never executed, so not a dependency)."""
    skipped: set[ast.AST] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                skipped.update(ast.walk(child))
    return skipped


def imported_names(name: str, path: Path, is_package: bool) -> list[tuple[str, str | None]]:
    """``(module, imported name or None)`` for every ``steerx_lens`` import of a module,
    anywhere in it (also inside functions); relative imports are made absolute."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = _type_checking_only(tree)
    found: list[tuple[str, str | None]] = []
    for node in ast.walk(tree):
        if node in skipped:
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = name if is_package else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{node.module}" if node.module else package
            else:
                base = node.module or ""
            found += [(base, alias.name) for alias in node.names]
    return [(module, attr) for module, attr in found if module.split(".")[0] == ROOT]


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    """Edges module -> the package modules that importing it executes, and the imports that
    take a name from the lazy root package instead of the module that defines it."""
    files = module_files()
    graph: dict[str, set[str]] = {module: set() for module in files}
    from_root: list[str] = []
    for module, path in files.items():
        for target, attr in imported_names(module, path, path.name == "__init__.py"):
            if attr is not None and f"{target}.{attr}" in files:
                target = f"{target}.{attr}"  # ``from pkg import submodule``
            elif attr is not None and target == ROOT:
                from_root.append(f"{module}: from {ROOT} import {attr}")
            while target not in files:  # a name inside a module: depend on the module
                target = target.rpartition(".")[0]
            # Importing a.b.c runs a, a.b and a.b.c: every package on the way that does not
            # already contain the importer (the root's lazy __init__ imports nothing).
            parts = target.split(".")
            for depth in range(2, len(parts) + 1):
                step = ".".join(parts[:depth])
                if step != module and not module.startswith(f"{step}."):
                    graph[module].add(step)
    return graph, from_root


def cyclic_components(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components that contain a cycle (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.add(top)
                if top == node:
                    break
            if len(component) > 1 or node in graph[node]:
                components.append(component)

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph)))
    for node in sorted(graph):
        if node not in index:
            connect(node)
    return components


def shortest_cycle(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle ``[a, b, ..., a]`` through the component's first module."""
    start = min(component)
    paths = {start: [start]}
    queue = [start]
    while queue:  # breadth-first, inside the component, back to ``start``
        node = queue.pop(0)
        for nxt in sorted(graph[node] & component):
            if nxt == start:
                return [*paths[node], start]
            if nxt not in paths:
                paths[nxt] = [*paths[node], nxt]
                queue.append(nxt)
    raise ValueError("not a cyclic component")


def describe_cycles(graph: dict[str, set[str]]) -> list[str]:
    """One line per cyclic component: a cycle in it, then all of its modules."""
    return [
        " -> ".join(shortest_cycle(graph, component))
        + f"  (component of {len(component)}: {', '.join(sorted(component))})"
        for component in cyclic_components(graph)
    ]


def test_the_package_has_no_import_cycle() -> None:
    graph, _ = import_graph()
    cycles = describe_cycles(graph)
    assert not cycles, "import cycles:\n  " + "\n  ".join(cycles)


def test_the_cycle_finder_finds_cycles() -> None:
    graph = {"a": {"b"}, "b": {"c", "a"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert describe_cycles(graph) == [
        "a -> b -> a  (component of 3: a, b, c)",
        "e -> e  (component of 1: e)",
    ]


def test_modules_import_from_the_defining_module_not_the_lazy_root() -> None:
    _, from_root = import_graph()
    assert not from_root, "\n".join(from_root)


def _run_isolated(script: str) -> dict:
    """Run ``script`` in a fresh interpreter without the library settings in its environment
    (``MPLBACKEND`` = :data:`BACKEND`); it prints one JSON object."""
    env = {k: v for k, v in os.environ.items() if k not in LIBRARY_SETTINGS}
    env["MPLBACKEND"] = BACKEND
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_importing_any_module_leaves_the_environment_and_matplotlib_alone() -> None:
    report = _run_isolated(
        """
        import importlib, json, os, pkgutil, sys

        changed = {}
        def load(name):
            before = dict(os.environ)
            importlib.import_module(name)
            after = dict(os.environ)
            keys = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
            if keys:
                changed[name] = keys

        load("steerx_lens")
        import steerx_lens
        heavy = [m for m in ("torch", "matplotlib", "transformer_lens", "nnsight", "sae_lens")
                 if m in sys.modules]
        for info in sorted(pkgutil.walk_packages(steerx_lens.__path__, "steerx_lens."),
                           key=lambda info: info.name):
            load(info.name)
        pyplot = "matplotlib.pyplot" in sys.modules
        import matplotlib
        print(json.dumps({"changed": changed, "heavy": heavy, "pyplot": pyplot,
                          "backend": matplotlib.get_backend()}))
        """
    )
    assert report["changed"] == {}, f"os.environ changed by importing: {report['changed']}"
    assert report["heavy"] == [], f"`import steerx_lens` imported {report['heavy']}"
    assert not report["pyplot"], "importing the package imported matplotlib.pyplot"
    assert report["backend"] == BACKEND, f"matplotlib backend switched to {report['backend']}"


def test_plots_leave_the_backend_and_pyplot_alone(tmp_path: Path) -> None:
    report = _run_isolated(
        f"""
        import json, sys
        import torch
        from steerx_lens.attribution import LayerEffects
        from steerx_lens.evaluation.report import write_report
        from steerx_lens.evaluation.results import ItemValues, RunMetrics, UserRecord
        from steerx_lens.viz import save_layer_heatmap

        items = {{m: {{"nll": ItemValues([2.0], [3]), "nll_distinct": ItemValues([3.0], [1])}}
                 for m in ("none", "baseline", "steerx", "shared", "history_prompt",
                           "baseline_other", "steerx_other")}}
        user = UserRecord("u", "key", 4, {{"nll_distinct": 1}}, "likes beer", [], 0, False,
                          items, {{"steerx": 0.1}})
        config = {{"layer": 1, "site_kind": "hook_resid_post", "backbone": "mean_diff",
                   "alpha": 1.0, "r": 0.1}}
        methods = {{m: {{"nll": 2.0, "nll_distinct": 3.0}} for m in items}}
        out = {str(tmp_path)!r}
        metrics = RunMetrics(config, methods, [user], [], None, None, {{}})
        write_report(metrics, out)
        effects = LayerEffects("u", 0, [0, 1], ["a", "b"], torch.arange(2), torch.ones(2, 2))
        save_layer_heatmap(effects, out + "/layers.png")
        import matplotlib
        print(json.dumps({{"pyplot": "matplotlib.pyplot" in sys.modules,
                          "backend": matplotlib.get_backend()}}))
        """
    )
    assert not report["pyplot"], "a plot imported matplotlib.pyplot"
    assert report["backend"] == BACKEND, (
        f"a plot switched matplotlib's backend: {report['backend']}"
    )
    for name in ("methods.png", "margins.png", "layers.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_every_exported_name_resolves() -> None:
    missing = []
    for name in steerx_lens.__all__:
        try:
            getattr(steerx_lens, name)
        except (AttributeError, ImportError) as error:
            missing.append(f"{name}: {error}")
    assert not missing, "names in steerx_lens.__all__ that do not resolve:\n  " + "\n  ".join(
        missing
    )
    assert set(dir(steerx_lens)) >= set(steerx_lens.__all__)
    assert steerx_lens.__version__
