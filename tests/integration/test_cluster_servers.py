"""The tiny recipe on a two-node Ray cluster, tracked by a real MLflow server and a Prefect server.

Started by the test on 127.0.0.1: `ray start --head` and a second `ray start --address` node
(1 CPU each), `mlflow server` (sqlite backend, artifacts proxied into its own folder) and
`prefect server start`. The nodes cannot import vlmflow themselves (their PYTHONPATH puts a
package named vlmflow first that refuses to import), so the run works only because the driver
ships its code in the job's runtime_env.

While the servers start, the same spec runs on a local Ray in another workdir: the two runs must
give byte-identical data artifacts and tokenizer, and the same training losses. Then the lineage
notebook runs headless against the MLflow server.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import httpx
import nbformat
import pytest
from live_servers import BIN, answers, clean_env, free_port, prefect_env, prefect_server, start, stop, wait
from mlflow.tracking import MlflowClient
from nbclient import NotebookClient
from test_recipe_cli import REPO, VLMFLOW, stages, vlmflow

SPEC = Path(__file__).with_name("cluster-tiny.yaml")
DATA_STAGES = ("ingest", "dedup", "tokenizer")
pytestmark = pytest.mark.slow


def _ray_node(head: int, dashboard: int | None, env: dict[str, str]) -> list[str]:
    """One Ray node of 1 CPU in the foreground (`--block`: stopping the process stops the node);
    every port a second node on the same machine would share is its own."""
    ports = [
        *("--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port())),
        *("--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port())),
    ]
    common = ["--block", "--num-cpus", "1", "--num-gpus", "0", "--node-ip-address", "127.0.0.1",
              "--object-store-memory", str(300 * 2**20), "--disable-usage-stats", *ports]  # fmt: skip
    if dashboard is None:
        return [str(BIN / "ray"), "start", "--address", f"127.0.0.1:{head}", *common]
    return [str(BIN / "ray"), "start", "--head", "--port", str(head), "--include-dashboard", "true",
            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), *common]  # fmt: skip


STATE_QUERY = """
import json, sys
from ray.util import state
address, kind = sys.argv[1], sys.argv[2]
rows = getattr(state, "list_" + kind)(address=address, limit=10_000, raise_on_missing_output=False)
print(json.dumps([row.__dict__ for row in rows], default=str))
"""


def _ray_state(dashboard: int, kind: str) -> list[dict]:
    """Ray's state API (list_nodes / list_actors / list_tasks), asked from a fresh process: Ray
    reads its auth token once per process, and this one's may predate the test's token."""
    done = subprocess.run([sys.executable, "-c", STATE_QUERY, f"http://127.0.0.1:{dashboard}", kind],
                          capture_output=True, text=True, env=clean_env(), timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def _alive_nodes(dashboard: int, count: int) -> list[str]:
    try:
        nodes = [n["node_id"] for n in _ray_state(dashboard, "nodes") if n["state"] == "ALIVE"]
    except AssertionError:  # the dashboard does not answer yet: ask again
        return []
    return nodes if len(nodes) == count else []


def _files(folder: Path) -> dict[str, str]:
    """sha256 of every file of a stage artifact but _SUCCESS (it holds the build's timings)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "_SUCCESS"
    }


def _losses(stage_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (stage_dir / "history.jsonl").read_text().splitlines()]


