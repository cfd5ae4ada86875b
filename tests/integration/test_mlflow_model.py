"""A vlmflow model folder as an MLflow pyfunc model: registered on a real MLflow (sqlite), loaded
by `models:/NAME/VERSION` in a fresh process, it answers; vlmflow downloads the same version
back as its model folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny_vlm import write_model
from vlmflow.components.mlflow_model import save
from vlmflow.tracking import Tracker, download_model

pytestmark = pytest.mark.slow
LOAD = """\
import io, json, mlflow.pyfunc, pandas as pd
from PIL import Image
image = io.BytesIO(); Image.new("RGB", (40, 40), (20, 200, 40)).save(image, format="PNG")
model = mlflow.pyfunc.load_model("models:/tiny/1")
frame = pd.DataFrame({"image": [image.getvalue(), PATH], "prompt": ["What color is it?", ""]})
print(json.dumps(model.predict(frame, params={"max_new_tokens": 4})))
"""


def test_a_registered_model_loads_as_a_pyfunc_and_answers(tmp_path: Path):
    from PIL import Image

    folder = tmp_path / "model"
    write_model(folder)
    save(folder, tmp_path / "mlflow-model")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "pyfunc", tmp_path / "artifacts")
    run = tracker.start("train", {})
    files = [p for p in (tmp_path / "mlflow-model").rglob("*") if p.is_file()]
    for path in files:
        parent = path.parent.relative_to(tmp_path)
        tracker.log_files(run, [path], str(parent))
    assert not list((tmp_path / "mlflow-model").rglob("*.pkl"))  # a model from code: nothing to unpickle
    from mlflow.models import Model

    signature = Model.load(str(tmp_path / "mlflow-model")).signature  # what the MLflow UI shows
    assert signature.inputs.input_names() == ["image", "prompt"] and signature.params.params[0].name == "max_new_tokens"
    assert tracker.register_model(run, "tiny", "mlflow-model", {"vlmflow.stage": "s"}) == "1"

    picture = tmp_path / "picture.png"
    Image.new("RGB", (40, 40), (200, 20, 40)).save(picture)
    code = LOAD.replace("PATH", repr(str(picture)))
    env = {"MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri, "PATH": "/usr/bin:/bin"}
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    answers = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)

    back = download_model("models:/tiny/1", uri, tmp_path / "download")
    assert (back / "vlmflow_model.json").read_bytes() == (folder / "vlmflow_model.json").read_bytes()
