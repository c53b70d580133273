"""The project's own imports form no cycle: layers import downward only (issue 16).

Every .py file of app.py, components/ and pipelines/ is parsed with `ast`. Every import counts,
at module level and inside functions alike: a lazy import that hides a cycle is still a cycle.
`from x import y` points at the module `x.y` when that is a module of the project, else at `x`.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("components", "pipelines")
LAYERS = {"pipelines": 0, "components": 1, "app": 2}  # a layer imports only from layers below it
# The bottom of pipelines/: shared data and types that everything may import, so they import none
# of the project's other modules (the catalog used to import the tiny-model builder).
BOTTOM = frozenset({"pipelines.catalog", "pipelines.errors", "pipelines.settings"})
# Above the bottom, the shared tools every model package may use; they import no model package.
SHARED = BOTTOM | {
    f"pipelines.{name}"
    for name in ("architectures", "images", "ownership", "runtime", "tiny", "validation", "workspace")
}
# The subpackages of pipelines/, and what each must not import: the model packages sit side by side
# (sd3 may use lora, nothing else crosses), training and roundtrip build on them and not on each other.
# The Studio's assembly (pipelines.studio, pipelines.startup) sits above every subpackage.
SUBPACKAGES_NOT_IMPORTED = {
    "pipelines.memory": {
        "pipelines.blip",
        "pipelines.sd3",
        "pipelines.lora",
        "pipelines.training",
        "pipelines.roundtrip",
    },
    "pipelines.lora": {"pipelines.blip", "pipelines.sd3", "pipelines.training", "pipelines.roundtrip"},
    "pipelines.blip": {"pipelines.sd3", "pipelines.lora", "pipelines.training", "pipelines.roundtrip"},
    "pipelines.sd3": {"pipelines.blip", "pipelines.training", "pipelines.roundtrip"},
    "pipelines.training": {"pipelines.roundtrip"},
    "pipelines.roundtrip": {"pipelines.training"},
}
ASSEMBLY = {"pipelines.studio", "pipelines.startup"}


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_files(root: Path = ROOT) -> dict[str, Path]:
    """Module name -> file, for app.py and every .py under components/ and pipelines/."""
    files = {"app": root / "app.py"}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            files[module_name(path, root)] = path
    return files


def imported_modules(name: str, path: Path, modules: set[str]) -> set[str]:
    """The project modules that `name` imports anywhere in its file (module level or in a function)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = name.split(".") if is_package else name.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join([*package, base] if base else package)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            # `import pipelines.sd3.loading.x` names an attribute; keep the longest prefix that is one of ours.
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    files = project_files(root)
    modules = set(files)
    return {name: imported_modules(name, path, modules) for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def describe(component: frozenset[str], graph: dict[str, set[str]]) -> str:
    """One cycle through the component, written a -> b -> ... -> a."""
    start = min(component)
    path, seen = [start], {start}
    while True:
        following = sorted(target for target in graph[path[-1]] if target in component)
        closing = start in following
        unvisited = [target for target in following if target not in seen]
        if closing and (len(path) > 1 or not unvisited):
            return " -> ".join([*path, start]) + f"  (cycle among {', '.join(sorted(component))})"
        if not unvisited:  # rare: fall back to naming the members only
            return "cycle among " + ", ".join(sorted(component))
        path.append(unvisited[0])
        seen.add(unvisited[0])


def test_the_graph_sees_lazy_and_relative_imports(tmp_path):
    """The parser itself: a function-level import and a relative `from . import x` are edges."""
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "components").mkdir()
    (tmp_path / "app.py").write_text("from components.tab import build\n")
    (tmp_path / "pipelines" / "__init__.py").write_text("")
    (tmp_path / "pipelines" / "low.py").write_text("def f():\n    from pipelines import high\n")
    (tmp_path / "pipelines" / "high.py").write_text("from . import low\n")
    (tmp_path / "components" / "tab.py").write_text("def build():\n    import app\n")
    graph = import_graph(tmp_path)
    assert graph["pipelines.low"] == {"pipelines.high"}
    assert graph["pipelines.high"] == {"pipelines.low"}
    assert graph["components.tab"] == {"app"}
    assert sorted(map(sorted, cycles(graph))) == [["app", "components.tab"], ["pipelines.high", "pipelines.low"]]
    assert "pipelines.high -> pipelines.low -> pipelines.high" in describe(
        frozenset({"pipelines.high", "pipelines.low"}), graph
    )


def test_no_import_cycle_among_app_components_and_pipelines():
    graph = import_graph()
    found = cycles(graph)
    assert not found, "import cycles (move the shared piece below both):\n" + "\n".join(
        describe(component, graph) for component in found
    )


def test_layers_import_downward_only():
    """pipelines/ imports neither components/ nor app; components/ never import app; nothing imports
    bench/ or tests/ (benchmarks and tests sit above the app)."""
    upward = []
    for name, path in project_files().items():
        layer = LAYERS[name.split(".")[0]]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                targets = [node.module or ""]
            else:
                continue
            for target in targets:
                top = target.split(".")[0]
                if top in ("bench", "tests") or LAYERS.get(top, -1) > layer:
                    upward.append(f"{name} imports {target} (line {node.lineno})")
    assert not upward, "imports that point up a layer:\n" + "\n".join(upward)


def test_the_bottom_modules_import_only_each_other():
    graph = import_graph()
    reaching_up = {name: sorted(graph[name] - BOTTOM) for name in sorted(BOTTOM) if graph[name] - BOTTOM}
    assert not reaching_up, f"the bottom modules import from above them: {reaching_up}"


