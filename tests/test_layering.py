"""The layers import each other in one direction only, and the shared MLOps helpers have one home.

- ``budgetdiff/`` (the library) imports no other layer, nor mlflow, ray, dvc or lightning;
- ``mlops/`` (what the MLOps layers share) imports only the library;
- the runtime layers (``registry/``, ``monitoring/``, ``serving/``, ``infra/``) never import the
  offline ones (``training/``, ``pipelines/``, ``benchmarks/``), and the stages that build models
  and data (``pipelines/``, ``training/``) import no benchmark;
- params loading, the tracking URI and the lineage tags are defined in ``mlops/`` and nowhere else.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from conftest import REPO

LAYERS = ("budgetdiff", "mlops", "pipelines", "training", "benchmarks", "registry", "monitoring", "serving", "infra")
OFFLINE = {"training", "pipelines", "benchmarks"}
ALLOWED = {
    "budgetdiff": set(),
    "mlops": {"budgetdiff"},
    "registry": {"budgetdiff", "mlops"},
    "monitoring": {"budgetdiff", "mlops", "registry"},
    "serving": {"budgetdiff", "mlops", "registry", "monitoring"},
    "infra": {"budgetdiff", "mlops", "registry", "monitoring", "serving"},
    "pipelines": {"budgetdiff", "mlops"},
    "training": {"budgetdiff", "mlops"},
    "benchmarks": {"budgetdiff", "mlops", "pipelines", "training", "registry", "monitoring", "serving"},
}
FORBIDDEN_IN_LIBRARY = {"mlflow", "ray", "dvc", "lightning"}
SHARED_HELPERS = {"load_params", "tracking_uri", "git_commit", "run_tags", "mlflow_logger"}


def imports(path: Path) -> set[str]:
    """Top-level package names ``path`` imports (absolute imports; relative ones stay in the layer)."""
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def layer_files(layer: str) -> list[Path]:
    return sorted((REPO / layer).rglob("*.py"))


def test_every_layer_is_covered():
    assert set(ALLOWED) == set(LAYERS)
    on_disk = {p.name for p in REPO.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert on_disk - {"tests"} <= set(LAYERS), f"a new package needs its row in ALLOWED: {on_disk - set(LAYERS)}"


@pytest.mark.parametrize("layer", LAYERS)
def test_layer_imports_only_the_layers_below_it(layer):
    wrong = {}
    for path in layer_files(layer):
        bad = (imports(path) & set(LAYERS)) - ALLOWED[layer] - {layer}
        if layer == "budgetdiff":
            bad |= imports(path) & FORBIDDEN_IN_LIBRARY
        if bad:
            wrong[str(path.relative_to(REPO))] = sorted(bad)
    assert not wrong, f"{layer}/ imports what it must not: {wrong}"


def test_runtime_layers_never_import_offline_code():
    for layer in ("registry", "monitoring", "serving", "infra"):
        assert not ALLOWED[layer] & OFFLINE


def test_shared_mlops_helpers_have_one_home():
    homes: dict[str, list[str]] = {}
    for layer in LAYERS:
        for path in layer_files(layer):
            for node in ast.parse(path.read_text()).body:
                if isinstance(node, ast.FunctionDef) and node.name in SHARED_HELPERS:
                    homes.setdefault(node.name, []).append(str(path.relative_to(REPO)))
    assert homes == {"load_params": ["mlops/params.py"], "tracking_uri": ["mlops/tracking.py"],
                     "git_commit": ["mlops/tracking.py"], "run_tags": ["mlops/tracking.py"],
                     "mlflow_logger": ["mlops/tracking.py"]}


def test_the_check_sees_a_forbidden_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nfrom training.base import x\ndef f():\n    import mlflow\nfrom . import sibling\n")
    assert imports(bad) == {"os", "training", "mlflow"}


def test_error_lines_are_printed_by_mlops_cli_only():
    """One format for every command's errors: ``error: ...`` lines come from mlops.cli (the
    library's own CLI, budgetdiff/cli.py, may not import mlops and prints its own)."""
    printers = sorted(str(path.relative_to(REPO)) for layer in LAYERS for path in layer_files(layer)
                      if re.search(r"""(print|echo)\(\s*f?["']error: """, path.read_text()))
    assert printers == ["budgetdiff/cli.py", "mlops/cli.py"]
