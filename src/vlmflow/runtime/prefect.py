"""A recipe run and its stages as Prefect tasks, written once.

`RecipeRun` owns what spans the whole run: the workdir, the artifact store, Ray, the MLflow
parent run and DIR/runs/RUN_ID/summary.json (rewritten after every stage, so a killed run
still shows how far it got). `RecipeRun.run_graph` runs a graph of stages, each as a Prefect
task, every stage as soon as its upstream stages have finished: independent stages run at the
same time (threads of Prefect's task runner; Ray places their work by the resources each asks
for). The graph's digests are computed once, before anything runs; `stage_task` reuses a
finished artifact (`cached`) or builds it (`computed`) through `vlmflow.stage.run_stage`, and
records it in MLflow and the summary.

A failed stage stops its descendants only: they are recorded as `skipped` and never start;
the other branches run to the end (their artifacts committed, so the next run reuses them),
then the run fails with the first failure's exception. Stages record from several threads:
the summary, summary.json and every MLflow call go through `RecipeRun._lock`.

Prefect and Ray are imported only where a run needs them: a run with nothing to compute
(`run_recipe` finds every stage cached) is recorded without a flow and never imports them.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import queue
import secrets
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from vlmflow import __version__
from vlmflow.artifacts import ArtifactStore, atomic_write_text, digest_of
from vlmflow.errors import storage_fault
from vlmflow.fingerprint import HashCache, code_digest
from vlmflow.pipeline import Step, graph_digests, recipe_graph
from vlmflow.plan import Plan
from vlmflow.progress import StepProgress, reporting_to
from vlmflow.results import model_eval_tags, run_note
from vlmflow.runs import PROCESSES, record_processes, started_processes
from vlmflow.runtime.environment import environment
from vlmflow.runtime.executor import executor_for
from vlmflow.specs.recipe import Recipe
from vlmflow.stage import HISTORY, Outputs, StageOutput, run_stage
from vlmflow.tracking import HistoryTail, Tracker, dataset, flatten, tracking_uri

log = logging.getLogger("vlmflow")
DATA_TYPES = ("samples", "captions")  # artifact types that are datasets (MLflow's Datasets column)


class StorageFaultsInOneLine(logging.Filter):
    """Prefect logs a failed flow or task run with its traceback (a Ray task's inside), then its
    final state with the exception's text: for a storage fault (a full disk, a read-only
    workdir) each is one line naming the path instead."""

    def __init__(self) -> None:
        super().__init__()
        self.faults: dict[str, str] = {}  # task or flow run id -> its fault, until its final state

    def filter(self, record: logging.LogRecord) -> bool:
        run = str(getattr(record, "task_run_id", None) or getattr(record, "flow_run_id", None))
        error = record.exc_info[1] if record.exc_info else None
        fault = storage_fault(error) if error is not None else None
        if fault is not None:
            record.msg, record.args = "%s: %s", (str(record.msg).split(":")[0], fault)
            record.exc_info, record.exc_text = None, None
            self.faults[run] = str(fault)
        elif run in self.faults and str(record.msg).startswith("Finished in state Failed"):
            record.msg, record.args = "Finished in state Failed: %s", (self.faults.pop(run),)
        return True


for _logger in ("prefect.flow_runs", "prefect.task_runs"):
    logging.getLogger(_logger).addFilter(StorageFaultsInOneLine())


def run_recipe(recipe: Recipe, workdir: Path, spec_path: str, plan: Plan | None = None) -> dict:
    """The recipe flow (vlmflow.flows.recipe); or, when the plan finds every stage cached, the same
    run recorded without a flow (summary.json and MLflow: every stage `cached`): no Prefect server,
    no Ray, no import of either."""
    if plan is not None and plan.stages and all(entry.status == "cached" for entry in plan.stages):
        with RecipeRun(recipe, workdir, spec_path, plan) as run:
            run.run_graph(recipe_graph(recipe), sequential=True)
        return run.summary
    from vlmflow.flows.recipe import recipe_flow

    return recipe_flow(recipe, workdir, spec_path, plan)


def flow_run_id() -> str | None:
    """The Prefect flow run this code runs in, if any (Prefect not imported: none)."""
    if "prefect" not in sys.modules:
        return None
    from prefect.runtime import flow_run

    return str(flow_run.id) if flow_run.id else None


def prefect_run_logs() -> logging.Handler:
    """vlmflow's log lines, also in the logs of the Prefect task run (or flow run) they are written
    in, so the Prefect UI tells each stage's story; lines from outside a run go to the console only."""
    from prefect.exceptions import MissingContextError
    from prefect.logging.handlers import APILogHandler

    class PrefectRunLogs(APILogHandler):
        def handleError(self, record: logging.LogRecord) -> None:
            if isinstance(sys.exc_info()[1], MissingContextError):
                return
            super().handleError(record)

    return PrefectRunLogs()


