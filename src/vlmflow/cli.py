"""`vlmflow recipes | schema | validate | plan | run | evaluate | refresh | schedule | deploy | lineage | verify |
status | ui | export | compare | mock-llm`. User mistakes print one clear message (exit 2), never a traceback."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click
import yaml

from vlmflow.artifacts import check_writable
from vlmflow.errors import SpecError, StorageError, UserError, storage_fault
from vlmflow.recipes import builtin_recipes, describe, resolve_spec
from vlmflow.specs import Recipe, load_recipe
from vlmflow.specs.data import source_name

if TYPE_CHECKING:
    from vlmflow.plan import Plan

DEFAULT_WORKDIR = "vlmflow-work"
set_option = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override a spec field")
workdir_option = click.option(
    "--workdir", type=click.Path(path_type=Path), default=None, help="default: ./vlmflow-work"
)


class SpecPath(click.Path):
    """A spec file, or the name of a built-in recipe (`vlmflow recipes`): the command gets the file's path."""

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> object:
        return super().convert(str(resolve_spec(os.fspath(value))), param, ctx)


def _load(spec: str, overrides: tuple[str, ...]) -> Recipe:
    try:
        return load_recipe(resolve_spec(spec), overrides)
    except SpecError as exc:
        for problem in exc.problems:
            click.echo(str(problem), err=True)
            if problem.message == "spec file not found":
                click.echo("  SPEC: a recipe file or a built-in recipe's name (`vlmflow recipes` lists them)", err=True)
        sys.exit(2)