def test_tiny_recipe_on_a_two_node_cluster_with_shared_servers(tmp_path, monkeypatch):
    # Ray's token authentication, as a cluster should run: the nodes, the driver and the state
    # API calls below share the token (children inherit this environment).
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", secrets.token_hex(32))
    poison = tmp_path / "node-python" / "vlmflow"
    poison.mkdir(parents=True)
    (poison / "__init__.py").write_text('raise ImportError("this node has no vlmflow: the job must ship it")\n')
    node_env = {**clean_env(), "PYTHONPATH": str(poison.parent)}
    head, dashboard, mlflow_port, prefect_port = free_port(), free_port(), free_port(), free_port()
    logs = {name: tmp_path / f"{name}.log" for name in ("head", "worker", "mlflow", "prefect")}
    mlflow_server = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
                     "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                     "--artifacts-destination", str(tmp_path / "mlflow-artifacts")]  # fmt: skip
    prefect = prefect_env(tmp_path / "prefect", prefect_port, task_runs=True)
    procs = [
        (start(_ray_node(head, dashboard, node_env), node_env, logs["head"]), logs["head"]),
        (start(mlflow_server, clean_env(), logs["mlflow"]), logs["mlflow"]),
        (start(prefect_server(prefect_port), prefect, logs["prefect"]), logs["prefect"]),
    ]
    try:
        # Meanwhile the reference run: a local Ray, ephemeral Prefect, sqlite MLflow.
        local = vlmflow("run", str(SPEC), "--workdir", str(tmp_path / "local"))
        assert local.returncode == 0, local.stdout[-3000:] + local.stderr[-3000:]
        wait("the Ray head", lambda: _alive_nodes(dashboard, 1), procs, 120)
        nodes = _add_worker_node(head, dashboard, node_env, logs["worker"], procs)
        wait("the MLflow server", lambda: answers(f"http://127.0.0.1:{mlflow_port}/health"), procs, 120)
        wait("the Prefect server", lambda: answers(f"http://127.0.0.1:{prefect_port}/api/health"), procs, 120)

        env = {
            **prefect,
            "RAY_ADDRESS": f"127.0.0.1:{head}",
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}",
        }
        workdir = tmp_path / "cluster"
        result = subprocess.run([*VLMFLOW, "run", str(SPEC), "--workdir", str(workdir)],
                                capture_output=True, text=True, env=env, cwd=REPO, timeout=600)  # fmt: skip
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        summary = json.loads((workdir / "runs" / "latest" / "summary.json").read_text())
        assert summary["ray"].startswith(f"ray: joined cluster at 127.0.0.1:{head}, vlmflow code shipped from")

        _check_work_ran_on_both_nodes(dashboard, set(nodes))
        _check_mlflow_server(f"http://127.0.0.1:{mlflow_port}", summary, tmp_path / "mlflow-artifacts", workdir)
        _check_prefect_server(f"http://127.0.0.1:{prefect_port}/api", summary)
        _check_same_results(tmp_path / "local", summary)
        _check_lineage_notebook(f"http://127.0.0.1:{mlflow_port}", summary, tmp_path)
    finally:
        for proc, _ in reversed(procs):
            stop(proc)


def _add_worker_node(head: int, dashboard: int, env: dict[str, str], log: Path, procs: list) -> list[str]:
    """Start the second node; on a loaded machine its first registration can time out (the
    process exits with "Failed to get node info"), so it gets a second try."""
    for attempt in (1, 2):
        worker = start(_ray_node(head, None, env), env, log)
        procs.append((worker, log))
        try:
            return wait("two Ray nodes", lambda: _alive_nodes(dashboard, 2), procs, 120)
        except AssertionError:
            if attempt == 2 or worker.poll() is None:
                raise
            procs.remove((worker, log))
    raise AssertionError("unreachable")


def _check_work_ran_on_both_nodes(dashboard: int, nodes: set[str]) -> None:
    """Ray's state API: the training workers (actors) and the data tasks ran on both nodes."""
    actors = _ray_state(dashboard, "actors")
    train_workers = [a for a in actors if a["class_name"] == "RayTrainWorker"]
    assert len(train_workers) == 2, [a["class_name"] for a in actors]
    assert {a["node_id"] for a in train_workers} == nodes
    tasks = _ray_state(dashboard, "tasks")
    ingest = [t for t in tasks if t["func_or_class_name"] == "process_unit" and t["state"] == "FINISHED"]
    assert {t["node_id"] for t in ingest} == nodes, [(t["func_or_class_name"], t["node_id"]) for t in tasks][:40]


