"""The layers depend downward only: ``flows`` imports neither ``exporters`` nor ``runtime``, and those two
never import each other. What both need lives in neutral modules (``computations``, ``onnx_util``,
``trt_util``, ``data``); ``pipeline`` is where an export meets its verification.

Every import statement counts, the lazy ones inside functions too: the source is read with ``ast``.
A second check imports each module in a fresh interpreter and looks at ``sys.modules``.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "acf_deploy"
#: layer -> the layers it must not import
FORBIDDEN = {
    "flows": ("exporters", "runtime"),
    "exporters": ("runtime",),
    "runtime": ("exporters",),
}


def _modules(layer: str) -> list[Path]:
    return sorted((PACKAGE / layer).rglob("*.py"))


def _imported(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved), at any depth."""
    package = ["acf_deploy", *path.relative_to(PACKAGE).parent.parts]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)  # ``from .. import runtime``
    return names


def _violations(layer: str) -> list[str]:
    found = []
    for path in _modules(layer):
        for name in sorted(_imported(path)):
            for other in FORBIDDEN[layer]:
                if name == f"acf_deploy.{other}" or name.startswith(f"acf_deploy.{other}."):
                    found.append(f"{path.relative_to(PACKAGE.parent)} imports {name}")
    return found


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layers_depend_downward_only(layer: str):
    assert _modules(layer), f"no modules found in acf_deploy/{layer}"
    assert _violations(layer) == []


def test_importing_a_layer_loads_no_forbidden_layer():
    """The same rule at run time: importing every module of a layer leaves the forbidden ones unloaded."""
    script = """
import importlib, json, pkgutil, sys
layer, forbidden = sys.argv[1], sys.argv[2:]
package = importlib.import_module("acf_deploy." + layer)
for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
    importlib.import_module(info.name)
print(json.dumps(sorted(m for m in sys.modules if any(m.startswith("acf_deploy." + f) for f in forbidden))))
"""
    for layer, forbidden in FORBIDDEN.items():
        result = subprocess.run(
            [sys.executable, "-c", script, layer, *forbidden], capture_output=True, text=True, check=True
        )
        assert json.loads(result.stdout) == [], f"importing acf_deploy.{layer} loaded {result.stdout.strip()}"
