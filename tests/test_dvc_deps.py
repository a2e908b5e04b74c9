"""Every DVC stage depends on exactly the project code it runs: its module's in-repo imports,
followed transitively, must each be covered by one of the stage's deps (the file or a folder
above it), or `dvc repro` could skip a stage whose results changed; and a code dep it does not
import re-runs it for nothing, unless the stage loads that code another way (listed below)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from conftest import REPO

# Code a stage runs without importing it from its own module: Ray Serve imports the application
# by its path in a config, MLflow loads the pyfunc entry, the monitoring benchmark starts the
# Prometheus helper and the shadow evaluator in other processes.
LOADED_OTHERWISE = {
    "register": {"registry/pyfunc_entry.py"},
    "bench_serve": {"monitoring", "budgetdiff/domain/parse.py", "budgetdiff/statistics/drift.py"},
    "bench_monitor": {"budgetdiff/domain/evaluators.py", "budgetdiff/metrics", "budgetdiff/domain/parse.py", "mlops/tracking.py"},
}
PACKAGES = ("budgetdiff", "training", "pipelines", "benchmarks", "serving", "registry", "monitoring", "mlops")


def module_file(name: str) -> Path | None:
    parts = name.split(".")
    if parts[0] not in PACKAGES:
        return None
    base = REPO.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """In-repo modules ``path`` imports (anywhere in the file; a package's __init__ only at its
    top level, where its lazy attribute hooks do not count)."""
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(REPO).with_suffix("").parts)
    if path.name == "__init__.py":
        package = package.removesuffix(".__init__")
        nodes = tree.body
    else:
        package = package.rsplit(".", 1)[0]
        nodes = list(ast.walk(tree))
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names.add(mod)
            names.update(f"{mod}.{a.name}" for a in node.names)  # `from pkg import module`
    return {n for n in names if n.split(".")[0] in PACKAGES}


def closure(entry: str) -> set[Path]:
    """Files of ``entry``'s transitive in-repo imports (the parents' __init__ files included)."""
    seen: set[Path] = set()
    todo = [entry]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__
            f = module_file(".".join(parts[:i]))
            if f is not None and f not in seen:
                seen.add(f)
                todo.extend(imported_modules(f))
    return seen


def stages() -> list[tuple[str, str, list[str]]]:
    """(stage name, entry module, deps) of every stage; foreach stages expanded by key."""
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    out = []
    for name, stage in spec.items():
        body = stage.get("do", stage)
        match = re.match(r"python -m ([\w.]+)", body["cmd"])
        assert match, f"{name}: cmd {body['cmd']!r} is not `python -m module`"
        deps = [d if isinstance(d, str) else next(iter(d)) for d in body.get("deps", [])]
        out.append((name, match.group(1), deps))
    return out


def defines_code(init: Path) -> bool:
    """Whether a package __init__ defines functions or classes other than a ``__getattr__`` hook."""
    return any(isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name != "__getattr__"
               for node in ast.parse(init.read_text()).body)


def uncovered(files: set[Path], deps: list[str]) -> list[str]:
    """Files in ``files`` not covered by a dep (itself, or a folder above it). A package
    __init__.py that imports nothing of the repository at its top level and defines nothing but
    lazy attribute hooks (a docstring, a version) changes no stage's results and needs no dep;
    one with code of its own (``budgetdiff/io/__init__.py``) runs on every import of the package
    and does."""
    dep_paths = [REPO / d for d in deps]
    missing = []
    for f in sorted(files):
        if f.name == "__init__.py" and not imported_modules(f) and not defines_code(f):
            continue
        if not any(f == d or d in f.parents for d in dep_paths):
            missing.append(str(f.relative_to(REPO)))
    return missing


def unused(files: set[Path], deps: list[str]) -> list[str]:
    """Code deps (a .py file, or a folder of one of the packages) that cover none of ``files``."""
    out = []
    for d in deps:
        path = REPO / d
        is_code = d.endswith(".py") or (path.is_dir() and d.split("/")[0] in PACKAGES)
        if is_code and not any(f == path or path in f.parents for f in files):
            out.append(d)
    return out


@pytest.mark.parametrize("name, entry, deps", stages(), ids=[s[0] for s in stages()])
def test_stage_depends_on_exactly_the_code_it_runs(name, entry, deps):
    assert module_file(entry) is not None, f"{name}: {entry} is not a module of this repository"
    files = closure(entry)
    missing = uncovered(files, deps)
    assert not missing, f"dvc.yaml stage {name} runs {entry} but does not depend on: {', '.join(missing)}"
    extra = sorted(set(unused(files, deps)) - LOADED_OTHERWISE.get(name, set()))
    assert not extra, f"dvc.yaml stage {name} depends on code it never imports: {', '.join(extra)}"


def test_the_checks_fail_on_a_missing_and_on_an_unused_dep():
    files = closure("pipelines.schema")
    assert uncovered(files, ["pipelines/schema.py"]) == ["budgetdiff/io/__init__.py"]
    assert uncovered(files, ["pipelines/schema.py", "budgetdiff"]) == []
    assert unused(files, ["pipelines/schema.py", "budgetdiff/io/__init__.py", "budgetdiff/text.py", "models/base"]) == [
        "budgetdiff/text.py"]


def test_the_closure_follows_relative_and_package_imports():
    files = {str(f.relative_to(REPO)) for f in closure("budgetdiff.generation.engine")}
    assert {"budgetdiff/generation/engine.py", "budgetdiff/generation/pipeline.py", "budgetdiff/methods/adaptive.py", "budgetdiff/text.py",
            "budgetdiff/generation/bundle.py", "budgetdiff/methods/policy.py", "budgetdiff/__init__.py"} <= files
    assert not any(f.startswith(("training/", "benchmarks/")) for f in files)