def _workdir(recipe: Recipe | None, workdir: Path | None) -> Path:
    """The workdir a command uses; what runs there left when their driver was killed is stopped first."""
    if workdir is None:
        configured = recipe.runtime.workdir if recipe is not None else None
        workdir = configured if configured is not None else Path(DEFAULT_WORKDIR)
    from vlmflow.runs import reap_dead_runs

    reap_dead_runs(workdir)
    return workdir


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vlmflow")
@click.option("-v", "--verbose", is_flag=True, help="also show Prefect's, Ray's and the ML libraries' own logs")
@click.option("-q", "--quiet", is_flag=True, help="only errors and the final table")
def cli(verbose: bool, quiet: bool) -> None:
    """vlmflow: a VLM recipe as a reproducible Prefect + Ray + MLflow pipeline."""
    logger = logging.getLogger("vlmflow")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("vlmflow: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.WARNING if quiet else logging.INFO)
        logger.propagate = False
    _console_env(verbose)


def _console_env(verbose: bool) -> None:
    """The libraries' own console output, set before they are imported: by default only their
    warnings and errors (Prefect's task state lines, Ray's start-up notes and the ML libraries'
    chatter are in the Prefect and MLflow UIs or the log files), and no colour codes when the
    output is not a terminal. `-v` leaves the libraries as they are."""
    if verbose:
        os.environ["VLMFLOW_LIBRARY_LOGS"] = "1"
        return
    quiet = {
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "MLFLOW_LOGGING_LEVEL": "WARNING",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "TRANSFORMERS_VERBOSITY": "error",
        "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
        "RAY_DEDUP_LOGS": "1",
    }
    if not sys.stderr.isatty():
        quiet |= {"PREFECT_LOGGING_COLORS": "false", "NO_COLOR": "1", "RAY_COLOR_PREFIX": "0"}
    for key, value in quiet.items():
        os.environ.setdefault(key, value)


@cli.command()
@click.argument("spec", type=SpecPath(dir_okay=False))
@set_option
def validate(spec: str, overrides: tuple[str, ...]) -> None:
    """Validate SPEC and print the resolved recipe summary (exit 2 on problems)."""
    recipe = _load(spec, overrides)
    click.echo(f"{spec}: ok: recipe {recipe.name!r} (seed {recipe.seed})")
    if recipe.pipeline is not None:
        for step in recipe.pipeline:
            wired = ", ".join(f"{port}<-{up}" for port, up in step.inputs.items())
            click.echo(f"  step {step.name}: {step.uses}" + (f" ({wired})" if wired else ""))
    else:
        for index, source in enumerate(recipe.data.sources):
            click.echo(f"  source {source_name(source, index)}: {source.kind}, split {source.split}")
        click.echo(f"  filters: {', '.join(f.kind for f in recipe.data.filters) or 'none'}")
        dedup = recipe.data.dedup
        click.echo(f"  dedup: {'off' if dedup is None else f'exact={dedup.exact} near={dedup.near}'}")
        click.echo(f"  tokenizer: {recipe.tokenizer.kind if recipe.tokenizer else 'none'}")
        click.echo(f"  shard size: {recipe.data.shard_size}")
    click.echo(f"  schedule: {recipe.schedule.describe() if recipe.schedule else 'none'}")


@cli.command()
def recipes() -> None:
    """List the built-in recipes: `vlmflow run NAME` runs one (a tiny CPU twin: NAME-tiny)."""
    found = builtin_recipes()
    width = max(len(name) for name in found)
    for name, path in sorted(found.items()):
        click.echo(f"{name:<{width}}  {describe(path)}".rstrip())


@cli.command()
@click.option(
    "--output", type=click.Path(dir_okay=False, path_type=Path), default=None, help="write it here (docs/spec.md)"
)
@click.option("--json", "as_json", is_flag=True, help="the recipe's JSON Schema instead of the markdown reference")
def schema(output: Path | None, as_json: bool) -> None:
    """Print the spec reference: every section and kind with its fields, from the spec models."""
    from vlmflow import spec_reference

    text = json.dumps(spec_reference.json_schema(), indent=2) + "\n" if as_json else spec_reference.reference()
    if output is None:
        click.echo(text, nl=False)
        return
    try:
        output.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot write {output}: {exc.strerror or exc}") from None
    click.echo(f"wrote {output}")


def _prefect_env(workdir: Path) -> None:
    """Prefect ephemeral by default, its database in the workdir; a server when PREFECT_API_URL is set."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    if "PREFECT_API_URL" not in os.environ:
        os.environ.setdefault("PREFECT_HOME", str((workdir / "prefect").resolve()))


def _check_servers(recipe: Recipe, workdir: Path) -> None:
    """The tracking and Prefect servers the run will use answer (one line now if not)."""
    from vlmflow.runtime.servers import check_servers
    from vlmflow.tracking import tracking_uri

    check_servers(tracking_uri(workdir, recipe.runtime.mlflow.tracking_uri))


@cli.command()
@click.argument("spec", type=SpecPath(dir_okay=False))
@workdir_option
@set_option
def run(spec: str, workdir: Path | None, overrides: tuple[str, ...]) -> None:
    """Run the recipe in SPEC as a Prefect flow; finished stages are reused."""
    recipe = _load(spec, overrides)
    workdir = _workdir(recipe, workdir)
    check_writable(workdir)  # a read-only or full workdir: one line now, not Prefect's time-out
    _check_servers(recipe, workdir)
    plan = _checked_plan(spec, overrides, recipe, workdir)
    _prefect_env(workdir)
    from vlmflow.runtime.prefect import run_recipe

    try:
        summary = run_recipe(recipe, workdir, spec, plan)
    except UserError:
        _print_latest(workdir)
        raise
    _print_summary(summary)
    uri = summary["mlflow_tracking_uri"]
    click.echo(f"\nsummary: {workdir / 'runs' / summary['run_id'] / 'summary.json'}")
    click.echo(
        f"MLflow: experiment {recipe.runtime.mlflow.experiment or recipe.name!r}, run {summary['mlflow_run_id']}"
    )
    click.echo(f"  store {uri}")
    click.echo(f"  browse: vlmflow ui --workdir {workdir}   (MLflow UI on http://127.0.0.1:5000, Prefect UI on :4200)")


@cli.command()
@click.argument("spec", type=SpecPath(dir_okay=False))
@workdir_option
@set_option
@click.option("--json", "as_json", is_flag=True, help="print the plan as JSON")
@click.option("--pipeline", "as_pipeline", is_flag=True, help="print the recipe's graph as an explicit pipeline:")
def plan(spec: str, workdir: Path | None, overrides: tuple[str, ...], as_json: bool, as_pipeline: bool) -> None:
    """Show what `run SPEC` would do, without running it: stages cached or to run, row counts,
    mixtures, steps, parameters, memory per worker and compute (exit 2 if a stage cannot fit)."""
    from vlmflow.plan import build_plan, check, render

    recipe = _load(spec, overrides)
    if as_pipeline:
        from vlmflow.pipeline import explicit_form, recipe_graph

        steps = explicit_form(recipe_graph(recipe), recipe.spec_dir())
        click.echo(yaml.safe_dump({"pipeline": steps}, sort_keys=False, width=100), nl=False)
        return
    result = build_plan(recipe, _workdir(recipe, workdir))
    click.echo(json.dumps(result.as_json(), indent=2) if as_json else render(result))
    _exit_on_plan_errors(spec, overrides, check(result))


def _checked_plan(spec: str, overrides: tuple[str, ...], recipe: Recipe, workdir: Path) -> Plan:
    from vlmflow.plan import build_plan, check

    result = build_plan(recipe, workdir, cached_details=False)
    _exit_on_plan_errors(spec, overrides, check(result, running=True))
    return result


def _exit_on_plan_errors(spec: str, overrides: tuple[str, ...], errors: list) -> None:
    from vlmflow.specs.loader import located

    for error in errors:
        click.echo(str(located(spec, overrides, error.field, error.message)), err=True)
    if errors:
        sys.exit(2)


def _print_latest(workdir: Path) -> None:
    latest = workdir / "runs" / "latest" / "summary.json"
    if latest.exists():
        _print_summary(json.loads(latest.read_text()))


def _print_summary(summary: dict) -> None:
    click.echo(f"\nrun {summary['run_id']} ({summary['recipe']}): {summary['status']}")
    width = max([12, *(len(s["name"]) + 2 for s in summary["stages"])])
    header = f"{'stage':<{width}}{'status':<10}{'rows_in':>9}{'rows_out':>9}{'quarant.':>9}{'seconds':>9}  digest"
    click.echo(header)
    for s in summary["stages"]:
        click.echo(
            f"{s['name']:<{width}}{s['status']:<10}{s['rows_in'] or 0:>9}{s['rows_out'] or 0:>9}"
            f"{s['rows_quarantined'] or 0:>9}{s['seconds'] or 0:>9.1f}  {s['artifact_digest']}"
        )
    for s in summary["stages"]:
        if s.get("metrics"):
            figures = "  ".join(f"{k.removeprefix('eval_')} {v:.3g}" for k, v in sorted(s["metrics"].items()))
            click.echo(f"{s['name']}: {figures}")


def _summary(workdir: Path, run_id: str | None) -> dict:
    from vlmflow.runs import load_summary

    return load_summary(run_id, workdir)


@cli.command()
@click.argument("run_id", required=False)
@workdir_option
@click.option("--versions", "show_versions", is_flag=True, help="the manifest versions made by data refreshes")
def lineage(run_id: str | None, workdir: Path | None, show_versions: bool) -> None:
    """Print the stage DAG of RUN_ID (default: the latest run) with digests and row counts;
    with --versions, each recipe's manifest versions, each linked to the one before."""
    if show_versions:
        _print_versions(_workdir(None, workdir))
        return
    summary = _summary(_workdir(None, workdir), run_id)
    click.echo(
        f"run {summary['run_id']}  recipe {summary['recipe']}  spec {summary['spec_digest']}  {summary['status']}"
    )
    click.echo(f"  mlflow run {summary.get('mlflow_run_id')}  prefect flow run {summary.get('prefect_flow_run_id')}")
    for s in summary["stages"]:
        click.echo(f"  {s['name']}/{s['artifact_digest'] or '-'}  <- {_inputs_line(s)}")
        if s["status"] == "skipped":
            click.echo(f"      skipped: {s.get('reason', 'an upstream stage failed')}")
            continue
        set_aside = s.get("set_aside", "quarantined")  # summaries before 2026-11-28 lack it
        click.echo(
            f"      {s['status']}: rows {s['rows_in']} -> {s['rows_out']} (+{s['rows_quarantined']} {set_aside})"
            f"  mlflow {s.get('mlflow_run_id')}"
        )


def _inputs_line(stage: dict) -> str:
    """`ingest/DIGEST`, one per input, with the port it feeds when that is not the stage's name."""
    names = stage.get("input_stages", {})  # summaries before 2026-12-03 name ports only
    parts = []
    for port, digest in stage["input_digests"].items():
        upstream = names.get(port, port)
        parts.append(f"{upstream}/{digest}" + (f" as {port}" if upstream != port else ""))
    return ", ".join(parts) or "sources"


def _print_versions(workdir: Path) -> None:
    from vlmflow import versions

    found = versions.recipes(workdir)
    if not found:
        raise UserError(f"no manifest versions in {workdir / 'versions'}: run `vlmflow refresh` or `vlmflow schedule`")
    for recipe in found:
        click.echo(f"recipe {recipe}")
        for line in versions.render(versions.read_versions(workdir, recipe)):
            click.echo(line)


@cli.command()
@click.argument("spec", type=SpecPath(dir_okay=False))
@click.option("--model", "model", required=True, metavar="REF",
              help="models:/NAME/VERSION, a model folder, a stage or run folder, a run id or a checkpoint")  # fmt: skip
@workdir_option
@set_option
def evaluate(spec: str, model: str, workdir: Path | None, overrides: tuple[str, ...]) -> None:
    """Run the evaluate: section of SPEC on MODEL (not the recipe's training), tracked as a run."""
    recipe = _load(spec, overrides)
    workdir = _workdir(recipe, workdir)
    check_writable(workdir)
    _check_servers(recipe, workdir)
    _prefect_env(workdir)
    from vlmflow.flows.evaluate import evaluate_flow

    try:
        summary = evaluate_flow(recipe, workdir, spec, model)
    except UserError:
        _print_latest(workdir)
        raise
    _print_summary(summary)
    click.echo(f"\nsummary: {workdir / 'runs' / summary['run_id'] / 'summary.json'}")


@cli.command()
@click.argument("spec", type=SpecPath(dir_okay=False))
@workdir_option
@set_option
def refresh(spec: str, workdir: Path | None, overrides: tuple[str, ...]) -> None:
    """Refresh SPEC's data once, now: the data stages only (ingest, dedup, tokenizer, instruct);
    ingest reads only new or changed source files, and a stage reruns only when its input changed."""
    recipe = _load(spec, overrides)
    workdir = _workdir(recipe, workdir)
    check_writable(workdir)
    _check_servers(recipe, workdir)
    _prefect_env(workdir)
    from vlmflow.flows.data_refresh import data_refresh_flow
    from vlmflow.versions import render

    summary = data_refresh_flow(str(Path(spec).resolve()), str(workdir.resolve()), list(overrides))
    _print_summary(summary)
    click.echo("\nmanifest version:")
    for line in render([summary["manifest_version"]]):
        click.echo(line)


SERVER_WAIT_S = 60.0


def _wait_for_server(api_url: str, seconds: float) -> None:
    """Wait for the Prefect server to answer (it may be starting beside this command)."""
    import time

    import httpx

    deadline = time.monotonic() + seconds
    while True:
        try:
            if httpx.get(f"{api_url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise UserError(f"no Prefect server answers at {api_url} (PREFECT_API_URL) after {seconds:.0f} s")
        time.sleep(0.5)


def _scheduled(spec: str, overrides: tuple[str, ...], workdir: Path | None) -> tuple[Recipe, Path]:
    """The recipe (with a schedule: section) and its workdir; a Prefect server is required."""
    recipe = _load(spec, overrides)
    if recipe.schedule is None:
        from vlmflow.specs.loader import located

        message = "no schedule: section (e.g. schedule: {interval: 1h} or --set schedule.cron='0 3 * * *')"
        click.echo(str(located(spec, overrides, ("schedule",), message)), err=True)
        sys.exit(2)
    if not os.environ.get("PREFECT_API_URL"):
        raise UserError(
            "scheduling needs a Prefect server: start one (prefect server start) and set "
            "PREFECT_API_URL, e.g. http://127.0.0.1:4200/api"
        )
    _wait_for_server(os.environ["PREFECT_API_URL"].rstrip("/"), SERVER_WAIT_S)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    workdir = _workdir(recipe, workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    return recipe, workdir


@cli.command()
@click.argument("spec", type=SpecPath(dir_okay=False))
@workdir_option
@set_option
def schedule(spec: str, workdir: Path | None, overrides: tuple[str, ...]) -> None:
    """Serve SPEC's `schedule:` (cron or interval; flow data-refresh by default) from this process:
    the Prefect server (PREFECT_API_URL) creates the runs on time and this process executes them,
    one at a time, until Ctrl-C (which pauses the schedule)."""
    from vlmflow.runtime.schedule import deployment, serve

    recipe, workdir = _scheduled(spec, overrides, workdir)
    assert recipe.schedule is not None
    name = recipe.schedule.deployment_name(recipe.name)
    click.echo(f"serving {name}: {recipe.schedule.describe()}, workdir {workdir}; Ctrl-C stops")
    serve(deployment(recipe, spec, workdir, overrides))


@cli.command()
@click.argument("spec", type=SpecPath(dir_okay=False))
@click.option("--pool", required=True, help="a Prefect work pool (e.g. prefect work-pool create NAME --type process)")
@workdir_option
@set_option
def deploy(spec: str, pool: str, workdir: Path | None, overrides: tuple[str, ...]) -> None:
    """Create (or update) a deployment of SPEC's `schedule:` on the Prefect server's work pool POOL.
    A worker of the pool runs it: `prefect worker start --pool POOL` where vlmflow is installed and
    SPEC, its data and the workdir are at the same paths."""
    from vlmflow.runtime import schedule as scheduled

    recipe, workdir = _scheduled(spec, overrides, workdir)
    assert recipe.schedule is not None
    found = scheduled.deploy(scheduled.deployment(recipe, spec, workdir, overrides), pool)
    flow_name = "vlmflow-data-refresh" if recipe.schedule.flow == "data-refresh" else "vlmflow-scheduled-recipe"
    name = recipe.schedule.deployment_name(recipe.name)
    click.echo(f"deployment {flow_name}/{name} ({found}) on work pool {pool!r}: {recipe.schedule.describe()}")
    click.echo(f"  run it with a worker: prefect worker start --pool {pool}")
    click.echo(f"  or now: prefect deployment run '{flow_name}/{name}'")


@cli.command()
@workdir_option
def status(workdir: Path | None) -> None:
    """List the runs in the workdir."""
    runs = _workdir(None, workdir) / "runs"
    found = sorted(p for p in runs.glob("*/summary.json") if p.parent.name != "latest") if runs.exists() else []
    if not found:
        raise UserError(f"no runs in {runs}")
    from vlmflow.runs import status_of

    for path in found:
        s = json.loads(path.read_text())
        states = " ".join(f"{x['name']}:{x['status']}" for x in s["stages"])
        click.echo(f"{s['run_id']}  {s['recipe']:<16}{status_of(s):<10}{states}")


@cli.command()
@workdir_option
@click.option("--port", default=5000, show_default=True, help="the MLflow UI's port")
@click.option("--prefect-port", default=4200, show_default=True, help="the Prefect UI's port")
@click.option("--host", default="127.0.0.1", show_default=True, help="the address both listen on")
@click.option("--any-port", is_flag=True, help="take free ports where the given ones are taken")
def ui(workdir: Path | None, port: int, prefect_port: int, host: str, any_port: bool) -> None:
    """Serve the MLflow UI and the Prefect UI on the workdir's stores; the URLs come once both
    answer, and Ctrl-C (or SIGTERM) stops both."""
    from vlmflow.runtime import ui as servers

    workdir = _workdir(None, workdir).resolve()
    if not (workdir / "mlflow.db").exists():
        raise UserError(f"no MLflow store in {workdir}; run a recipe first")
    if host not in servers.LOCAL:
        logging.getLogger("vlmflow").warning(
            "serving on %s: anyone who reaches this address sees and can change the runs (no login)", host
        )
    ports = servers.choose_ports(host, {"--port": port, "--prefect-port": prefect_port}, any_port)
    group = servers.servers(workdir, host, ports["--port"], ports["--prefect-port"])
    logging.getLogger("vlmflow").info("starting the MLflow UI and the Prefect UI on %s", host)
    sys.exit(servers.serve(group))


@cli.command("mock-llm")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--fault-rate", default=0.0, show_default=True, type=click.FloatRange(0.0, 1.0))
@click.option(
    "--faults",
    default="rate-limit,server-error,slow,bad-body,bad-content,truncated",
    show_default=True,
    help="comma-separated faults to draw from",
)
@click.option("--latency-ms", default=0.0, show_default=True, type=click.FloatRange(0.0))
@click.option("--slow-s", default=30.0, show_default=True, type=click.FloatRange(0.0), help="delay of a slow reply")
@click.option("--retry-after-s", default=1.0, show_default=True, type=click.FloatRange(0.0), help="sent with 429s")
@click.option("--model", "models", multiple=True, help="served model (repeatable); default: mock-llm, gpt-4o-mini")
@click.option("--api-key-env", default=None, help="require the key held by this environment variable")
@click.option("--seed", default=0, show_default=True, type=int)
def mock_llm(
    host: str,
    port: int,
    fault_rate: float,
    faults: str,
    latency_ms: float,
    slow_s: float,
    retry_after_s: float,
    models: tuple[str, ...],
    api_key_env: str | None,
    seed: int,
) -> None:
    """Serve a mock OpenAI-compatible chat API that answers from the scene context in the prompt."""
    from vlmflow.components.instruct.mock_server import DEFAULT_MODELS, MockConfig, serve

    api_key = None
    if api_key_env is not None:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise UserError(f"--api-key-env: the environment variable {api_key_env} is not set")
    try:
        config = MockConfig(
            models=models or DEFAULT_MODELS,
            fault_rate=fault_rate,
            faults=tuple(f.strip() for f in faults.split(",") if f.strip()),
            latency_ms=latency_ms,
            slow_s=slow_s,
            retry_after_s=retry_after_s,
            api_key=api_key,
            seed=seed,
        )
    except ValueError as exc:
        raise UserError(f"mock-llm: {exc}") from None
    click.echo(
        f"mock-llm: serving {', '.join(config.models)} on http://{host}:{port}/v1 "
        f"(fault rate {fault_rate:g}, latency {latency_ms:g} ms); Ctrl-C stops it"
    )
    try:
        serve(config, host, port)
    except OSError as exc:
        raise UserError(f"mock-llm: cannot serve on {host}:{port}: {exc.strerror or exc}") from None


@cli.command()
@click.argument("run")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["hf"]), default="hf", show_default=True)
@workdir_option
def export(run: str, out: Path, fmt: str, workdir: Path | None) -> None:
    """Export RUN's final model as a Hugging Face LlavaForConditionalGeneration folder OUT.

    RUN: a run id or run folder (its last training stage), a stage artifact folder, a
    model folder, or a checkpoint folder (checkpoints/step-N). OUT must be outside the
    artifact store (WORKDIR/artifacts)."""
    workdir = _workdir(None, workdir)
    _refuse_inside_store(out, "OUT", [run], workdir)
    from vlmflow.components.export import export_hf, resolve_model

    with resolve_model(run, workdir) as folder:
        notes = export_hf(folder, out)
    click.echo(f"exported {folder} -> {out} (LlavaForConditionalGeneration)")
    for note in notes:
        click.echo(f"note: {note}")


@cli.command()
@click.argument("runs", nargs=-1, required=True)
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="default: DIR/compare.csv")  # fmt: skip
@workdir_option
def compare(runs: tuple[str, ...], csv_path: Path | None, workdir: Path | None) -> None:
    """Print a markdown table of every evaluation metric of RUNS (run ids, run folders or
    summary.json files), one column per run, and write it as CSV."""
    from vlmflow.components.evaluate.compare import compare as compare_runs
    from vlmflow.components.evaluate.compare import markdown

    workdir = _workdir(None, workdir)
    if csv_path is not None:
        _refuse_inside_store(csv_path, "--csv", list(runs), workdir)
    table = compare_runs(list(runs), workdir)
    click.echo(markdown(table))
    csv_path = csv_path or workdir / "compare.csv"
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    table.write_csv(csv_path)
    click.echo(f"\nwrote {csv_path}")


