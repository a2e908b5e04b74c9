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


# Inside the library: subpackages by concern, importing downwards only.
LIBRARY = {  # budgetdiff/<part> -> the parts it may import
    "errors": set(),
    "io": {"errors"},                                   # files, fingerprints, shards, prompt files
    "text": {"errors"},                                 # the frozen text encoder
    "domain": {"errors", "io"},                         # the procedural domain and its judges
    "metrics": {"errors", "io", "domain"},              # pixel, perceptual, semantic, distributional, quality
    "methods": {"errors", "io", "text"},                # skip hook and policy, budget predictor, auto policy
    "generation": {"errors", "io", "text", "methods"},  # pipeline, engine, step scheduler, bundles
    "statistics": {"errors", "io", "text", "domain"},   # drift tests over served prompts
    "cli": {"errors", "io", "text", "domain", "metrics", "methods", "generation", "statistics"},
    "__init__": {"generation"},
}


def library_part(path: Path) -> str:
    rel = path.relative_to(REPO / "budgetdiff").parts
    return rel[0] if len(rel) > 1 else path.stem


def library_imports(path: Path) -> set[str]:
    parts = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names = [node.module] + ([f"{node.module}.{a.name}" for a in node.names] if node.module == "budgetdiff"
                                     else [])
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            bits = name.split(".")
            if bits[0] == "budgetdiff" and len(bits) > 1:
                parts.add(bits[1])
    return parts


def test_the_library_is_split_by_concern_and_imports_downwards():
    on_disk = {library_part(p) for p in layer_files("budgetdiff")}
    assert on_disk == set(LIBRARY), f"every part of budgetdiff/ needs its row in LIBRARY: {on_disk ^ set(LIBRARY)}"
    wrong = {}
    for path in layer_files("budgetdiff"):
        part = library_part(path)
        bad = library_imports(path) - LIBRARY[part] - {part}
        if bad:
            wrong[str(path.relative_to(REPO))] = sorted(bad)
    assert not wrong, f"budgetdiff/ parts import upwards: {wrong}"
    assert not any(node.level for path in layer_files("budgetdiff")
                   for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.ImportFrom)), \
        "relative imports hide which part of the library a module uses"
