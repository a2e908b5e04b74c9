"""The Serve application: ``ImageIngress`` -> ``ImageModel`` -> (sampled) ``ShadowEvaluator``.
Configs name ``serving.app:app``.

Nothing about resources, replicas, queues or batching is set here: the YAML profile supplies it
(``serving/configs``), checked by ``serving.config`` before deployment.
"""

from __future__ import annotations

from ray import serve
from ray.serve.handle import DeploymentHandle

from .api import HandleBackend, IngressState, create_api
from .config import INGRESS, MODEL, SHADOW, IngressOptions
from .model import ImageModel as _ImageModel
from .shadow import ShadowEvaluatorDeployment as _ShadowEvaluator


@serve.deployment(name=INGRESS)
@serve.ingress()
class ImageIngress:
    """HTTP in, OpenAI-shaped JSON out; holds a handle to the model deployment, no weights."""

    def __init__(self, model: DeploymentHandle):
        self.state = IngressState(HandleBackend(model))

    def reconfigure(self, user_config: dict | None) -> None:
        self.state.options = IngressOptions.from_dict(user_config)

    def __serve_build_asgi_app__(self):
        return create_api(self.state)


ImageModel = serve.deployment(name=MODEL)(_ImageModel)
ShadowEvaluator = serve.deployment(name=SHADOW)(_ShadowEvaluator)

app = ImageIngress.bind(ImageModel.bind(ShadowEvaluator.bind()))
