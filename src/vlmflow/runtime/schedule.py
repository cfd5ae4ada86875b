"""A recipe's `schedule:` as a Prefect deployment: served from this process (`vlmflow schedule`)
or created on a work pool for workers to run (`vlmflow deploy`).

The deployment names its flow by module path (`vlmflow.flows.data_refresh.data_refresh_flow`),
so whatever runs it imports the installed vlmflow: no code storage, no image, no network. Its
parameters are the spec's absolute path, the workdir and the `--set` overrides; the spec is read
again at every run. Runs of one deployment never overlap (a concurrency limit of 1): a refresh
that is due while the last one still runs waits for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from uuid import UUID

from vlmflow.errors import UserError
from vlmflow.specs.recipe import Recipe


def flow_of(name: str) -> Any:
    if name == "data-refresh":
        from vlmflow.flows.data_refresh import data_refresh_flow

        return data_refresh_flow
    from vlmflow.flows.scheduled_recipe import scheduled_recipe_flow

    return scheduled_recipe_flow


def parameters(spec_path: str, workdir: Path, overrides: tuple[str, ...] | list[str]) -> dict:
    spec = str(Path(spec_path).resolve())
    return {"spec_path": spec, "workdir": str(workdir.resolve()), "overrides": list(overrides)}


def deployment(recipe: Recipe, spec_path: str, workdir: Path, overrides: tuple[str, ...] | list[str]) -> Any:
    """The Prefect RunnerDeployment of the recipe's schedule (not yet sent to the server)."""
    from prefect.deployments.runner import EntrypointType

    schedule = recipe.schedule
    assert schedule is not None
    return flow_of(schedule.flow).to_deployment(
        name=schedule.deployment_name(recipe.name),
        schedules=[schedule.prefect_schedule()],
        parameters=parameters(spec_path, workdir, overrides),
        description=f"vlmflow {recipe.name}: {schedule.describe()}",
        tags=["vlmflow", recipe.name, schedule.flow],
        concurrency_limit=1,  # one run at a time, however many workers poll: later ones wait their turn
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def serve(runner_deployment: Any) -> None:
    """Register the deployment and execute its scheduled runs from this process, one at a time,
    until interrupted (its schedule is paused on the way out)."""
    import prefect

    prefect.serve(runner_deployment, limit=1, print_starting_message=False)


def deploy(runner_deployment: Any, pool: str) -> UUID:
    """Create (or update) the deployment on work pool `pool`; a worker of that pool runs it."""
    import prefect

    try:
        (found,) = prefect.deploy(
            runner_deployment,
            work_pool_name=pool,
            build=False,
            push=False,
            print_next_steps_message=False,
            ignore_warnings=True,
        )
    except ValueError as exc:
        raise UserError(f"deploy: {exc}") from None
    return found
