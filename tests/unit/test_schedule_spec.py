"""The `schedule:` section: cron or interval, durations, timezone, flow; errors at FILE:LINE:COL."""

from __future__ import annotations

import pytest

from tests.unit.test_specs import MINIMAL, only_problem, position, write
from vlmflow.errors import UserError
from vlmflow.specs import load_recipe
from vlmflow.specs.schedule import duration_seconds


def _with_schedule(tmp_path, body: str):
    text = MINIMAL + "schedule:\n" + "".join(f"  {line}\n" for line in body.strip().splitlines())
    return write(tmp_path, text), text


def test_no_schedule_by_default(tmp_path):
    assert load_recipe(write(tmp_path, MINIMAL)).schedule is None


def test_cron_schedule_defaults_to_data_refresh_in_utc(tmp_path):
    path, _ = _with_schedule(tmp_path, "cron: '0 3 * * *'")
    schedule = load_recipe(path).schedule
    assert (schedule.flow, schedule.cron, schedule.interval, schedule.timezone) == (
        "data-refresh", "0 3 * * *", None, "UTC",
    )  # fmt: skip
    assert schedule.deployment_name("tiny") == "tiny-data-refresh"
    assert schedule.prefect_schedule().cron == "0 3 * * *"


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(30, 30.0), (2.5, 2.5), ("45", 45.0), ("90s", 90.0), ("15m", 900.0), ("1h30m", 5400.0), ("1d", 86400.0)],
)
def test_interval_accepts_seconds_and_durations(value, seconds):
    assert duration_seconds(value) == seconds


def test_interval_schedule_with_timezone_and_flow(tmp_path):
    path, _ = _with_schedule(tmp_path, "interval: 1h\ntimezone: Europe/Paris\nflow: recipe\nname: nightly")
    schedule = load_recipe(path).schedule
    assert (schedule.interval, schedule.timezone, schedule.flow) == (3600.0, "Europe/Paris", "recipe")
    assert schedule.deployment_name("tiny") == "nightly"
    prefect_schedule = schedule.prefect_schedule()
    assert (prefect_schedule.interval.total_seconds(), prefect_schedule.timezone) == (3600.0, "Europe/Paris")


def test_schedule_set_from_the_command_line(tmp_path):
    recipe = load_recipe(write(tmp_path, MINIMAL), ["schedule.interval=10m"])
    assert recipe.schedule.interval == 600.0


@pytest.mark.parametrize(
    ("body", "line", "needle", "field", "message"),
    [
        ("cron: '61 * * * *'", 7, "'61", "schedule.cron", "Invalid cron string"),
        ("cron: '0 3 * *'", 7, "'0", "schedule.cron", "Invalid cron string"),
        ("interval: 10 minutes", 7, "10", "schedule.interval", "is not a duration"),
        ("interval: 0", 7, "0", "schedule.interval", "greater than or equal to 1"),
        ("interval: true", 7, "true", "schedule.interval", "expected seconds"),
        ("interval: 1h\ntimezone: Mars/Olympus", 8, "Mars", "schedule.timezone", "Invalid timezone"),
        ("interval: 1h\nflow: train", 8, "train", "schedule.flow", "'data-refresh' or 'recipe'"),
        ("interval: 1h\nevery: 2", 8, "every", "schedule.every", "unknown field"),
        ("cron: '0 3 * * *'\ninterval: 1h", 7, "cron", "schedule", "exactly one of cron"),
        ("timezone: UTC", 7, "timezone", "schedule", "exactly one of cron"),
    ],
)
def test_bad_schedules_name_file_line_and_field(tmp_path, body, line, needle, field, message):
    path, text = _with_schedule(tmp_path, body)
    problem = only_problem(path)
    assert problem.field == field, str(problem)
    assert message in problem.message, str(problem)
    assert problem.source == str(path)
    if field != "schedule":
        assert (problem.line, problem.col) == (line, position(text, line, needle)), str(problem)


@pytest.mark.parametrize(
    ("flow", "entrypoint"),
    [
        ("data-refresh", "vlmflow.flows.data_refresh.data_refresh_flow"),
        ("recipe", "vlmflow.flows.scheduled_recipe.scheduled_recipe_flow"),
    ],
)
def test_the_deployment_names_its_flow_by_module_path_with_plain_parameters(tmp_path, flow, entrypoint):
    from vlmflow.runtime.schedule import deployment

    path, _ = _with_schedule(tmp_path, f"cron: '0 3 * * *'\ntimezone: Europe/Paris\nflow: {flow}")
    recipe = load_recipe(path, ["seed=4"])
    made = deployment(recipe, str(path), tmp_path / "work", ["seed=4"])
    assert (made.entrypoint, made.name, made.concurrency_limit) == (entrypoint, f"tiny-{flow}", 1)
    assert made.parameters == {"spec_path": str(path), "workdir": str(tmp_path / "work"), "overrides": ["seed=4"]}
    (schedule,) = made.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone) == ("0 3 * * *", "Europe/Paris")


def test_schedule_and_deploy_refuse_without_a_schedule_or_a_server(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from vlmflow.cli import cli

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    bare = write(tmp_path, MINIMAL)
    result = CliRunner().invoke(cli, ["schedule", str(bare), "--workdir", str(tmp_path / "w")])
    assert result.exit_code == 2
    assert f"{bare}:1:1: schedule: no schedule: section" in result.output
    scheduled, _ = _with_schedule(tmp_path / "s", "interval: 1h")
    result = CliRunner().invoke(cli, ["deploy", str(scheduled), "--pool", "p", "--workdir", str(tmp_path / "w")])
    assert isinstance(result.exception, UserError) and "needs a Prefect server" in str(result.exception)
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # nothing listens there
    monkeypatch.setattr("vlmflow.cli.SERVER_WAIT_S", 0.5)
    result = CliRunner().invoke(cli, ["schedule", str(scheduled), "--workdir", str(tmp_path / "w")])
    assert isinstance(result.exception, UserError)
    assert "no Prefect server answers at http://127.0.0.1:9/api" in str(result.exception)
