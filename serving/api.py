"""The ingress: the OpenAI Images API, validation, bearer auth and the playground, as a FastAPI app.

``create_api(state)`` builds the app over a ``ModelBackend``: ``HandleBackend`` (a Serve
``DeploymentHandle`` to ``ImageModel``; what ``serving.app`` deploys) or ``LocalBackend`` (an
in-process ``LocalImageModel``; tests). Routes:

- ``POST /v1/images/generations``: OpenAI's body (``prompt``, ``n``, ``size``, ``response_format``,
  ``model``, ...) plus budgetdiff's fields ``mode`` (default auto), ``quality_target``, ``steps``,
  ``seed``, ``guidance``, ``scheduler`` (the engine's names: docs/engine.md). The body is parsed once
  into ``ImagesRequest`` and converted once into ``GenerationRequest``\ s, which go to the model
  deployment as they are. Reply ``{created, data: [{b64_json, record}], usage, model,
  model_version, id}``; each ``record`` says mode, steps, NFE, skipped steps, the model version and
  the latency.
- ``GET /v1/models``, ``GET /v1/models/{id}``: the served model, its version, sizes and modes.
- ``GET /healthz``: 200 when the model deployment answers (``saturated`` when its queue is full).
- ``GET /``: the playground page.

Every error is OpenAI's ``{"error": {"message", "type", "param", "code"}}``: 400 bad input (the
message starts with the field, which is also ``param``: a ``RequestError``'s ``field``), 401 key, 404 model or route, 413 body,
422 valid but not servable by the loaded bundle, 429/503 overload with ``Retry-After``, 504 the
ingress's own timeout.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import os
import random
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from budgetdiff.generation.engine import GenerationRequest
from budgetdiff.errors import RequestError

from .config import IngressOptions

PLAYGROUND = Path(__file__).resolve().parent / "playground.html"
ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
               405: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
               429: "rate_limit_error", 503: "server_error", 504: "server_error", 500: "server_error"}
SIZE_RE = re.compile(r"^(\d{1,5})x(\d{1,5})$")
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


class APIError(Exception):
    """An error reply in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 retry_after_s: float | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.retry_after_s = retry_after_s

    def response(self) -> JSONResponse:
        headers = {}
        if self.retry_after_s is not None:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after_s)))
        body = {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=headers)


def request_error(exc: RequestError, status: int = 400, code: str = "invalid_value") -> APIError:
    """A ``RequestError`` as an APIError: its field is ``param`` (the API's and the engine's names
    are the same)."""
    return APIError(status, str(exc), exc.field, code)


# ----------------------------------------------------------------------------------------------
# The request body (pure: no model, no Ray)
# ----------------------------------------------------------------------------------------------
Number = StrictFloat | StrictInt


