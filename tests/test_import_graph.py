"""The `minigpt` package's import graph has no cycles, and its rooms depend on each other one way.

Every import counts: module level, inside functions, and under `if TYPE_CHECKING:`. A lazy import inside a
function hides a circle from the interpreter but not from a reader, and it is how the circles this test
guards against (engine ↔ engine, tokenizer ↔ data sources) were papered over.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "minigpt"


def module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules(package: Path) -> dict[str, Path]:
    return {module_name(path, package): path for path in sorted(package.rglob("*.py"))}


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The `minigpt` modules `path` imports (a `from pkg import sub` naming a submodule counts as `pkg.sub`)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [source] + [f"{source}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            # `import minigpt.a.b` also imports minigpt.a; take the longest known prefix.
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    modules = package_modules(package)
    known = set(modules)
    return {name: imported_modules(name, path, known) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 finished
    for root in sorted(graph):
        if state.get(root):
            continue
        path, stack = [root], [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            child = next(stack[-1], None)
            if child is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(child) == 1:
                return path[path.index(child):] + [child]
            elif not state.get(child):
                state[child] = 1
                path.append(child)
                stack.append(iter(sorted(graph.get(child, ()))))
    return None


def test_minigpt_import_graph_has_no_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def in_room(module: str, *rooms: str) -> bool:
    return any(module == room or module.startswith(room + ".") for room in rooms)


def test_only_the_training_room_and_the_clis_import_train():
    """evaluation/, config.py, metrics.py, modes.py and the rest never import minigpt.train: what training and
    evaluation share (metric sums, bytes per token) lives below both (docs/architecture.md, rules)."""
    upward = sorted(f"{module} -> {target}" for module, targets in import_graph().items() for target in targets
                    if in_room(target, "minigpt.train") and not in_room(module, "minigpt.train", "minigpt.cli"))
    assert upward == []


def test_evaluation_is_used_by_training_and_the_clis_and_config_reads_only_its_task_syntax():
    """The dependency between train/ and evaluation/ runs one way: the loop runs --eval-task tasks; evaluation
    needs a model, a tokenizer and a runtime, never the loop or an objective. TrainConfig validates --eval-task
    with evaluation/spec.py, which imports nothing of minigpt but the message catalog (a leaf)."""
    graph = import_graph()
    users = {module: sorted(t for t in targets if in_room(t, "minigpt.evaluation"))
             for module, targets in graph.items() if not in_room(module, "minigpt.evaluation")}
    outside = sorted(module for module, targets in users.items() if targets
                     and not in_room(module, "minigpt.train", "minigpt.cli", "minigpt.config"))
    assert outside == []
    assert users["minigpt.config"] == ["minigpt.evaluation.spec"]
    assert sorted(t for t in graph["minigpt.evaluation.spec"] if in_room(t, "minigpt")) == ["minigpt.i18n"]
    assert not any(in_room(t, "minigpt") for t in graph["minigpt.i18n"])


def test_cycle_finder_reports_a_two_way_import_and_resolves_relative_and_lazy_imports(tmp_path):
    package = tmp_path / "minigpt"
    (package / "engine").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "engine" / "__init__.py").write_text("")
    (package / "engine" / "plain.py").write_text("def f():\n    from .deepspeed import g\n")
    (package / "engine" / "deepspeed.py").write_text("from minigpt.engine import plain\n")
    graph = import_graph(package)
    assert graph["minigpt.engine.plain"] == {"minigpt.engine.deepspeed"}
    assert "minigpt.engine.plain" in graph["minigpt.engine.deepspeed"]
    assert find_cycle(graph) == ["minigpt.engine.deepspeed", "minigpt.engine.plain", "minigpt.engine.deepspeed"]
