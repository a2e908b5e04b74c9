"""What the MLOps layers around the library share.

- ``mlops.params``: a stage's section of params.yaml (``BUDGETDIFF_PARAMS`` picks another file).
- ``mlops.tracking``: the MLflow tracking URI, the experiment and the lineage tags of every run.
- ``mlops.cli``: the command-line edge: an expected error becomes one line and exit status 2.

pipelines/, training/, benchmarks/, registry/, serving/ and monitoring/ import it; the library
``budgetdiff/`` never does (tests/test_layering.py).
"""