def test_the_shared_tools_import_no_model_package():
    graph = import_graph()
    reaching_up = {name: sorted(graph[name] - SHARED) for name in sorted(SHARED) if graph[name] - SHARED}
    assert not reaching_up, f"the shared modules of pipelines/ import from above them: {reaching_up}"


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_subpackages_keep_their_order():
    """Each subpackage of pipelines/ imports only what sits beside or below it (see SUBPACKAGES_NOT_IMPORTED)."""
    graph = import_graph()
    for package in SUBPACKAGES_NOT_IMPORTED:
        assert package in graph, f"{package} is gone: update SUBPACKAGES_NOT_IMPORTED"
    crossing = []
    for name in sorted(graph):
        for package, forbidden in SUBPACKAGES_NOT_IMPORTED.items():
            if not within(name, package):
                continue
            for target in sorted(graph[name]):
                if any(within(target, other) for other in forbidden | ASSEMBLY):
                    crossing.append(f"{name} imports {target}")
    assert not crossing, "a subpackage imports one beside or above it:\n" + "\n".join(crossing)


def test_subpackages_import_neither_the_ui_nor_gradio():
    """No subpackage of pipelines/ imports components/, app or gradio, lazily or not."""
    offenders = []
    for name, path in project_files().items():
        if not any(within(name, package) for package in SUBPACKAGES_NOT_IMPORTED):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                targets = [node.module or ""]
            else:
                continue
            offenders += [
                f"{name} imports {target} (line {node.lineno})"
                for target in targets
                if target.split(".")[0] in ("components", "app", "gradio")
            ]
    assert not offenders, "subpackages of pipelines/ that import the UI:\n" + "\n".join(offenders)


def test_pipelines_never_import_gradio():
    """pipelines/ is usable from Python and the CLIs: the UI library stays in components/ and app.py."""
    offenders = []
    for name, path in project_files().items():
        if not name.startswith("pipelines"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                targets = [node.module or ""]
            else:
                continue
            offenders += [f"{name} (line {node.lineno})" for target in targets if target.split(".")[0] == "gradio"]
    assert not offenders, f"pipelines/ modules that import gradio: {offenders}"


# ----------------------------------------------------------------------------- one entry point draws

# The drawing functions behind GenerationService.__call__: only the service (pipelines.sd3.generation)
# calls them. The UI, the round trip and the benchmarks hand the service a request instead.
DRAWING_FUNCTIONS = {
    "pipelines.sd3.text_to_image": {"generate"},
    "pipelines.sd3.controlnet": {"run", "draw", "make_control_map", "controlnet_pipeline"},
    "pipelines.sd3.image_to_image": {"run", "draw", "derived_pipeline"},
}
# The service's own steps, which only it chains (a caller that runs them one by one draws around it).
SERVICE_STEPS = {"prepare", "draw", "finish"}


def drawing_calls(path: Path) -> list[str]:
    """Where ``path`` reaches past the entry point: a drawing function imported (or its module imported
    whole, as ``from pipelines.sd3 import controlnet``), or a service step called as an attribute."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module in DRAWING_FUNCTIONS:
            found += [
                f"line {node.lineno}: imports {node.module}.{alias.name}"
                for alias in node.names
                if alias.name in DRAWING_FUNCTIONS[node.module]
            ]
        elif isinstance(node, ast.ImportFrom) and node.module == "pipelines.sd3":
            found += [
                f"line {node.lineno}: imports pipelines.sd3.{alias.name}"
                for alias in node.names
                if f"pipelines.sd3.{alias.name}" in DRAWING_FUNCTIONS
            ]
        elif isinstance(node, ast.Import):
            found += [
                f"line {node.lineno}: imports {alias.name}" for alias in node.names if alias.name in DRAWING_FUNCTIONS
            ]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in SERVICE_STEPS:
            found.append(f"line {node.lineno}: calls .{node.func.attr}()")
    return found


def callers_of_the_service(root: Path = ROOT) -> list[Path]:
    """Every file that must draw through the entry point: app.py, components/, pipelines/roundtrip/, bench/."""
    return [
        root / "app.py",
        *sorted((root / "components").rglob("*.py")),
        *sorted((root / "pipelines" / "roundtrip").rglob("*.py")),
        *sorted((root / "bench").rglob("*.py")),
    ]


def test_only_the_generation_service_draws_sd35():
    offenders = {
        str(path.relative_to(ROOT)): found for path in callers_of_the_service() if (found := drawing_calls(path))
    }
    assert not offenders, f"Draw through GenerationService.__call__ (pipelines/sd3/generation.py): {offenders}"


def test_the_entry_point_check_sees_each_way_round(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from pipelines.sd3 import controlnet\n"
        "from pipelines.sd3.image_to_image import run as redraw\n"
        "from pipelines.sd3.text_to_image import generate, snap\n"
        "def f(service, job):\n"
        "    prepared = service.prepare(job)\n"
        "    return service.finish(prepared, service.draw(prepared))\n"
    )
    found = drawing_calls(bad)
    assert {line.split(": ")[1] for line in found} == {
        "imports pipelines.sd3.controlnet",
        "imports pipelines.sd3.image_to_image.run",
        "imports pipelines.sd3.text_to_image.generate",
        "calls .prepare()",
        "calls .finish()",
        "calls .draw()",
    }