class ImagesRequest(BaseModel):
    """The body of ``POST /v1/images/generations``: OpenAI's fields and budgetdiff's, named as the
    engine names them (``steps``, ``guidance``; ``num_inference_steps`` and ``guidance_scale``,
    the diffusers names, are accepted for the same fields). Types are checked here; the
    generation fields' rules are ``GenerationRequest``'s, applied once by ``to_requests``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: StrictStr
    n: StrictInt | None = None
    size: StrictStr | None = None
    response_format: StrictStr | None = None
    model: StrictStr | None = None
    output_format: StrictStr | None = None
    output_compression: StrictInt | None = None
    stream: StrictBool | None = None
    partial_images: StrictInt | None = None
    quality: StrictStr | None = None  # quality, style, background, moderation: accepted for compatibility;
    style: StrictStr | None = None    # the model has no such control
    background: StrictStr | None = None
    moderation: StrictStr | None = None
    user: StrictStr | None = None
    # budgetdiff's fields: GenerationRequest's names
    mode: StrictStr | None = None
    quality_target: Number | None = None
    steps: StrictInt | None = Field(None, validation_alias=AliasChoices("steps", "num_inference_steps"))
    seed: StrictInt | None = None
    guidance: Number | None = Field(None, validation_alias=AliasChoices("guidance", "guidance_scale"))
    scheduler: StrictStr | None = None

    @classmethod
    def field_names(cls) -> list[str]:
        names = []
        for name, info in cls.model_fields.items():
            choices = getattr(info.validation_alias, "choices", None)
            names += list(choices) if choices else [name]
        return names

    @classmethod
    def parse(cls, body: Any) -> "ImagesRequest":
        """The body as an ``ImagesRequest``; APIError 400 naming the first field at fault."""
        if not isinstance(body, dict):
            raise APIError(400, f"body: must be a JSON object, got {_type_name(body)}", None, "invalid_json")
        both = [k for k in (("steps", "num_inference_steps"), ("guidance", "guidance_scale")) if set(k) <= set(body)]
        if both:
            raise APIError(400, f"{both[0][0]}: give {both[0][0]} or {both[0][1]}, not both", both[0][0],
                           "invalid_value")
        try:
            return cls.model_validate(body)
        except ValidationError as exc:
            raise _body_error(exc.errors()[0]) from None

    def check(self, options: IngressOptions, native_sizes: list[str] | None) -> None:
        """The service's own limits (prompt length, n, sizes, formats, the model's name)."""
        if len(self.prompt) > options.max_prompt_chars:
            raise APIError(400, f"prompt: is {len(self.prompt)} characters; the most is {options.max_prompt_chars}",
                           "prompt", "string_above_max_length")
        if self.model is not None and self.model != options.model_id:
            raise APIError(404, f"model: the model {self.model!r} does not exist; this service serves "
                                f"{options.model_id!r}", "model", "model_not_found")
        n = 1 if self.n is None else self.n
        if not 1 <= n <= options.max_n:
            raise APIError(400, f"n: must be an integer in 1..{options.max_n}, got {n!r}", "n", "invalid_value")
        if self.size is not None and self.size != "auto":
            if not SIZE_RE.match(self.size):
                raise APIError(400, f"size: must be WIDTHxHEIGHT or auto, got {self.size!r}", "size", "invalid_size")
            if native_sizes and self.size not in native_sizes:
                raise APIError(400, f"size: {self.size} is not supported; this model generates "
                                    f"{', '.join(native_sizes)} (or auto)", "size", "invalid_size")
        if self.response_format not in (None, "b64_json"):
            hint = "url is not served" if self.response_format == "url" else f"{self.response_format!r} is unknown"
            raise APIError(400, f"response_format: {hint}; use b64_json", "response_format", "invalid_value")
        if self.output_format not in (None, "png"):
            raise APIError(400, f"output_format: only png is served, got {self.output_format!r}", "output_format",
                           "invalid_value")
        if self.stream:
            raise APIError(400, "stream: streaming is not supported", "stream", "invalid_value")

    def to_requests(self, request_id: str) -> list[GenerationRequest]:
        """The ``n`` engine requests this body asks for: one ``GenerationRequest`` (its rules
        checked here, once), then one copy per image at seed + i (``for_image``)."""
        seed = random.randrange(2**31) if self.seed is None else self.seed
        try:
            first = GenerationRequest(self.prompt, mode=self.mode or "auto", steps=self.steps,
                                      quality_target=self.quality_target, scheduler=self.scheduler,
                                      guidance=self.guidance, seed=seed)
            return [first.for_image(i, f"{request_id}/{i}") for i in range(1 if self.n is None else self.n)]
        except RequestError as exc:
            raise request_error(exc) from None


_TYPE_WORDS = {"string_type": "a string", "int_type": "an integer", "float_type": "a number",
               "bool_type": "a boolean", "int_from_float": "an integer"}


def _body_error(err: dict) -> APIError:
    """A pydantic error on the body as the API's one-line error naming the field."""
    name = str(err["loc"][0]) if err.get("loc") else None
    kind = err.get("type", "")
    if kind == "missing":
        return APIError(400, f"{name}: is required", name, "missing_required_parameter")
    if kind == "extra_forbidden":
        return APIError(400, f"{name}: unrecognized request argument (known: "
                             f"{', '.join(ImagesRequest.field_names())})", name, "unknown_parameter")
    if kind in _TYPE_WORDS:
        return APIError(400, f"{name}: must be {_TYPE_WORDS[kind]}, got {_type_name(err.get('input'))}", name,
                        "invalid_type")
    return APIError(400, f"{name}: {err.get('msg', 'is not valid')}", name, "invalid_value")


def _type_name(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object",
            type(None): "null"}.get(type(value), type(value).__name__)


def parse_json_body(raw: bytes) -> Any:
    """The request body as JSON (400 naming what is wrong with it)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise APIError(400, f"body: is not valid UTF-8 (byte {exc.start})", None, "invalid_encoding") from None
    if not text.strip():
        raise APIError(400, "body: is empty; send a JSON object with at least a prompt", None, "invalid_json")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise APIError(400, f"body: is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})",
                       None, "invalid_json") from None


def safe_request_id(header: str | None) -> str:
    """The caller's x-request-id when it is safe to echo into records and logs, else a new one."""
    return header if header and REQUEST_ID_RE.match(header) else uuid.uuid4().hex[:16]


