"""Models-from-code entry of the registered pyfunc (``registry.model.BudgetdiffModel``)."""

import mlflow

from registry.model import BudgetdiffModel

mlflow.models.set_model(BudgetdiffModel())
