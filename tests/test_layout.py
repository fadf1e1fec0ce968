"""The architecture as checks: layers import downwards only, no import circle, files stay readable, and the
docstring examples of the shared building blocks run."""

import ast
import doctest
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"ivt_env": set(), "rollouts": {"ivt_env"}, "agents": {"ivt_env", "rollouts"}}  # what each may import


def _imports(path: Path) -> set[str]:
    """Top-level package names a module imports (static imports anywhere in the file)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_layers_import_downwards_only(package):
    bad = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        upward = (_imports(path) & set(LAYERS)) - LAYERS[package] - {package}
        if upward:
            bad[str(path.relative_to(ROOT))] = sorted(upward)
    assert not bad, f"imports that run back up the layers ivt_env <- rollouts <- agents: {bad}"


def test_no_source_file_over_450_lines_and_agents_has_few_flat_modules():
    long = {str(p.relative_to(ROOT)): n for pkg in LAYERS for p in (ROOT / pkg).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 450}
    assert not long
    flat = [p.name for p in (ROOT / "agents").glob("*.py")]
    assert len(flat) <= 4, flat


@pytest.mark.parametrize("module", ["ivt_env.registries", "ivt_env.make", "ivt_env.wrappers", "agents.common.schedule"])
def test_docstring_examples(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0, result