def build_reply(request_id: str, result: dict, options: IngressOptions, started: float) -> dict:
    """The OpenAI-shaped reply for a model result, with per-image records and usage."""
    latency_ms = round((time.perf_counter() - started) * 1000, 2)
    data = []
    for image in result["images"]:
        record = {**image["record"], "latency_ms": latency_ms}
        data.append({"b64_json": image["b64_json"], "record": record})
    records = [d["record"] for d in data]
    usage = {"images": len(data), "steps": sum(r.get("steps") or 0 for r in records),
             "nfe": sum(r.get("nfe") or 0 for r in records),
             "skipped": sum(r.get("skipped") or 0 for r in records),
             "unet_sample_evals": sum(r.get("unet_sample_evals") or 0 for r in records)}
    return {"created": int(time.time()), "id": request_id, "model": options.model_id,
            "model_version": result["model_version"]["id"], "data": data, "usage": usage}


# ----------------------------------------------------------------------------------------------
# Backends: how the ingress reaches the model
# ----------------------------------------------------------------------------------------------
def _model_error(result: dict, options: IngressOptions) -> APIError:
    e = result["error"]
    if e.get("code") == "queue_full":  # the replica's step queue: answered like Serve's own backpressure
        status = options.overload_status
        return APIError(status, e.get("message", "the service is at capacity"), None,
                        "rate_limit_exceeded" if status == 429 else "overloaded", options.retry_after_s)
    retry = options.retry_after_s if e.get("status") in (429, 503) else None
    return APIError(int(e.get("status", 500)), e.get("message", "model error"), e.get("param"), e.get("code"),
                    retry)


class LocalBackend:
    """The model in this process (``LocalImageModel``): tests and the in-process baseline."""

    def __init__(self, model):
        self.model = model

    async def generate(self, requests: list[GenerationRequest], size: str | None, timeout_s: float,
                       options: IngressOptions) -> dict:
        try:
            result = await asyncio.wait_for(self.model.generate(requests, size), timeout_s)
        except asyncio.TimeoutError:
            raise APIError(504, f"the request took longer than {timeout_s:g}s", None, "timeout") from None
        if "error" in result:
            raise _model_error(result, options)
        return result

    async def info(self, timeout_s: float, options: IngressOptions) -> dict:
        from .model import ModelCallError

        try:
            return await self.model.info()
        except ModelCallError as exc:
            raise APIError(exc.status, exc.message, exc.param, exc.code, options.retry_after_s) from None


class HandleBackend:
    """The ``ImageModel`` deployment through a Serve ``DeploymentHandle``. A full queue
    (``max_queued_requests``) and a dead replica become 429/503 with Retry-After, a slow one 504."""

    def __init__(self, handle):
        self.handle = handle

    async def _call(self, method: str, args: tuple, timeout_s: float, options: IngressOptions):
        import ray.exceptions
        from ray.serve.exceptions import BackPressureError, RequestCancelledError

        response = getattr(self.handle, method).remote(*args)

        async def wait():
            return await response

        try:
            return await asyncio.wait_for(wait(), timeout_s)
        except BackPressureError:
            status = options.overload_status
            raise APIError(status, "the service is at capacity (model queue full); retry after the "
                                   "Retry-After delay", None,
                           "rate_limit_exceeded" if status == 429 else "overloaded", options.retry_after_s) from None
        except asyncio.TimeoutError:
            response.cancel()
            raise APIError(504, f"the request took longer than {timeout_s:g}s", None, "timeout") from None
        except (ray.exceptions.ActorDiedError, ray.exceptions.ActorUnavailableError,
                ray.exceptions.RayActorError, RequestCancelledError) as exc:
            raise APIError(503, f"the model replica serving this request went away ({type(exc).__name__}); "
                                "retry", None, "replica_unavailable", options.retry_after_s) from None

    async def generate(self, requests: list[GenerationRequest], size: str | None, timeout_s: float,
                       options: IngressOptions) -> dict:
        result = await self._call("generate", (requests, size), timeout_s, options)
        if "error" in result:
            raise _model_error(result, options)
        return result

    async def info(self, timeout_s: float, options: IngressOptions) -> dict:
        return await self._call("info", (), timeout_s, options)


