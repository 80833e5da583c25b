"""Layering rules that hold by construction, checked on the source (ARCHITECTURE.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import edgecompress

PKG = Path(edgecompress.__file__).parent


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node except those under `if TYPE_CHECKING:` (annotations only: never imported at run time)."""
    out: list[ast.AST] = []
    todo = [tree]
    while todo:
        node = todo.pop()
        out.append(node)
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                todo.extend(child.orelse)
                continue
            todo.append(child)
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the edgecompress modules it imports (anywhere in the file, lazy imports included)."""
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        is_pkg = path.name == "__init__.py"
        for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative
                    base = mod.split(".")[: len(mod.split(".")) - node.level + (1 if is_pkg else 0)]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                names = [prefix] + [f"{prefix}.{a.name}" for a in node.names]
            for name in names:
                # the longest prefix that is a module of ours (from x import y: y may be a module or a name)
                while name and name not in modules:
                    name = name.rpartition(".")[0]
                if name and name != mod and name != "edgecompress":
                    graph[mod].add(name)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return [*stack[stack.index(n):], n]
            if n not in state and (found := visit(n)) is not None:
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)) is not None:
            return found
    return None


def _within(mod: str, package: str) -> bool:
    return mod == package or mod.startswith(package + ".")


def test_the_import_graph_has_no_cycle() -> None:
    graph = import_graph()
    assert "edgecompress.search" in graph["edgecompress.api"]  # the parser sees lazy imports
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])


def test_a_cycle_is_found() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_layering_rules() -> None:
    graph = import_graph()
    nothing_internal = ("edgecompress.graph", "edgecompress.isa", "edgecompress.tasknames")
    for mod in nothing_internal:
        assert not graph[mod], (mod, graph[mod])
    for mod, deps in graph.items():
        assert "edgecompress.cli" not in deps, mod  # nothing imports cli
        if mod.startswith("edgecompress.passes"):
            assert not any(d.startswith("edgecompress.profiling") for d in deps), (mod, deps)
        if mod in ("edgecompress.pipeline", "edgecompress.recipes") or mod.startswith("edgecompress.passes"):
            assert "edgecompress.search" not in deps and "edgecompress.api" not in deps, mod


def test_passes_and_profiling_never_import_tasks() -> None:
    """Task adapters sit above both: passes get calibration batches, profiling a workload the adapter produced
    (profiling also runs on devices, with stdlib + numpy + onnxruntime only)."""
    for mod, deps in import_graph().items():
        if mod.startswith(("edgecompress.passes", "edgecompress.profiling")):
            assert not any(_within(d, "edgecompress.tasks") for d in deps), (mod, deps)


def test_every_task_name_has_one_adapter() -> None:
    from edgecompress import export, tasknames, taskspec
    from edgecompress.tasks import registered_tasks

    names = {n for k, v in vars(tasknames).items() if k.isupper()
             for n in (v if isinstance(v, tuple) else (v,)) if isinstance(n, str)}
    tasks = registered_tasks()  # imports every module of edgecompress/tasks
    assert set(tasks) == names == set(taskspec.specs()) >= set(export.supported_tasks())
    for name, facts in tasks.items():
        assert name in facts.tasks and facts.adapter.facts is facts
        assert facts.spec(name) is taskspec.spec(name)  # the spec the layers below read is the adapter's


# the model families' task names: what differs for them is declared in their adapter file (tasks/), the passes that
# apply to them at the pass (passes/, recipes.py's fp32), the names themselves in tasknames.py
FAMILY_NAMES = ("DECODER_TASK", "DECODER_TASKS", "IMAGE_CLASSIFICATION", "OBJECT_DETECTION", "VISION_TASKS",
                "SPEECH_TASK")


def test_family_task_names_stay_in_adapters_and_pass_registrations() -> None:
    from edgecompress import tasknames

    literals = {v for k in FAMILY_NAMES for v in (getattr(tasknames, k) if isinstance(getattr(tasknames, k), tuple)
                                                  else (getattr(tasknames, k),))}
    allowed = ("edgecompress.tasks", "edgecompress.passes", "edgecompress.tasknames", "edgecompress.recipes")
    for path in PKG.rglob("*.py"):
        mod = _module_name(path)
        if any(_within(mod, a) for a in allowed):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else None
            if isinstance(node, ast.ImportFrom):
                assert not {a.name for a in node.names} & set(FAMILY_NAMES), (mod, node.lineno)
            assert name not in FAMILY_NAMES, (mod, node.lineno, name)
            assert not (isinstance(node, ast.Constant) and node.value in literals), (mod, node.lineno, node.value)


def test_a_read_while_the_adapters_load_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The task registry loads the adapters on first read; a read from inside that import would see a half-filled
    registry, so it raises instead."""
    from edgecompress import taskspec

    monkeypatch.setitem(taskspec._state, "loaded", False)
    monkeypatch.setitem(taskspec._state, "loading", True)
    with pytest.raises(RuntimeError, match="being imported"):
        taskspec.spec("feature-extraction")
