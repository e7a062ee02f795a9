"""lib/ has no import circle: every module can be read (and imported) before the ones that use it."""

from __future__ import annotations

import ast
from pathlib import Path

from lib.kconfig import REPO_ROOT


def _lib_imports(path: Path) -> set[str]:
    """Every lib module `path` imports, at the top or inside a function."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("lib.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "lib":
                out |= {f"lib.{a.name}" for a in node.names}
            elif node.module.startswith("lib."):
                out.add(node.module)
    return out


def _module_graph() -> dict[str, set[str]]:
    modules = {}
    for path in sorted((REPO_ROOT / "lib").rglob("*.py")):
        parts = path.relative_to(REPO_ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = _lib_imports(path)
    return {m: {d for d in deps if d in modules and d != m} for m, deps in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return path[path.index(d):] + [m, d] if d in path else path + [m, d]
            if d not in state:
                found = visit(d, path + [m])
                if found:
                    return found
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m, [])
            if found:
                return found
    return None


def test_settings_does_not_import_kconfig():
    assert "lib.kconfig" not in _lib_imports(REPO_ROOT / "lib" / "settings.py")


def test_lib_has_no_import_circle():
    assert _cycle(_module_graph()) is None, " -> ".join(_cycle(_module_graph()))


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) is not None
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_training_loop_reads_in_one_sitting():
    """The one loop stays nanoGPT-sized: checkpoints, summaries, signals and set-up live in their own modules."""
    lines = (REPO_ROOT / "lib" / "train_loop.py").read_text(encoding="utf-8").count("\n")
    assert lines < 300, f"lib/train_loop.py has {lines} lines; move what is not the loop into its own module"