def _check_mlflow_server(uri: str, summary: dict, served: Path, workdir: Path) -> None:
    """The run tree read back through the server's API; artifacts went through its proxy."""
    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(summary["mlflow_run_id"])
    assert parent.info.status == "FINISHED" and summary["mlflow_tracking_uri"] == uri
    assert parent.info.artifact_uri.startswith("mlflow-artifacts:")
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert {c.data.tags["vlmflow.stage"] for c in children} == set(stages(summary))
    assert {"resolved_spec.yaml", "environment.json", "summary.json"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)
    }
    train = next(c for c in children if c.data.tags["vlmflow.stage"] == "train-align")
    assert [m.step for m in client.get_metric_history(train.info.run_id, "train/loss")] == [1, 2, 3, 4]
    assert list(served.rglob("tokenizer.json")), "no artifact reached the server's store"
    assert not (workdir / "mlartifacts").exists()


def _check_prefect_server(api: str, summary: dict) -> None:
    flow_run = httpx.get(f"{api}/flow_runs/{summary['prefect_flow_run_id']}", timeout=10).json()
    assert flow_run["state_type"] == "COMPLETED", flow_run["state_type"]
    body = {"flow_runs": {"id": {"any_": [summary["prefect_flow_run_id"]]}}}

    def recorded() -> list[dict]:  # the server records task runs from their events, a moment later
        runs = httpx.post(f"{api}/task_runs/filter", json=body, timeout=10).json()
        return runs if {t["name"] for t in runs} >= set(stages(summary)) else []

    task_runs = wait("the task runs on the Prefect server", recorded, [], 30)
    assert {t["state_type"] for t in task_runs} == {"COMPLETED"}, [(t["name"], t["state_type"]) for t in task_runs]


def _check_same_results(local: Path, summary: dict) -> None:
    """Same spec and seed, another workdir, another Ray: identical data artifacts and tokenizer
    (every file's bytes), training losses equal to 1e-5."""
    reference = json.loads((local / "runs" / "latest" / "summary.json").read_text())
    mine, theirs = stages(summary), stages(reference)
    assert [(s, e["artifact_digest"]) for s, e in mine.items()] == [
        (s, e["artifact_digest"]) for s, e in theirs.items()
    ]
    for name in DATA_STAGES:
        assert _files(Path(mine[name]["artifact_path"])) == _files(Path(theirs[name]["artifact_path"])), name
    ours, ref = (_losses(Path(s["train-align"]["artifact_path"])) for s in (mine, theirs))
    assert len(ours) == len(ref) == 4 and all(abs(a - b) <= 1e-5 for a, b in zip(ours, ref, strict=True)), (ours, ref)
    environment = json.loads((Path(summary["workdir"]) / "runs" / summary["run_id"] / "environment.json").read_text())
    assert environment["packages"]["torch"].startswith("2.13.0") and environment["packages"]["vlmflow"] == "0.1.0"


def _check_lineage_notebook(uri: str, summary: dict, tmp_path: Path) -> None:
    notebook = nbformat.read(REPO / "notebooks" / "lineage.ipynb", as_version=4)
    os.environ.update(MLFLOW_TRACKING_URI=uri, VLMFLOW_EXPERIMENT="cluster-tiny")  # the kernel inherits them
    try:
        resources = {"metadata": {"path": tmp_path}}
        NotebookClient(notebook, timeout=300, kernel_name="python3", resources=resources).execute()
    finally:
        for name in ("MLFLOW_TRACKING_URI", "VLMFLOW_EXPERIMENT"):
            os.environ.pop(name, None)
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    text = "\n".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") for o in outputs)
    assert summary["run_id"] in text  # it picked this run: the latest finished one
    for entry in summary["stages"]:
        assert entry["artifact_digest"][:12] in text, entry["name"]
    assert "training stages: train-align" in text
    assert "eval-captions" in text and "cider" in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2  # the DAG and the training curves
