"""The floors of the house (docs/architecture.md): nothing imports upward, no import circles,
and no runtime file over 400 lines. Imports are read with `ast`, lazy ones (inside functions)
included: a lazy import is still a dependency.

    floor 1  kernels/, config.py, version.py
    floor 2  tiers/
    floor 3  index/, scheduler/    (they may import each other's files, never in a circle)
    floor 4  runtime/
    floor 5  cli.py, server/, eval/, cluster/, hf.py, the package root (kvloft/__init__.py)
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "kvloft"
FLOORS = {
    "kernels": 1, "config": 1, "version": 1,
    "tiers": 2,
    "index": 3, "scheduler": 3,
    "runtime": 4,
    "cli": 5, "server": 5, "eval": 5, "cluster": 5, "hf": 5, "": 5,
}
MAX_RUNTIME_LINES = 400


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(ROOT.rglob("*.py")):
        parts = list(p.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


MODULES = _modules()


def _package(module: str) -> str:
    """kvloft.runtime.session -> "runtime"; kvloft.config -> "config"; kvloft -> ""."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, kvloft module) of every absolute kvloft import in the file, lazy ones included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "kvloft"]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: use absolute kvloft imports"
            if node.module and node.module.split(".")[0] == "kvloft":
                for a in node.names:  # `from kvloft.index import exact` names a module
                    sub = f"{node.module}.{a.name}"
                    out.append((node.lineno, sub if sub in MODULES else node.module))
    return out


GRAPH = {m: sorted({t for _, t in _imports(p) if t in MODULES and t != m}) for m, p in MODULES.items()}


def upward_imports() -> list[str]:
    bad = []
    for module, path in MODULES.items():
        src = FLOORS[_package(module)]
        for line, target in _imports(path):
            if FLOORS[_package(target)] > src:
                bad.append(f"{path.relative_to(ROOT.parent)}:{line} imports {target} "
                           f"(floor {FLOORS[_package(target)]} > {src})")
    return bad


def import_cycles() -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), each one circle or more."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while group[-1:] != [v]:
                group.append(stack.pop())
            if len(group) > 1:
                cycles.append(sorted(group))

    for v in MODULES:
        if v not in index:
            visit(v)
    return cycles


def test_every_package_has_a_floor():
    assert {_package(m) for m in MODULES} <= set(FLOORS), "a new package: give it a floor here and in the docs"


def test_nothing_imports_upward():
    assert upward_imports() == []


def test_no_import_circles():
    assert import_cycles() == []


def test_runtime_files_are_short():
    long = {p.name: n for p in (ROOT / "runtime").glob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_RUNTIME_LINES}
    assert long == {}, f"split these by concern (at most {MAX_RUNTIME_LINES} lines each)"


@pytest.mark.parametrize(("module", "target"), [
    ("kvloft.scheduler.overlap", "kvloft.runtime.attention"),  # the upward import this test guards against
    ("kvloft.tiers.kvcache", "kvloft.index.base"),
])
def test_the_checker_sees_an_upward_import(module, target, monkeypatch):
    """The checks can fail: an upward import planted in a module's source is reported."""
    path = MODULES[module]
    planted = path.read_text() + f"\n\ndef _planted():\n    import {target}\n"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: planted if self == path else _read(self))
    assert any(target in b for b in upward_imports())


def test_the_checker_sees_a_circle(monkeypatch):
    monkeypatch.setitem(GRAPH, "kvloft.tiers.chunked", [*GRAPH["kvloft.tiers.chunked"], "kvloft.tiers.kvcache"])
    assert any({"kvloft.tiers.chunked", "kvloft.tiers.kvcache"} <= set(c) for c in import_cycles())


_read = Path.read_text


def import_counts() -> dict[tuple[str, str], int]:
    """(from package, to package) -> import statements between them (docs/architecture.md's table)."""
    counts: dict[tuple[str, str], int] = {}
    for module, path in MODULES.items():
        seen = set()
        for line, target in _imports(path):
            key = (_package(module), _package(target))
            if key[0] != key[1] and (line, key) not in seen:  # one statement, however many names
                seen.add((line, key))
                counts[key] = counts.get(key, 0) + 1
    return counts


def _table() -> str:
    cols = ["config", "kernels", "tiers", "index", "scheduler", "runtime"]
    rows = [("tiers", ["tiers"]), ("index", ["index"]), ("scheduler", ["scheduler"]), ("runtime", ["runtime"]),
            ("server, eval, cluster, cli, hf, kvloft", ["server", "eval", "cluster", "cli", "hf", ""])]
    counts = import_counts()
    lines = ["| from \\ to | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, members in rows:
        cells = [sum(counts.get((m, c), 0) for m in members) for c in cols]
        lines.append(f"| {name} | " + " | ".join(str(n) if n else "" for n in cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":  # python tests/test_layers.py: the table of docs/architecture.md
    print(_table())
