"""The MLflow model registry for budgetdiff bundles (issue 19).

A registered model ``budgetdiff`` whose versions each hold one whole bundle (base model,
student, budget predictor, skip policy, ``bundle.json``) as an MLflow pyfunc: prompts in, PNG
or arrays out, through ``budgetdiff.generation.engine.Generator``. Two aliases, never stages:
``challenger`` (the latest registration) and ``champion`` (what serves, moved only by the gate
in ``registry.gate`` or by ``rollback``). The frozen text encoder is stored once per content
hash and referenced by every version that uses it.

    python -m registry register [--bundle models/bundle]   # new version, alias challenger
    python -m registry promote                              # the gate: challenger vs champion
    python -m registry rollback                             # champion back to the previous one
    python -m registry list                                 # versions, aliases, verdicts

This package imports mlflow; the library ``budgetdiff/`` never does.
"""

MODEL_NAME = "budgetdiff"
EXPERIMENT = "budgetdiff-registry"
CHALLENGER = "challenger"
CHAMPION = "champion"


class RegistryError(RuntimeError):
    """A registry operation cannot proceed; the message is one line for the user."""
