"""Deployment on Kubernetes: the KubeRay ``RayService`` and the Prometheus ``PodMonitor``
(rendered by ``python -m infra.render`` from ``serving/configs/gpu.yaml`` into ``infra/k8s/``),
their offline checks (``infra.checks``) and the GPU image (``infra/docker/``), whose entrypoint
fetches a registered bundle with ``python -m registry fetch`` (``registry.resolve.fetch``).
See docs/kubernetes.md.
"""
