"""The package's layers (pyproject.toml's import-linter contract) and the absence of import cycles.

Both count imports inside functions: a function-level import that points upward is still a dependency,
only a hidden one.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parent.parent


def _lint(cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True, no_logo=True))"
    env = None
    if pythonpath is not None:
        import os

        env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def strongly_connected_components(graph: grimp.ImportGraph) -> list[set[str]]:
    """Tarjan's algorithm over the module graph; components of more than one module are import cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in graph.find_modules_directly_imported_by(module):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == module:
                    break
            if len(component) > 1:
                found.append(component)

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def test_no_module_of_the_package_is_in_an_import_cycle():
    graph = grimp.build_graph("llmk_lab", cache_dir=None)
    assert len(graph.modules) > 50  # the whole package was read
    assert strongly_connected_components(graph) == []


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import():
    graph = grimp.build_graph("llmk_lab", cache_dir=None)
    graph.add_import(importer="llmk_lab.errors", imported="llmk_lab.run")  # run reaches errors: a circle
    components = strongly_connected_components(graph)
    assert len(components) == 1 and {"llmk_lab.errors", "llmk_lab.run"} <= components[0]


def test_the_layers_contract_holds():
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


@pytest.mark.parametrize("module, upward", [
    ("masks.py", "from llmk_lab.run import run"),          # model facts -> orchestration
    ("compression/wanda.py", "from llmk_lab.peft import PEFT"),  # one plug-in -> its sibling
])
def test_the_layers_contract_breaks_on_an_upward_import_inside_a_function(tmp_path, module, upward):
    """The contract run on a copy of the package with one upward import hidden in a function: it fails."""
    shutil.copytree(ROOT / "llmk_lab", tmp_path / "llmk_lab", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / "llmk_lab" / module
    target.write_text(target.read_text() + f"\n\ndef _scratch():\n    {upward}\n")
    result = _lint(tmp_path, pythonpath=tmp_path)
    assert result.returncode != 0
    assert "0 kept, 1 broken" in result.stdout, result.stdout + result.stderr
    imported = upward.split()[1]
    assert imported in result.stdout  # the report names the offending import


def test_methods_declare_what_the_plan_reads_of_them():
    """The plan reads declarations, never a method's internals: each declaration agrees with the code."""
    from llmk_lab.compression import COMPRESSION, CompressionMethod

    for name in COMPRESSION.names():
        cls = COMPRESSION.get(name).cls
        overrides_after_fit = cls.after_fit is not CompressionMethod.after_fit
        assert cls.compresses_after_fit == overrides_after_fit, name
        schema = COMPRESSION.get(name).config
        method = cls(schema()) if name != "chain" else None
        if method is not None:
            has_sparsity = any(f == "sparsity" for f in schema.__dataclass_fields__)
            assert (method.requested_sparsity is not None) == has_sparsity, name
            has_targets = any(f == "target_modules" for f in schema.__dataclass_fields__)
            if method.prunes_while_training:  # where the plan reads the targets
                assert has_targets and method.target_modules is None, name


def test_each_default_has_one_home_the_schema():
    """A compression or PEFT option's YAML names its schema and sets only what differs from the schema's
    defaults (magnitude_nm's 2:4), so no default is written twice."""
    import dataclasses

    import yaml

    from llmk_lab.compression import COMPRESSION
    from llmk_lab.peft import PEFT

    repeated = []
    for group, registry in (("compression", COMPRESSION), ("peft", PEFT)):
        for path in sorted((ROOT / "conf" / group).glob("*.yaml")):
            node = yaml.safe_load(path.read_text()) or {}
            schema = registry.get(node["method"]).config
            defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                        for f in dataclasses.fields(schema)}
            repeated += [f"{group}/{path.name}: {key}" for key, value in node.items()
                         if key not in ("defaults", "method") and key in defaults and value == defaults[key]]
    assert repeated == []
