"""The package's layering (docs/ARCHITECTURE.md): imports, module-level or inside functions, flow from the top
of the model side down to the ops, never up and never in a cycle. Read from the sources, so it needs neither
transformers nor vLLM."""

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "evoprune_ext"

# Bottom to top; a module may import modules of its own layer or below. Prefixes name subpackages.
LAYERS = [
    ["evoprune_ext._C", "evoprune_ext.defaults", "evoprune_ext.ops", "evoprune_ext.reference", "evoprune_ext.testing"],
    ["evoprune_ext.schedule", "evoprune_ext.swap", "evoprune_ext.pruning"],
    ["evoprune_ext.towers"],
    ["evoprune_ext.adapters", "evoprune_ext.vllm"],
    ["evoprune_ext.patching"],
    ["evoprune_ext", "evoprune_ext.demo", "evoprune_ext.__main__", "evoprune_ext.random_models"],
]


def module_name(path: Path, root: Path = PACKAGE.parent) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imports(name: str) -> set[str]:
    """The package's modules that module `name` imports anywhere in its source."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # `from package import name` imports the submodule `package.name` when there is one.
            found |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names}
    return {module for module in found if module in MODULES or module == "evoprune_ext._C"} - {name}


def layer(name: str) -> int:
    matches = [(len(prefix), i) for i, prefixes in enumerate(LAYERS) for prefix in prefixes
               if name == prefix or name.startswith(prefix + ".")]
    assert matches, f"{name} is in no layer of LAYERS: place it"
    return max(matches)[1]


def test_every_module_has_a_layer():
    for name in MODULES:
        layer(name)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_flow_down(name):
    upward = [other for other in imports(name) if layer(other) > layer(name)]
    assert not upward, f"{name} (layer {layer(name)}) imports {upward} from above it"


def test_no_import_cycle():
    graph = {name: imports(name) for name in MODULES}
    state = {}  # name -> "open" while on the DFS path, "done" after

    def visit(name, path):
        state[name] = "open"
        for other in sorted(graph.get(name, ())):
            if state.get(other) == "open":
                raise AssertionError(f"import cycle: {' -> '.join(path[path.index(other):] + [other])}")
            if other not in state:
                visit(other, path + [other])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_adapters_and_the_vllm_plugin_stay_apart():
    """Both sit on the same plumbing; neither reaches into the other (the plugin must not need transformers'
    adapters, the adapters must not need vLLM)."""
    for name in MODULES:
        for other in imports(name):
            for a, b in (("evoprune_ext.adapters", "evoprune_ext.vllm"), ("evoprune_ext.vllm", "evoprune_ext.adapters")):
                assert not (name.startswith(a) and other.startswith(b)), f"{name} imports {other}"


def test_the_checker_sees_a_cycle(tmp_path, monkeypatch):
    """The cycle check is real: two modules importing each other are caught."""
    (tmp_path / "evoprune_ext").mkdir()
    (tmp_path / "evoprune_ext" / "__init__.py").write_text("")
    (tmp_path / "evoprune_ext" / "schedule.py").write_text("def f():\n    from evoprune_ext import swap\n")
    (tmp_path / "evoprune_ext" / "swap.py").write_text("from evoprune_ext.schedule import f\n")
    fake = {module_name(path, tmp_path): path for path in (tmp_path / "evoprune_ext").rglob("*.py")}
    monkeypatch.setattr(sys.modules[__name__], "MODULES", fake)
    with pytest.raises(AssertionError, match="import cycle: evoprune_ext.schedule -> evoprune_ext.swap"):
        test_no_import_cycle()
