"""The BLIP-2 twin end to end through the CLI (real Ray, Prefect, MLflow): stage 1 trains the
Q-Former on ITC + ITM + ITG, stage 2 the soft prompt into the LM, and held-out data shows what
each learned beside the baselines its stages write (about 10 minutes on 2 shared cores: slow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from live_servers import clean_env

from tests.conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.learning]


def test_blip2_twin_learns_in_both_stages(tmp_path):
    env = {**clean_env(), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    command = [
        sys.executable,
        "-m",
        "vlmflow.cli",
        "-q",
        "run",
        "specs/recipes/blip2-tiny.yaml",
        "--workdir",
        str(tmp_path),
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1500, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "latest" / "summary.json").read_text())
    folders = {s["name"]: Path(s["artifact_path"]) for s in summary["stages"]}
    pretrain = json.loads((folders["train-qformer-pretrain"] / "eval.json").read_text())
    assert {"final_loss_itc", "final_loss_itm", "final_loss_itg"} <= pretrain.keys()
    assert pretrain["final_loss_itg"] < pretrain["first_loss"] / 3
    # held-out retrieval through the Q-Former (an image scores a text by its best query) beats chance
    assert pretrain["eval_i2t_r1"] > 3 * pretrain["eval_i2t_r1_chance"]
    retrieval = json.loads((folders["eval-retrieval"] / "metrics.json").read_text())
    assert retrieval["i2t_r1"] > 3 * retrieval["i2t_r1_chance"] and retrieval["t2i_r1"] > 3 * retrieval["t2i_r1_chance"]
    # stage 2: captions from the LM fed the query outputs beat the best single caption for every image
    # stage 1's ITM head on balanced held-out pairs: reported, not yet above chance (0.5; see eval-itm)
    itm = json.loads((folders["eval-itm"] / "metrics.json").read_text())
    print(f"ITM accuracy {itm['itm_accuracy']:.3f}, AUC {itm['itm_auc']:.3f} (chance 0.5)")
    captions = json.loads((folders["eval-captions"] / "metrics.json").read_text())
    assert captions["cider"] > 1.5 * captions["cider_baseline"]
    counts = json.loads((folders["train-qformer-lm"] / "parameters.json").read_text())
    assert counts["text_trainable"] == counts["heads_trainable"] == counts["vision_trainable"] == 0
