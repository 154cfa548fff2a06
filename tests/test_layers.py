"""The package's imports only go down (docs/architecture.md): parsed from the source, so a
circle or an upward import fails here before anyone has to untangle it."""

import ast
from pathlib import Path

import pytest

from fedapps.config import METHOD_SECTIONS
from fedapps.registry import METHODS, client_handlers

PACKAGE = Path(__file__).resolve().parent.parent / "fedapps"

# Lowest first; a module may import its own layer or lower ones, never a higher one.
LAYERS = [
    ("fedapps.models", "fedapps.data.base", "fedapps.data.devices", "fedapps.data.registry",
     "fedapps.data.partition", "fedapps.data.shapes", "fedapps.data.flwr_partitioner"),
    ("fedapps.config",),
    ("fedapps.data.federated",),
    ("fedapps.training", "fedapps.tuning", "fedapps.privacy"),
    ("fedapps.protocol",),
    ("fedapps.methods",),
    ("fedapps.registry",),
    ("fedapps.server", "fedapps.client"),
    ("fedapps.launch", "fedapps.deploy", "fedapps.simulation", "fedapps.inprocess",
     "fedapps.compare", "fedapps.data.split"),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path) -> list[tuple[str, int, bool]]:
    """``(imported module, line, at module level)`` for every fedapps import in ``path``."""
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fedapps"):
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            # "from fedapps.methods import fedme" imports the module fedapps.methods.fedme
            targets = [n for n in names if (PACKAGE.parent / (n.replace(".", "/") + ".py")).exists()
                       or (PACKAGE.parent / n.replace(".", "/")).is_dir()] or [node.module]
            found += [(t, node.lineno, id(node) in top_level) for t in targets]
        elif isinstance(node, ast.Import):
            found += [(a.name, node.lineno, id(node) in top_level) for a in node.names
                      if a.name.startswith("fedapps")]
    return found


def layer_of(module: str) -> int:
    for number, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return number
    if module == "fedapps":
        return -1  # the package root holds only its version
    raise AssertionError(f"{module} is in no layer; add it to LAYERS and docs/architecture.md")


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        graph[module_name(path)] = {target for target, _, _ in project_imports(path)}
    return graph


def test_every_import_points_down_or_sideways_and_at_module_level():
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        for target, line, top in project_imports(path):
            if layer_of(target) > layer_of(module):
                problems.append(f"{module}:{line} imports {target} from a higher layer")
            if not top:
                problems.append(f"{module}:{line} imports {target} inside a function")
    assert not problems, "\n".join(problems)


def test_no_import_circle():
    graph = import_graph()
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                pytest.fail("import circle: " + " -> ".join([*path, module, target]))
            if target in graph and target not in state:
                visit(target, [*path, module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_every_configured_method_has_a_home_and_every_home_a_config_section():
    assert set(METHODS) == set(METHOD_SECTIONS)
    handlers = client_handlers()  # raises when two methods claim one message type
    for name, method in METHODS.items():
        for message_type, handler in method.handlers.items():
            assert handlers[message_type] is handler, name
