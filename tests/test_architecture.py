"""The package's import graph follows the layer order of DESIGN.md, with no cycle.

Every ``import`` of a ``norm_det`` module is read with :mod:`ast` (those inside functions too:
a lazy import is still a dependency). Within the package, a module may import modules of its own
level or below; ``norm_det/layers`` imports nothing of norm_det but itself, and no torchvision,
detectron2 or mmcv.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "norm_det"

# DESIGN.md: layers <- schemes <- surgery, modeling <- data, evaluation, solver <- engine <- tools;
# the packages DESIGN.md does not draw are placed where what they import puts them.
LEVELS = {
    "files": 0,
    "utils": 0,
    "layers": 0,
    "config": 1,
    "schemes": 1,
    "activation_blocks": 2,
    "surgery": 2,
    "modeling": 2,
    "data": 3,
    "evaluation": 3,
    "solver": 3,
    "diagnostics": 3,
    "studies": 3,
    "weights": 3,
    "checkpoint": 3,  # the deprecated name of weights
    "engine": 4,
    "benchmarks": 4,
    "integrations": 4,
    "mm": 5,
    "model_zoo": 5,
}
_FRAMEWORKS_LAYERS_MAY_NOT_IMPORT = ("torchvision", "detectron2", "mmcv", "mmdet", "mmengine")


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ("norm_det", *path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _imports(name: str, path: Path) -> list[str]:
    """Every module name ``path`` imports (absolute; relative imports resolved)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            found += [module, *(f"{module}.{alias.name}" for alias in node.names)]
    return found


def _graph() -> dict[str, set[str]]:
    """Module -> the norm_det modules it imports."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for target in _imports(name, path):
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target.startswith("norm_det") and target != name:
                graph[name].add(target)
    return graph


def _top(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def test_every_top_level_part_has_a_level():
    parts = {_top(m) for m in _modules()} - {""}
    assert parts <= set(LEVELS), f"place these in LEVELS: {sorted(parts - set(LEVELS))}"


def test_no_import_goes_up_the_layer_order():
    upward = [
        f"{source} -> {target}"
        for source, targets in _graph().items()
        for target in targets
        if _top(source) and _top(target) and LEVELS[_top(target)] > LEVELS[_top(source)]
    ]
    assert not upward, "imports against DESIGN.md's order:\n" + "\n".join(sorted(upward))


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_layers_import_only_torch_and_themselves():
    modules = _modules()
    wrong = []
    for name, path in modules.items():
        if _top(name) != "layers":
            continue
        for target in _imports(name, path):
            inside = target.startswith("norm_det.") and not target.startswith("norm_det.layers")
            if inside or target.split(".")[0] in _FRAMEWORKS_LAYERS_MAY_NOT_IMPORT:
                wrong.append(f"{name} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_the_old_module_paths_still_work_and_warn():
    import importlib
    import sys
    import warnings

    for old, new in (
        ("norm_det.checkpoint", "norm_det.weights"),
        ("norm_det.engine.checkpoint", "norm_det.engine.checkpointer"),
        ("norm_det.evaluation.distributed", "norm_det.utils.comm"),
    ):
        sys.modules.pop(old, None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            module = importlib.import_module(old)
        assert any(issubclass(w.category, DeprecationWarning) for w in caught)
        assert module is importlib.import_module(new) or module.__all__ == (
            importlib.import_module(new).__all__
        )
    from norm_det.checkpoint.formats import read_checkpoint

    from norm_det.weights.formats import read_checkpoint as current

    assert read_checkpoint is current
