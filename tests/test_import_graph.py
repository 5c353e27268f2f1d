"""The package's import graph has no cycle (function-level imports included), so every module can be read,
tested and imported on its own; production modules know nothing of the demo or its ground truth."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _modules() -> dict[str, Path]:
    modules = {}
    for package in ("curation_assets", "resources"):
        for path in (REPO / package).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
            modules[name] = path
    return modules


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle():
    graph = _graph()
    assert len(graph) > 40 and "curation_assets.report" in graph["curation_assets.definitions"]
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_walk_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


DEMO_COMMAND = "curation_assets.cli"
"""``curate demo-data`` writes a demo corpus on request: the one production module that may import the demo."""


def test_production_modules_know_nothing_of_the_demo():
    graph = _graph()
    production = [name for name in graph if not name.startswith("curation_assets.demo")]
    assert "curation_assets.safety" in production and "curation_assets.core.regurgitation" in production
    importers = {name: sorted(t for t in graph[name] if t.startswith("curation_assets.demo"))
                 for name in production if name != DEMO_COMMAND}
    assert {name: t for name, t in importers.items() if t} == {}
    modules = _modules()
    mentions = [name for name in production if "ground_truth" in modules[name].read_text()]
    assert mentions == []
    for stage in ("safety", "bias", "dedup", "audits"):
        source = (REPO / "curation_assets" / f"{stage}.py").read_text()
        assert "def demo_" not in source and "SimulatedAnnotator" not in source, stage