# ----------------------------------------------------------------------------------------------
# The app
# ----------------------------------------------------------------------------------------------
@dataclass
class IngressState:
    """What the routes read on every request; ``options`` changes through ``reconfigure``."""

    backend: Any
    options: IngressOptions = IngressOptions()
    info_ttl_s: float = 10.0
    _info: dict | None = None
    _info_at: float = 0.0

    async def model_info(self, refresh: bool = False) -> dict:
        if refresh or self._info is None or time.monotonic() - self._info_at > self.info_ttl_s:
            self._info = await self.backend.info(10.0, self.options)
            self._info_at = time.monotonic()
        return self._info

    async def native_sizes(self) -> list[str] | None:
        try:
            return (await self.model_info()).get("sizes")
        except APIError:
            return None  # the model deployment checks sizes too

    def check_auth(self, request: Request) -> None:
        key = os.environ.get(self.options.api_key_env)
        if not key:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "authorization: missing bearer key; send 'Authorization: Bearer <key>'",
                           None, "missing_api_key")
        if not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, "authorization: incorrect API key provided", None, "invalid_api_key")

    def timeout_s(self, request: Request) -> float:
        """The ingress's cap; a caller may lower it with x-request-timeout-seconds, never raise it."""
        cap = self.options.request_timeout_s
        try:
            asked = float(request.headers.get("x-request-timeout-seconds", "nan"))
        except ValueError:
            return cap
        return min(cap, asked) if math.isfinite(asked) and asked > 0 else cap


async def read_body(request: Request, limit: int) -> bytes:
    """The body, or 413 as soon as it passes ``limit`` bytes (Content-Length or streamed)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise APIError(413, f"body: is {int(length)} bytes; the most is {limit}", None, "request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"body: is over {limit} bytes", None, "request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def create_api(state: IngressState) -> FastAPI:
    """The ingress's FastAPI app over ``state`` (its backend and options)."""
    app = FastAPI(title="budgetdiff image service", docs_url="/docs", redoc_url=None)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            return APIError(404, f"route: {request.method} {request.url.path} does not exist", None,
                            "unknown_url").response()
        return APIError(exc.status_code, f"route: {exc.detail}", None, None).response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError):
        return APIError(400, f"body: {exc.errors()[0].get('msg')}", None, "invalid_value").response()

    @app.post("/v1/images/generations")
    async def images_generations(request: Request):
        started = time.perf_counter()
        state.check_auth(request)
        options = state.options
        raw = await read_body(request, options.max_body_bytes)
        body = ImagesRequest.parse(parse_json_body(raw))  # 1. parse and type-check the body, once
        body.check(options, await state.native_sizes())   # 2. the service's limits
        request_id = safe_request_id(request.headers.get("x-request-id"))
        requests = body.to_requests(request_id)           # 3. the engine's requests, validated once
        result = await state.backend.generate(requests, body.size, state.timeout_s(request), options)
        reply = build_reply(request_id, result, options, started)
        return JSONResponse(reply, headers={"x-request-id": request_id, "x-model-version": reply["model_version"]})

    def _model_card(info: dict) -> dict:
        return {"id": state.options.model_id, "object": "model", "created": int(info.get("loaded_at", 0)),
                "owned_by": "budgetdiff", "version": info["version"], "sizes": info["sizes"],
                "modes": info["modes"], "max_batch_size": info.get("max_batch_size"),
                "batching": info.get("batching"),
                "max_rows": info.get("max_rows") if info.get("batching") == "step" else None}

    @app.get("/v1/models")
    async def list_models(request: Request):
        state.check_auth(request)
        info = await state.model_info(refresh=True)
        return {"object": "list", "data": [_model_card(info)]}

    @app.get("/v1/models/{model_id}")
    async def get_model(model_id: str, request: Request):
        state.check_auth(request)
        if model_id != state.options.model_id:
            raise APIError(404, f"model: the model {model_id!r} does not exist; this service serves "
                                f"{state.options.model_id!r}", "model", "model_not_found")
        return _model_card(await state.model_info(refresh=True))

    @app.get("/healthz")
    async def healthz():
        try:
            info = await state.model_info(refresh=True)
        except APIError as exc:
            if exc.code in ("overloaded", "rate_limit_exceeded"):
                return {"status": "saturated", "model_version": (state._info or {}).get("version", {}).get("id")}
            return APIError(503, f"unhealthy: {exc.message}", None, "unhealthy",
                            state.options.retry_after_s).response()
        return {"status": "ok", "model_version": info["version"]["id"], "sizes": info["sizes"],
                "replica": info.get("replica"), "swaps": info.get("swaps"), "cpu_s": info.get("cpu_s"),
                "batching": info.get("batching"), "batcher": info.get("batcher")}

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        return HTMLResponse(PLAYGROUND.read_text())

    return app