def _store_of(run_folder: Path) -> Path:
    """The artifact store of the workdir a run folder (WORKDIR/runs/RUN_ID) belongs to."""
    return Path(os.path.realpath(run_folder)).parent.parent / "artifacts"


def _stores(refs: list[str], workdir: Path) -> list[Path]:
    """The artifact stores a command reading `refs` touches: the workdir's, and those of the runs
    `refs` name (their workdir's, and where their summaries say the stages' artifacts are)."""
    from vlmflow.runs import run_folder

    stores = [workdir / "artifacts"]
    for ref in refs:
        try:
            folder = run_folder(ref, workdir)
            summary = json.loads((folder / "summary.json").read_text())
        except (UserError, OSError, ValueError):
            continue
        stores.append(_store_of(folder))
        stores += [Path(s["artifact_path"]).parent.parent for s in summary.get("stages", []) if s.get("artifact_path")]
    return stores


def _refuse_inside_store(out: Path, name: str, refs: list[str], workdir: Path) -> None:
    """A UserError when the output path `out` (option or argument `name`) is inside an artifact
    store: writing there would change content-addressed artifacts in place."""
    from vlmflow.artifacts import store_holding

    store = store_holding(out, _stores(refs, workdir))
    if store is not None:
        raise UserError(f"{name} {out} is inside the artifact store {store}: choose a folder outside it")


