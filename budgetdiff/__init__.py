"""budgetdiff: compute-budgeted text-to-image diffusion."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: `import budgetdiff.domain.scenes` stays light; the pipeline (torch, diffusers) loads on use.
    if name in ("BudgetDiffusionPipeline", "BudgetDiffusionOutput"):
        from budgetdiff.generation import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)
