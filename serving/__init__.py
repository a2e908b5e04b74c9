"""budgetdiff's Ray Serve service: an OpenAI-compatible image API over the ``Generator``.

Two deployments, bound together in ``serving.app`` (the import path a Serve config names):

- ``ImageIngress`` (``serving.api``): FastAPI; validation, optional bearer auth, the OpenAI Images
  API (``POST /v1/images/generations``, ``GET /v1/models``), ``GET /healthz`` and the playground
  page at ``/``. It holds no weights.
- ``ImageModel`` (``serving.model``): loads a bundle once through ``Generator.load`` and answers
  with dynamic batching (``@serve.batch``); ``reconfigure(user_config)`` swaps the bundle or the
  skip policy in place without dropping requests.

Replicas, CPUs/GPUs, autoscaling, queue bounds and batch settings live in the YAML profiles under
``serving/configs`` and are checked by ``serving.config`` before anything is deployed. Start and
stop a local cluster with ``python -m serving start`` / ``stop`` (``make serve`` / ``serve-stop``).
"""