@cli.command()
@click.argument("run", required=False)
@workdir_option
def verify(run: str | None, workdir: Path | None) -> None:
    """Re-hash every stage artifact of RUN (a run id, `latest` (default), a run folder or an
    MLflow run id) against the manifest recorded when it was committed: one line per stage,
    exit 1 if any changed, lost or gained a file."""
    from vlmflow.artifacts import SUCCESS, check_manifest
    from vlmflow.runs import run_folder

    folder = run_folder(run, _workdir(None, workdir))
    summary = json.loads((folder / "summary.json").read_text())
    store = _store_of(folder)
    click.echo(f"run {summary['run_id']}  recipe {summary['recipe']}  {summary['status']}")
    width = max((len(s["name"]) for s in summary["stages"]), default=0) + 18
    drifted = 0
    for s in summary["stages"]:
        digest = s.get("artifact_digest")
        label = f"{s['name']}/{digest or '-'}"
        if not digest or s["status"] not in ("computed", "cached"):
            click.echo(f"  {label:<{width}}  {s['status']}: no artifact to check")
            continue
        candidates = [store / s["name"] / digest, Path(s.get("artifact_path") or store / s["name"] / digest)]
        path = next((c for c in candidates if (c / SUCCESS).is_file()), None)
        if path is None:
            drifted += 1
            click.echo(f"  {label:<{width}}  missing: no committed folder at {candidates[0]}")
            continue
        drift = check_manifest(path)
        if drift is None:
            click.echo(f"  {label:<{width}}  no manifest (committed before vlmflow recorded one)")
            continue
        drifted += not drift.ok
        click.echo(f"  {label:<{width}}  {drift.describe()}")
    if drifted:
        click.echo(f"{drifted} of {len(summary['stages'])} stages differ from what was committed", err=True)
        sys.exit(1)


def main() -> None:
    try:
        cli(standalone_mode=True)
    except UserError as exc:
        if isinstance(exc, StorageError):
            _storage_fault(exc)
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except Exception as exc:
        fault = storage_fault(exc)
        if fault is None:
            raise
        _storage_fault(fault)


def _storage_fault(fault: StorageError) -> None:
    """A full disk, a read-only or unwritable workdir: the path and what to do, one line, exit 1."""
    click.echo(f"vlmflow: error: {fault}", err=True)
    sys.exit(1)


if __name__ == "__main__":
    main()
