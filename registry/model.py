"""The registered pyfunc: prompts in, PNG bytes or arrays out, through ``Generator``.

Logged as models-from-code (``registry/pyfunc_entry.py``), so nothing is pickled; the version's
one artifact, ``bundle``, is the staged bundle (``registry.artifacts``)::

    model = mlflow.pyfunc.load_model("models:/budgetdiff@champion")
    out = model.predict(pd.DataFrame({"prompt": ["a small red circle at the top left"], "seed": [3]}))
    out["image"][0]            # PNG bytes (params={"output": "array"}: uint8 (H, W, 3))
    json.loads(out["record"][0])

Input columns: ``prompt`` (required), ``seed``, ``mode``, ``quality_target`` (optional; a
missing or null value takes ``GenerationRequest``'s default: seed 0, mode auto): the engine's own
field names. A row the engine cannot serve raises ``RequestError`` whose ``field`` is the column
and ``index`` the row. Params: ``output`` ("png" or "array"), ``batch_size``.
"""

from __future__ import annotations

import json
import math

import mlflow.pyfunc

from budgetdiff.io import png_bytes

from .artifacts import resolve_shared_parts

OUTPUTS = ("png", "array")


def _value(row, name):
    v = row.get(name)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return v


class BudgetdiffModel(mlflow.pyfunc.PythonModel):
    """A ``Generator`` loaded from the version's bundle artifact."""

    generator = None

    def load_context(self, context):
        from budgetdiff.generation.engine import Generator

        self.generator = Generator.from_bundle(resolve_shared_parts(context.artifacts["bundle"]))

    def predict(self, context, model_input, params=None):
        import numpy as np
        import pandas as pd

        from budgetdiff.generation.engine import GenerationRequest
        from budgetdiff.errors import RequestError

        params = params or {}
        output = params.get("output", "png")
        if output not in OUTPUTS:
            raise ValueError(f"output: must be one of {', '.join(OUTPUTS)}, got {output!r}")
        if isinstance(model_input, str):
            model_input = [model_input]
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(
            {"prompt": list(model_input)} if not isinstance(model_input, dict) else model_input)
        if "prompt" not in frame.columns:
            raise ValueError("prompt: the input needs a prompt column")
        requests = []
        for i, row in enumerate(frame.to_dict("records")):
            kwargs = {"prompt": row["prompt"], "request_id": str(i)}
            if _value(row, "seed") is not None:
                kwargs["seed"] = int(row["seed"])
            if _value(row, "mode") is not None:
                kwargs["mode"] = str(row["mode"])
            if _value(row, "quality_target") is not None:
                kwargs["quality_target"] = float(row["quality_target"])
            try:
                requests.append(GenerationRequest(**kwargs))
            except RequestError as exc:
                raise exc.at(i) from None
        results = self.generator(requests, output_type="pil", batch_size=int(params.get("batch_size", 16)))
        images = []
        for r in results:
            if output == "png":
                images.append(png_bytes(r.image))
            else:
                images.append(np.asarray(r.image, dtype=np.uint8))
        return pd.DataFrame({"image": images, "record": [json.dumps(r.record.to_dict(), default=str) for r in results]})


def signature():
    """Input: prompt (+ optional seed, mode, quality_target); output: image, record; params."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema([ColSpec("string", "prompt"), ColSpec("long", "seed", required=False),
                     ColSpec("string", "mode", required=False), ColSpec("double", "quality_target", required=False)])
    outputs = Schema([ColSpec("binary", "image"), ColSpec("string", "record")])
    params = ParamSchema([ParamSpec("output", "string", "png"), ParamSpec("batch_size", "long", 16)])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)
