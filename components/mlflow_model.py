"""A trained vlmflow model as an MLflow model: the registered version of a recipe's model is a
pyfunc, so `mlflow.pyfunc.load_model("models:/NAME/VERSION").predict(frame)` answers questions
about images in any process where vlmflow is installed.

The input frame has a column `image` (encoded image bytes, or a path to an image file) and a
column `prompt` (the question or instruction; empty for a plain caption); the output is one
generated answer per row. The vlmflow model folder is the pyfunc's artifact `model`
(`artifacts/model/` inside the MLflow model), so vlmflow itself reads a registered version too.
A model that exports to Hugging Face LLaVA is also saved as MLflow's transformers flavor
(`save_transformers`), registered as NAME-hf.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types.schema import AnyType, ColSpec, DataType, ParamSchema, ParamSpec, Schema

ARTIFACT = "model"  # the vlmflow model folder inside the MLflow model: artifacts/model
DEFAULT_MAX_NEW_TOKENS = 16


class VlmflowModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        from vlmflow.components.evaluate.worker import EvalWorker

        self.worker = EvalWorker(context.artifacts[ARTIFACT])

    # A DataFrame hint: MLflow infers no schema from it (the saved signature says what it takes) and
    # gives no advice on import to add a hint.
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
    import warnings
    from importlib.metadata import version

    # A model from code (MLflow's `set_model`), not a pickled Python object: loading a
    # registered version unpickles nothing.
    with tempfile.TemporaryDirectory(prefix="vlmflow-model-code-") as tmp:
        code = Path(tmp) / "vlmflow_pyfunc.py"
        code.write_text(MODEL_CODE)
        with warnings.catch_warnings():  # its advice to add an input example: the signature says it all
            warnings.simplefilter("ignore", UserWarning)
            mlflow.pyfunc.save_model(
                path=str(destination),
                python_model=str(code),
                artifacts={ARTIFACT: str(model_folder)},
                pip_requirements=[f"vlmflow=={version('vlmflow')}"],
                signature=signature(),
            )
    return destination


def save_transformers(model_folder: Path, destination: Path) -> list[str]:
    """The model as MLflow's transformers flavor at `destination`, for a model that exports to a
    Hugging Face LlavaForConditionalGeneration (`vlmflow export`'s folder, processor included);
    returns why not (nothing written) for one that does not.

    MLflow 3.17 cannot rebuild an image-text-to-text pipeline that needs a processor by itself:
    load it as components and hand them to transformers,
    `transformers.pipeline(**mlflow.transformers.load_model(URI, return_type="components"))`."""
    import logging
    import tempfile
    from importlib.metadata import version

    import mlflow.transformers
    import transformers

    from vlmflow.components.export import export_hf, export_problems
    from vlmflow.components.train.setup import read_model_folder

    model, _ = read_model_folder(model_folder)
    problems = export_problems(model)
    if problems:
        return problems
    quiet = [logging.getLogger(name) for name in ("mlflow.transformers", "mlflow.transformers.signature")]
    levels = [logger.level for logger in quiet]
    progress = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # its bars (writing, loading weights) on the run's console
    with tempfile.TemporaryDirectory(prefix="vlmflow-hf-") as tmp:
        try:
            notes = export_hf(model_folder, Path(tmp) / "hf")
            if notes:  # no tokenizer: no processor, and no pipeline without one
                return notes
            for logger in quiet:  # no model card or license to find offline, no signature for this task
                logger.setLevel(logging.ERROR)
            pipe = transformers.pipeline("image-text-to-text", model=str(Path(tmp) / "hf"))
            mlflow.transformers.save_model(
                pipe,
                str(destination),
                processor=pipe.processor,
                # vlmflow's own pins: MLflow's defaults would name torchvision, which is not installed
                pip_requirements=[f"transformers=={version('transformers')}", f"torch=={version('torch')}"],
            )
        finally:
            for logger, level in zip(quiet, levels, strict=True):
                logger.setLevel(level)
            if progress:
                transformers.utils.logging.enable_progress_bar()
    return []


def signature() -> ModelSignature:
    """What the MLflow UI shows and `predict` checks: `image` (bytes or a path, so any type), an
    optional `prompt`, one generated text per row, and `max_new_tokens`."""
    inputs = Schema([ColSpec(AnyType(), "image"), ColSpec(DataType.string, "prompt", required=False)])
    params = ParamSchema([ParamSpec("max_new_tokens", DataType.long, DEFAULT_MAX_NEW_TOKENS)])
    return ModelSignature(inputs=inputs, outputs=Schema([ColSpec(DataType.string)]), params=params)


MODEL_CODE = """\
from mlflow.models import set_model

from vlmflow.components.mlflow_model import VlmflowModel

set_model(VlmflowModel())
"""