def stage_table(stages: list[dict], link: Any) -> str:
    """A markdown table of stages (summary.json entries): what the Prefect artifacts show.
    link(mlflow_run_id) -> the URL of that run in the MLflow UI: each stage's name links to
    its run (a column of its own did not fit the Prefect UI's artifact page)."""
    lines = [
        "| stage | status | rows in | rows out | set aside | seconds | digest |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for s in stages:
        run = s.get("mlflow_run_id")
        aside = "" if s.get("rows_quarantined") is None else f"{s['rows_quarantined']} {s.get('set_aside', '')}".strip()
        cells = [
            f"[{s['name']}]({link(run)})" if run else s["name"], s["status"], s.get("rows_in"), s.get("rows_out"),
            aside, f"{s['seconds']:.1f}" if s.get("seconds") is not None else "", s.get("artifact_digest") or "",
        ]  # fmt: skip
        lines.append("| " + " | ".join("" if c is None else str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def artifact_key(name: str) -> str:
    """A Prefect artifact key (lowercase letters, digits and dashes) for a stage or recipe name."""
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-") or "stage"


def driver_process() -> dict:
    """This process, as `vlmflow status` tells a live run from one whose driver died."""
    import socket

    import psutil

    return {"host": socket.gethostname(), "pid": os.getpid(), "create_time": psutil.Process().create_time()}


def new_run_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


def _now() -> str:
    """A stage's `started` / `finished` in summary.json: ISO 8601, UTC, milliseconds."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class RecipeRun:
    def __init__(
        self,
        recipe: Recipe,
        workdir: Path,
        spec_path: str,
        plan: Plan | None = None,
        flow: str = "recipe",
        tags: dict[str, str] | None = None,
    ):
        """flow: which flow runs (`recipe`, `data-refresh`); tags: extra MLflow tags of every run."""
        self.recipe = recipe
        self.flow = flow
        self.extra_tags = tags or {}
        self.plan = plan
        self.workdir = workdir.resolve()
        self.store = ArtifactStore(self.workdir / "artifacts")
        self.run_id = new_run_id()
        self.run_dir = self.workdir / "runs" / self.run_id
        self.resolved = recipe.model_dump(mode="json")
        self.summary: dict[str, Any] = {
            "run_id": self.run_id,
            "recipe": recipe.name,
            "flow": flow,
            "spec_path": spec_path,
            "spec_digest": digest_of(self.resolved),
            "workdir": str(self.workdir),
            "vlmflow_version": __version__,
            "status": "running",
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "driver": driver_process(),
            "stages": [],
        }
        self.tracker: Tracker | None = None
        self.parent_run: str | None = None
        self._prefect_logs: logging.Handler | None = None
        self.in_prefect = False  # inside a Prefect flow run: stages are its task runs
        # Stages finish on several threads: the summary, summary.json and the MLflow client
        # (sqlite allows one writer) are used under this lock only.
        self._lock = threading.RLock()
        self._datasets: set[tuple[str, str]] = set()  # (stage, digest) of the datasets the recipe run lists
        self._ray_lock = threading.Lock()

    def __enter__(self) -> RecipeRun:
        try:
            self._open()
        except BaseException as error:  # marked failed where summary.json can be written; a fault in one line
            self.__exit__(type(error), error, error.__traceback__)
            raise
        return self

    def _open(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        latest = self.workdir / "runs" / "latest"
        tmp_link = latest.with_name(f".latest-{self.run_id}")
        tmp_link.symlink_to(self.run_id)
        os.replace(tmp_link, latest)
        self.summary["ray"] = "ray: not started (no stage needed it)"
        self.summary["prefect_flow_run_id"] = flow_run_id()
        self._save()  # from here on a run that fails says so
        self._record_processes()
        atomic_write_text(self.run_dir / "resolved_spec.yaml", yaml.safe_dump(self.resolved, sort_keys=False))
        atomic_write_text(self.run_dir / "environment.json", json.dumps(environment(), indent=2))
        if self.plan is None:
            from vlmflow.plan import build_plan

            self.plan = build_plan(self.recipe, self.workdir, cached_details=False)
        atomic_write_text(self.run_dir / "plan.json", json.dumps(self.plan.as_json(), indent=2))
        self.in_prefect = self.summary["prefect_flow_run_id"] is not None
        if self.in_prefect:
            self._prefect_logs = prefect_run_logs()
            log.addHandler(self._prefect_logs)
        uri = tracking_uri(self.workdir, self.recipe.runtime.mlflow.tracking_uri)
        self.tracker = Tracker(
            uri, self.recipe.runtime.mlflow.experiment or self.recipe.name, self.workdir / "mlartifacts"
        )
        name = self.recipe.name if self.flow == "recipe" else f"{self.recipe.name} {self.flow}"
        self.parent_run = self.tracker.start(name, self._tags())
        self.summary.update(mlflow_run_id=self.parent_run, mlflow_tracking_uri=uri)  # a failed run names it too
        self.tracker.log(
            self.parent_run, params={"seed": str(self.recipe.seed), "spec_path": self.summary["spec_path"]}
        )
        saved = ("resolved_spec.yaml", "environment.json", "plan.json")
        self.tracker.log_files(self.parent_run, [self.run_dir / name for name in saved])
        self.summary.update(mlflow_run_id=self.parent_run, mlflow_tracking_uri=uri)
        self._save()

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        """The run's end in summary.json and MLflow. `succeeded` only when the run and every record
        of its end were written: a run whose logging failed (a full disk, a lost tracking store)
        fails. A storage fault, the run's or its records', is raised as one StorageError naming
        the path and the run."""
        error = exc
        try:
            self._close(exc)
        except Exception as failure:
            if error is None:
                error = failure
            elif not (storage_fault(failure) and storage_fault(error)):  # else the error line says it
                cause = storage_fault(failure, self.workdir) or failure
                log.warning("could not record the end of run %s: %s", self.run_id, cause)
        finally:
            if self._prefect_logs is not None:
                self._publish(self.summary["stages"], f"{self.recipe.name}-stages", f"vlmflow run {self.run_id}")
                log.removeHandler(self._prefect_logs)
            ray = sys.modules.get("ray")  # imported by the first stage that needed it
            if ray is not None and ray.is_initialized():
                ray.shutdown()
            with contextlib.suppress(OSError):  # its processes are gone with it: nothing to reap
                (self.run_dir / PROCESSES).unlink(missing_ok=True)
        fault = storage_fault(error, self.workdir)
        if fault is not None:
            raise fault.of_run(self.run_id) from error
        if error is not exc:
            raise error  # type: ignore[misc]

    def _close(self, exc: BaseException | None) -> None:
        """summary.json and the MLflow run of the run's end. The final summary is staged, logged
        to MLflow, and the MLflow run closed before it replaces summary.json: any of them failing
        leaves the run `failed` (summary.json rewritten if it can be, the MLflow run FAILED)."""
        ok = exc is None
        with self._lock:
            self.summary["status"] = "succeeded" if ok else "failed"
            self.summary["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
            if exc is not None:
                self.summary["error"] = str(storage_fault(exc, self.workdir) or exc)
            staged = self.run_dir / ".final" / "summary.json"
            try:
                atomic_write_text(staged, json.dumps(self.summary, indent=2))
                if self.tracker and self.parent_run:
                    self._tag_registered_models()
                    note = run_note(self.summary, stage_table(self.summary["stages"], self.tracker.run_url))
                    self.tracker.log(self.parent_run, metrics=self._totals(), tags={"mlflow.note.content": note})
                    self.tracker.log_files(self.parent_run, [staged])
                    self.tracker.finish(self.parent_run, ok)
                os.replace(staged, self.run_dir / "summary.json")
            except Exception as failure:
                self.summary["status"] = "failed"
                if ok:
                    cause = storage_fault(failure, self.workdir) or failure
                    self.summary["error"] = f"recording the run failed: {cause}"
                with contextlib.suppress(Exception):
                    self._save()
                if self.tracker and self.parent_run:  # never left RUNNING, nor FINISHED
                    with contextlib.suppress(Exception):
                        self.tracker.finish(self.parent_run, False)
                raise
            finally:
                with contextlib.suppress(OSError):
                    staged.unlink(missing_ok=True)
                    staged.parent.rmdir()

    def _record_processes(self) -> None:
        """DIR/runs/RUN_ID/processes.json: the driver and the processes it started (Prefect's
        temporary server; Ray's head processes when it started Ray itself), so that the next
        vlmflow command can stop them if this driver is killed (`vlmflow.runs.reap_dead_runs`).
        Removed when the run ends."""
        started = started_processes(with_ray=str(self.summary.get("ray", "")).startswith("ray: local"))
        if started:
            record_processes(self.run_dir, self.summary["driver"], started)

    def _tag_registered_models(self) -> None:
        """Each model version registered by this run gets the scores of the evaluation stages
        that read it (`eval.STAGE.METRIC`), known only once they have run."""
        assert self.tracker is not None
        for model in self.summary.get("registered_models", []):
            for key, value in model_eval_tags(self.summary, model["stage"]).items():
                self.tracker.client.set_model_version_tag(model["name"], model["version"], key, value)

    def ensure_ray(self) -> None:
        """Start (or join) Ray for the first stage that computes: a run whose stages are all
        cached never starts it."""
        import ray

        from vlmflow.runtime.ray import init_ray

        with self._ray_lock:
            if not ray.is_initialized():
                self.summary["ray"] = init_ray(self.recipe.runtime.ray, self.run_dir / "code")
                self._save()
                self._record_processes()

    def _tags(self) -> dict[str, str]:
        return {
            "vlmflow.run_id": self.run_id,
            "vlmflow.spec_digest": self.summary["spec_digest"],
            "prefect.flow_run_id": self.summary.get("prefect_flow_run_id") or "",
            "vlmflow.flow": self.flow,
            **self.extra_tags,
        }

    def _totals(self) -> dict[str, float]:
        stages = self.summary["stages"]
        return {
            "stages_computed": sum(s["status"] == "computed" for s in stages),
            "stages_cached": sum(s["status"] == "cached" for s in stages),
            "seconds": round(sum(s.get("seconds", 0.0) for s in stages), 1),
        }

    def _save(self) -> None:
        with self._lock:
            atomic_write_text(self.run_dir / "summary.json", json.dumps(self.summary, indent=2))

    def run_graph(self, nodes: Sequence[Step], sequential: bool = False) -> dict[str, StageOutput]:
        """Run a graph (nodes with `.inputs`: input name -> upstream node's name), each node as a
        Prefect task submitted as soon as all its upstream nodes have finished, so independent
        ones run at the same time; returns {name: StageOutput} of the nodes that finished, in
        graph order. `sequential`: one node at a time, in graph order (as before; benchmarks).

        A node is submitted only with finished inputs (Prefect would hold a node whose upstream
        future failed as NotReady): after a failure, its descendants are recorded as skipped
        and never start; the other branches finish. Then the first failure's exception is raised.
        summary.json lists the stages in completion order while the graph runs, in graph order
        once it has settled."""
        order = {node.name: i for i, node in enumerate(nodes)}
        if len(order) != len(nodes):
            raise ValueError(f"graph: a stage name appears twice in {[n.name for n in nodes]}")
        for node in nodes:
            unknown = sorted(set(node.inputs.values()) - order.keys())
            if unknown:
                raise ValueError(f"graph: {node.name} reads {', '.join(unknown)}, which is not in the graph")
        with HashCache(self.store.root / "_cache" / "file-hashes.sqlite") as hashes:
            self.digests = graph_digests(list(nodes), self.recipe, hashes)
        with self._lock:
            first_entry = len(self.summary["stages"])
        waiting = list(nodes)  # graph order
        running: dict[Any, str] = {}  # Prefect future -> node name
        futures: dict[str, Any] = {}  # node name -> its finished future (Prefect's UI draws the edges)
        settled: queue.Queue = queue.Queue()  # futures, as their task runs end
        done: dict[str, StageOutput] = {}
        failed: dict[str, str] = {}  # a failed or skipped node -> the failed stage that stopped it
        errors: list[BaseException] = []
        try:
            while waiting or running:
                for node in list(waiting):
                    if sequential and running:
                        break
                    name, upstream = node.name, list(node.inputs.values())
                    cause = next((failed[up] for up in upstream if up in failed), None)
                    if cause is not None:
                        waiting.remove(node)
                        failed[name] = cause
                        self.record_skipped(name, {k: done[up] for k, up in node.inputs.items() if up in done}, cause)
                    elif all(up in done for up in upstream):
                        waiting.remove(node)
                        if running:
                            log.info("%s: started, beside %s", name, ", ".join(sorted(running.values())))
                        inputs = {key: done[up] for key, up in node.inputs.items()}
                        future = self._submit(node, inputs, [futures[up] for up in dict.fromkeys(upstream)])
                        running[future] = name
                        future.add_done_callback(settled.put)
                if not running:
                    if waiting:  # nothing runs and nothing can start: a cycle
                        raise ValueError(f"graph: {', '.join(n.name for n in waiting)} wait on each other")
                    break
                future = settled.get()
                name = running.pop(future)
                futures[name] = future
                try:
                    done[name] = future.result()
                except BaseException as error:  # the stage's own exception (KeyboardInterrupt too)
                    failed[name] = name
                    errors.append(error)
                    fault = storage_fault(error)
                    if fault is not None:
                        log.error("%s: failed: %s", name, fault)
                    else:
                        log.error("%s: failed (%s: %s)", name, type(error).__name__, error)
        finally:
            with self._lock:
                self.summary["stages"][first_entry:] = sorted(
                    self.summary["stages"][first_entry:], key=lambda entry: order.get(entry["name"], len(order))
                )
                self._save()
        if errors:
            raise errors[0]
        return {name: done[name] for name in order if name in done}

    def _submit(self, node: Any, inputs: dict[str, StageOutput], upstream: list[Any]) -> Any:
        """The node's Prefect task, started on the flow's task runner (a thread); `upstream`: the
        finished futures of the nodes it reads (only recorded: Prefect links the task runs)."""
        name = node.name
        if not self.in_prefect:  # no flow run: the stage runs here, now (a run with nothing to compute)
            future: Future = Future()
            try:
                future.set_result(run_stage_task(self, node, self.digests[name], inputs))
            except BaseException as error:
                future.set_exception(error)
            return future
        runner = stage_task().with_options(name=name, task_run_name=name)
        return runner.submit(self, node, self.digests[name], inputs, wait_for=upstream)

    def open_stage(self, stage: Step, digest: str, inputs: dict[str, StageOutput]) -> str:
        """The stage's MLflow child run, opened (RUNNING) as the stage starts, with its params and
        lineage tags: the UI shows a stage while it runs, and its duration is the stage's."""
        assert self.tracker is not None and self.parent_run is not None
        tags = {
            **self._tags(),
            "vlmflow.stage": stage.name,
            "vlmflow.status": "running",
            "vlmflow.artifact_digest": digest,
            "vlmflow.artifact_path": str(self.store.path(stage.name, digest)),
            "vlmflow.input_digests": json.dumps({k: v.digest for k, v in inputs.items()}, sort_keys=True),
            "vlmflow.component": stage.component.name,
            "vlmflow.code_digest": code_digest(stage.component.modules)[:16],
        }
        with self._lock:
            child = self.tracker.start(stage.name, tags, parent=self.parent_run)
            self.tracker.log(child, params=flatten(stage.component.dump(stage.config)))
            self._log_datasets(stage, inputs, child)
        return child

    def _log_datasets(self, stage: Step, inputs: dict[str, StageOutput], child: str) -> None:
        """The stage's data inputs (artifacts of a data type) as MLflow datasets of its run, by
        port; and of the recipe run, each once, with the first stage that read it."""
        assert self.tracker is not None and self.parent_run is not None
        ports = stage.component.ports(stage.config)
        read = [
            (dataset(out.stage, out.digest, out.path, out.stats.get("rows_out")), port)
            for port, out in inputs.items()
            if port in ports and ports[port].type in DATA_TYPES
        ]
        self.tracker.log_datasets(child, read)
        new = [(found, stage.name) for found, _ in read if (found.name, found.digest) not in self._datasets]
        self._datasets |= {(found.name, found.digest) for found, _ in new}
        self.tracker.log_datasets(self.parent_run, new)

    def watch(self, stage: Step, digest: str, child: str) -> StageWatch:
        """What streams into the stage's run while it is built: its `history.jsonl` (training
        steps, also shown on the console) and, for a stage that trains a model, MLflow's system
        metrics (CPU, memory, disk, network, GPU where present; of the machine the driver runs on)."""
        assert self.tracker is not None
        tracker = self.tracker
        paths = [self.store.partial_path(stage.name, digest), self.store.path(stage.name, digest)]  # built, committed
        paths = [folder / HISTORY for folder in paths]
        progress = StepProgress(stage.name, self.recipe.runtime.progress)
        group = stage.component.name

        def log(rows: list[dict]) -> None:
            tracker.log_history(child, rows, group)

        interval = self.recipe.runtime.mlflow.history_interval
        tail = HistoryTail(log, paths, self._lock, interval, progress=progress).start()
        system = None
        if stage.component.writes == "model" and self.recipe.runtime.mlflow.system_metrics:
            system = tracker.system_metrics(child, self.recipe.runtime.mlflow.system_metrics_interval)
        return StageWatch(tail, system)

    def progress_sink(self, child: str) -> Callable[[str, int, int], None]:
        """Where a stage's progress (ingest units, evaluation and CapFilt batches, instruct
        requests) goes beside the console: its MLflow run, as `progress/...` curves."""
        assert self.tracker is not None
        tracker = self.tracker

        def sink(desc: str, done: int, total: int) -> None:
            with self._lock:
                tracker.log_progress(child, desc, done, total)

        return sink

    def record(
        self,
        stage: Step,
        digest: str,
        inputs: dict[str, StageOutput],
        status: str,
        stats: dict,
        child: str,
        started: str | None = None,
        error: str | None = None,
        streamed: int = 0,
    ) -> str:
        """One stage's entry in summary.json, and its MLflow child run completed and closed.
        started: when it began, or when it was found cached (then also its `finished`); finished:
        now. streamed: history rows already logged while the stage ran (not logged again)."""
        finished = started if status == "cached" and started else _now()
        started = started or finished
        with self._lock:
            assert self.tracker is not None and self.parent_run is not None
            path = self.store.path(stage.name, digest)
            entry = {
                "name": stage.name,
                "component": stage.component.name,
                "status": status,
                "artifact_digest": digest,
                "artifact_path": str(path),
                "input_digests": {k: v.digest for k, v in inputs.items()},
                "input_stages": {k: v.stage for k, v in inputs.items()},
                **{k: stats.get(k) for k in ("rows_in", "rows_out", "rows_quarantined", "seconds")},
                "set_aside": stats.get("set_aside", "quarantined"),
                "started": started,
                "finished": finished,
            }
            headlines = ("eval_", "first_loss", "final_loss")
            headline = {k: v for k, v in stats["metrics"].items() if k.startswith(headlines)}
            if headline:
                entry["metrics"] = headline
            tags = {"vlmflow.status": status}
            origin = self.tracker.computed_in(stage.name, digest) if status == "cached" else None
            if origin:
                tags["vlmflow.computed_in"] = origin
                tags["mlflow.note.content"] = (
                    f"Cached: this artifact was computed in MLflow run {origin} ({self.tracker.run_url(origin)}), "
                    "which holds its per-step curves and files."
                )
            rows = {k: float(stats.get(k) or 0) for k in ("rows_in", "rows_out", "rows_quarantined", "seconds")}
            seconds = stats.get("seconds") or 0.0
            rows["rows_per_s"] = rows["rows_in"] / seconds if seconds else 0.0
            metrics = {**rows, **self._planned(stage.name), **stats["metrics"]}
            self.tracker.log(child, tags=tags, metrics=metrics, group=stage.component.name)
            if origin is None:  # computed here, or the run that computed it is not in this store
                self._log_outputs(child, path, stats, status, streamed, stage.component.name)
            self.tracker.finish(child, status != "failed")
            entry["mlflow_run_id"] = child
            if error is not None:
                entry["error"] = error
            self.summary["stages"].append(entry)
            self._save()
            return child

    def record_skipped(self, name: str, inputs: dict[str, StageOutput], failed: str) -> None:
        """A stage that never started because upstream stage `failed` failed (summary.json only:
        it has no digest and no MLflow run). Its started and finished: when it was skipped."""
        now = _now()
        log.warning("%s: skipped (upstream %s failed)", name, failed)
        entry = {
            "name": name,
            "status": "skipped",
            "reason": f"upstream {failed} failed",
            "artifact_digest": None,
            "artifact_path": None,
            "input_digests": {k: v.digest for k, v in inputs.items()},
            "input_stages": {k: v.stage for k, v in inputs.items()},
            **dict.fromkeys(("rows_in", "rows_out", "rows_quarantined"), None),
            "seconds": 0.0,
            "started": now,
            "finished": now,
        }
        with self._lock:
            self.summary["stages"].append(entry)
            self._save()

    def publish_stage(self, stage: Step, status: str) -> None:
        """The stage's row as an artifact of its Prefect task run (status, rows, digest, MLflow link)."""
        if self._prefect_logs is None:
            return
        with self._lock:
            entry = next(s for s in reversed(self.summary["stages"]) if s["name"] == stage.name)
        self._publish([entry], f"stage-{stage.name}", f"{stage.name}: {status} ({stage.component.name})")

    def _publish(self, stages: list[dict], key: str, description: str) -> None:
        """The stages as a markdown table artifact of the current Prefect task or flow run (also
        of a run that failed before its MLflow run opened: then no stage has a run to link)."""
        link = self.tracker.run_url if self.tracker is not None else str
        try:
            from prefect.artifacts import create_markdown_artifact

            create_markdown_artifact(markdown=stage_table(stages, link), key=artifact_key(key), description=description)
        except Exception as exc:  # the run's own record (summary.json, MLflow) is complete without it
            log.warning("could not publish the Prefect artifact %s: %s", key, exc)

    def _planned(self, name: str) -> dict[str, float]:
        """What the plan predicted for a stage (a training stage's memory and FLOPs), logged beside
        what it measured (worker_rss_*)."""
        planned = self.plan.stage(name) if self.plan is not None else None
        return planned.detail.tracked() if planned is not None and planned.detail is not None else {}

    def _log_outputs(self, child: str, path: Path, stats: dict, status: str, streamed: int, group: str) -> None:
        """Artifacts (keeping their sub-folders), the per-step history (unless it was streamed
        while the stage ran), and a registered model."""
        assert self.tracker is not None
        for name in stats.get("artifacts", []):
            folder = Path(name).parent
            self.tracker.log_files(child, [path / name], None if folder == Path(".") else str(folder))
        outputs = Outputs.of(stats)
        for name in outputs.tables:  # e.g. an evaluation's predictions
            if (path / name).is_file():
                self.tracker.log_table(child, path / name, str(Path(name).with_suffix(".json")))
        if outputs.history and not streamed and (path / outputs.history).is_file():
            lines = (path / outputs.history).read_text().splitlines()
            self.tracker.log_history(child, [json.loads(line) for line in lines if line.strip()], group)
        for model in outputs.models if status == "computed" else ():
            tags = {**model.tags, "vlmflow.spec_digest": self.summary["spec_digest"], "vlmflow.run_id": self.run_id}
            version = self.tracker.register_model(child, model.name, model.artifact_path, tags)
            entry = {"name": model.name, "version": version, "stage": model.tags.get("vlmflow.stage")}
            self.summary.setdefault("registered_models", []).append(entry)


@dataclass
class StageWatch:
    """A running stage's streams into its MLflow run (see RecipeRun.watch)."""

    tail: HistoryTail
    system: Any = None  # an MLflow SystemMetricsMonitor

    def stop(self) -> int:
        """Stops both; returns the history rows logged."""
        if self.system is not None:
            self.system.finish()
        return self.tail.stop()


@functools.cache
def stage_task() -> Any:
    """`run_stage_task` as the Prefect task each stage of a flow runs as."""
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    return task(run_stage_task, name="stage_task", cache_policy=NO_CACHE, persist_result=False)


def run_stage_task(run: RecipeRun, step: Step, digest: str, inputs: dict[str, StageOutput]) -> StageOutput:
    """One stage of a run: reused or built (`run_stage`), recorded in MLflow and the summary."""
    started = _now()  # summary.json's `started` (and a cached stage's `finished`)
    child = run.open_stage(step, digest, inputs)
    # A stage found built has nothing to stream: its history is logged once (by `record`, linked
    # to the run that computed it when MLflow has that run).
    watch = None if run.store.is_complete(step.name, digest) else run.watch(step, digest, child)
    try:
        with reporting_to(run.progress_sink(child)):
            executor = functools.partial(executor_for, run.recipe.runtime.executor, start_ray=run.ensure_ray)
            status, stats = run_stage(
                step, digest, inputs, run.recipe, run.store, run.recipe.runtime.progress, executor
            )
    except BaseException as error:
        streamed = watch.stop() if watch is not None else 0
        failed = {"metrics": {}, "artifacts": [], "seconds": 0.0}
        run.record(step, digest, inputs, "failed", failed, child, started, f"{type(error).__name__}: {error}", streamed)
        run.publish_stage(step, "failed")
        raise
    streamed = watch.stop() if watch is not None else 0
    run.record(step, digest, inputs, status, stats, child, started, streamed=streamed)
    run.publish_stage(step, status)
    return StageOutput(step.name, digest, run.store.path(step.name, digest), stats)
