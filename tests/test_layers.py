"""The core's layers point one way. Each subpackage of `tritonasr` is a layer and imports only
the layers below it (and the foundation modules at the top of the package); only the CLI ties the
core to its consumers (export, client, loadtest). Every import counts, function-level ones too."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import tritonasr

CORE = Path(tritonasr.__file__).parent
# Bottom to top. The foundation: modules directly in tritonasr/ (contract, errors, paths, audio).
LAYERS = ["models", "recognition", "runtime", "repository", "serving"]
CONSUMERS = ("tritonasr.export", "tritonasr.client", "tritonasr.loadtest")
CLI = CORE / "cli.py"


def _core_modules() -> list[Path]:
    return sorted(p for p in CORE.rglob("*.py") if "model_templates" not in p.parts)


def _layer(module: str) -> int:
    """-1: the foundation; otherwise the index in LAYERS."""
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 2 and parts[1] in LAYERS else -1


def _module_name(path: Path) -> str:
    relative = path.relative_to(CORE.parent).with_suffix("")
    parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
    return ".".join(parts)


def _imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [f"{node.module}.{alias.name}" for alias in node.names]
    return [name for name in found if name.split(".")[0] == "tritonasr"]


def test_every_subpackage_is_a_known_layer():
    packages = {p.name for p in CORE.iterdir() if (p / "__init__.py").is_file()}
    assert packages == set(LAYERS)


@pytest.mark.parametrize("path", _core_modules(), ids=lambda p: str(p.relative_to(CORE)))
def test_imports_point_down(path):
    module = _module_name(path)
    own = _layer(module)
    for imported in _imports(path):
        if imported.startswith(CONSUMERS):
            assert path == CLI, f"{module} imports {imported}: only the CLI may import export, client, loadtest"
            continue
        if path == CLI:
            continue
        target = _layer(imported)
        assert target <= own, (
            f"{module} ({LAYERS[own] if own >= 0 else 'foundation'}) imports {imported} "
            f"({LAYERS[target] if target >= 0 else 'foundation'}): a layer imports only those below it")


def test_the_check_catches_an_upward_import(tmp_path):
    """The test above can fail: an upward import in a model spec is found."""
    bad = tmp_path / "spec.py"
    bad.write_text("def f():\n    from tritonasr.runtime.in_process import LocalPipeline\n")
    assert _imports(bad) == ["tritonasr.runtime.in_process.LocalPipeline"]
    assert _layer("tritonasr.runtime.in_process.LocalPipeline") > _layer("tritonasr.models.vad")
