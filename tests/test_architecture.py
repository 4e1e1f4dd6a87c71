"""The package's layering: no import circle between maft's modules (imports inside functions included)."""

import ast
from pathlib import Path

import maft
from helpers import REMOTE_CODE_FILES


PACKAGE_ROOT = Path(maft.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_maft_modules(path: Path, modules: set[str]) -> set[str]:
    """The maft modules `path` imports, absolutely or relatively, anywhere in the file."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {target for target in targets if target in modules}
    return found - {name}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node], stack[len(stack):] = "open", [node]
        for neighbour in sorted(graph[node]):
            if state.get(neighbour) == "open":
                return stack[stack.index(neighbour):] + [neighbour]
            if neighbour not in state and (cycle := visit(neighbour)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE_ROOT.rglob("*.py"))
    modules = {module_name(path) for path in paths}
    # a package's __init__ re-exports its modules; a module importing its own package is not a circle through it
    return {
        module_name(path): {
            target for target in imported_maft_modules(path, modules)
            if not (path.name != "__init__.py" and module_name(path).startswith(target + "."))
        }
        for path in paths
    }


def test_the_import_graph_has_no_circle():
    graph = import_graph()
    assert "maft.training.recipes" in graph and "maft.modeling_maft" in graph["maft.training.recipes"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_model_files_do_not_import_training_code():
    graph = import_graph()
    for model_file in ("maft.configuration_maft", "maft.modeling_maft", "maft.processing_maft", "maft.loss_maft"):
        assert not any(target.startswith(("maft.training", "maft.cli", "maft.evaluation")) for target in graph[model_file])


def test_the_top_level_holds_the_model_files_and_the_concept_folders():
    """transformers copies only the model's flat files into a shared checkpoint; everything else lives in a folder
    named for its concept, so the tree reads as the concept map."""
    modules = {path.name for path in PACKAGE_ROOT.glob("*.py")}
    assert modules == REMOTE_CODE_FILES | {"__init__.py", "__main__.py", "loss_maft.py"}
    packages = {path.parent.name for path in PACKAGE_ROOT.glob("*/__init__.py")}
    assert packages == {
        "cli", "conversion", "data", "demo", "evaluation", "kernels", "metrics", "miniature", "training", "utils"
    }
