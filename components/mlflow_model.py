"""A trained vlmflow model as an MLflow model: the registered version of a recipe's model is a
pyfunc, so `mlflow.pyfunc.load_model("models:/NAME/VERSION").predict(frame)` answers questions
about images in any process where vlmflow is installed.

The input frame has a column `image` (encoded image bytes, or a path to an image file) and a
column `prompt` (the question or instruction; empty for a plain caption); the output is one
generated answer per row. The vlmflow model folder is the pyfunc's artifact `model`
(`artifacts/model/` inside the MLflow model), so vlmflow itself reads a registered version too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd

ARTIFACT = "model"  # the vlmflow model folder inside the MLflow model: artifacts/model
DEFAULT_MAX_NEW_TOKENS = 16


class VlmflowModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        from vlmflow.components.evaluate.worker import EvalWorker

        self.worker = EvalWorker(context.artifacts[ARTIFACT])

    # A DataFrame hint: MLflow validates nothing and infers no schema from it (and gives no advice to add one).
    def predict(self, context, model_input: pd.DataFrame, params=None):  # noqa: ANN001, ANN201
        frame = model_input
        images = [_image_bytes(value) for value in frame["image"]]
        prompts = (
            [str(p) if p is not None else "" for p in frame["prompt"]] if "prompt" in frame else [""] * len(images)
        )
        decoding = {
            "strategy": "greedy",
            "max_new_tokens": int((params or {}).get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)),
        }
        return self.worker.generate({"images": images, "prompts": prompts, "decoding": decoding})


def _image_bytes(value: Any) -> bytes:
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    return Path(str(value)).read_bytes()


def save(model_folder: Path, destination: Path) -> Path:
    """The MLflow model (MLmodel, the python model, the vlmflow folder as its artifact) at
    `destination`. Its requirements are vlmflow's own pins: nothing is inferred or downloaded."""
    import tempfile
    from importlib.metadata import version

    # A model from code (MLflow's `set_model`), not a pickled Python object: loading a
    # registered version unpickles nothing.
    with tempfile.TemporaryDirectory(prefix="vlmflow-model-code-") as tmp:
        code = Path(tmp) / "vlmflow_pyfunc.py"
        code.write_text(MODEL_CODE)
        mlflow.pyfunc.save_model(
            path=str(destination),
            python_model=str(code),
            artifacts={ARTIFACT: str(model_folder)},
            pip_requirements=[f"vlmflow=={version('vlmflow')}"],
        )
    return destination


MODEL_CODE = """\
from mlflow.models import set_model

from vlmflow.components.mlflow_model import VlmflowModel

set_model(VlmflowModel())
"""
