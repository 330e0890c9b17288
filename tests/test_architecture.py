"""The package's import structure: modules import each other without cycles, and the layers point one
way. The reconstruction and scoring layers (data, sfm, splat, scoring, refine, metrics) never import the
detection package (the Detector and its accelerators), the service or the tasks built on them, so that
each can be used and tested without them. Detection has one home, ``splatpose.detect``."""

import ast
import subprocess
import sys
from pathlib import Path

import splatpose

PACKAGE = Path(splatpose.__file__).parent
CORE = ("data", "sfm", "splat", "scoring", "refine", "metrics")
ABOVE_CORE = ("detect", "service", "watch", "tasks", "pipeline")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """splatpose module -> the splatpose modules it imports (at any depth of its code, relative imports
    resolved; ``from package import name`` counts the submodule when ``name`` is one)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets.add(base)
                targets |= {f"{base}.{alias.name}" for alias in node.names}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_modules_import_each_other_without_cycles():
    graph = import_graph()
    assert len(graph) > 50  # the walk found the package
    # a package's __init__ re-exporting its modules is not a cycle of logic: leave the re-exports out
    without_reexports = {m: {t for t in ts if not (m.startswith(t + ".") and t != "splatpose")}
                         for m, ts in graph.items()}
    assert cycles(without_reexports) == []


def test_the_core_layers_never_import_detection_or_what_is_built_on_it():
    above = tuple(f"splatpose.{name}" for name in ABOVE_CORE)
    wrong = sorted((module, target) for module, targets in import_graph().items()
                   if module.split(".")[1:2] and module.split(".")[1] in CORE
                   for target in targets if target.startswith(above))
    assert wrong == []


def test_one_localizer_serves_the_evaluation_and_the_detector():
    from splatpose.detect.localization import ImageLocalizer
    from splatpose.sfm.localization import Localizer

    assert issubclass(ImageLocalizer, Localizer)
    shared = ("extract", "rank", "first_try", "second_try", "retry_pose", "pose_from_matches", "_correspondences",
              "_estimate_pose")
    assert all(name not in ImageLocalizer.__dict__ for name in shared)  # inherited, not copied
    assert "splatpose.detect.localization" in import_graph()["splatpose.detect.detector"]


def test_detection_has_one_home():
    # checked on disk: an editable install of another checkout could still resolve a stale module by name
    assert not (PACKAGE / "detector.py").exists() and not (PACKAGE / "detector").exists()
    from splatpose import Detector
    from splatpose.detect import Detector as PackageDetector
    from splatpose.detect.detector import Detector as ModuleDetector

    assert Detector is PackageDetector is ModuleDetector


def test_cuda_graphs_are_captured_in_one_place():
    # the accelerators (scorer, ALIKED, LightGlue) warm up and capture through splatpose.detect.cuda_graphs
    home = PACKAGE / "detect" / "cuda_graphs.py"
    elsewhere = sorted(str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py") if path != home
                       and any(call in path.read_text() for call in ("torch.cuda.graph(", "torch.cuda.Stream(")))
    assert elsewhere == []


def test_the_detection_package_loads_the_detector_only_when_asked():
    # the service and the watch-folder mode import splatpose.detect.inputs at start-up; the Detector (its
    # networks and renderer) loads when they build one
    script = ("import sys, splatpose.detect.inputs, splatpose.detect.overlays; "
              "assert 'splatpose.detect.detector' not in sys.modules; "
              "from splatpose.detect import Detector; assert Detector.__module__ == 'splatpose.detect.detector'")
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
