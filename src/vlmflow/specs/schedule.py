"""The `schedule:` section: when `vlmflow schedule` (serve) and `vlmflow deploy` (work pool) run
a flow of the recipe. Cron strings and timezones are checked by Prefect's own schedule models, so
a spec that validates is a schedule the Prefect server accepts."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, ValidationError, field_validator, model_validator

from vlmflow.specs.base import Float, StrictModel

FLOWS = ("data-refresh", "recipe")
_DURATION = re.compile(r"^(?:(?P<d>\d+)d)?(?:(?P<h>\d+)h)?(?:(?P<m>\d+)m)?(?:(?P<s>\d+(?:\.\d+)?)s)?$")


def duration_seconds(value: object) -> object:
    """Seconds from a number or a duration string: `90`, `90s`, `15m`, `1h30m`, `1d`."""
    if isinstance(value, bool):
        raise ValueError("expected seconds (a number) or a duration such as 15m, 1h30m, 1d")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        try:
            return float(text)
        except ValueError:
            pass
        match = _DURATION.match(text)
        if text and match:
            parts = {k: float(v) for k, v in match.groupdict().items() if v is not None}
            units = {"d": "days", "h": "hours", "m": "minutes", "s": "seconds"}
            return timedelta(**{units[k]: v for k, v in parts.items()}).total_seconds()
        raise ValueError(f"{value!r} is not a duration: use seconds or e.g. 90s, 15m, 1h30m, 1d")
    return value


def _prefect_error(exc: ValidationError) -> str:
    return "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors(include_url=False))


class ScheduleSpec(StrictModel):
    """Exactly one of `cron` or `interval`; `flow` is the flow the schedule runs."""

    flow: Literal["data-refresh", "recipe"] = Field(
        "data-refresh", description="data-refresh: the data stages, incrementally; recipe: the whole recipe"
    )
    cron: str | None = Field(None, description="a cron string, e.g. '0 3 * * *' (03:00 every day)")
    interval: Annotated[Float | None, BeforeValidator(duration_seconds)] = Field(
        None, ge=1, description="seconds, or a duration such as 15m, 1h30m, 1d"
    )
    timezone: str = Field("UTC", description="IANA timezone of the schedule, e.g. Europe/Paris")
    name: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="deployment name; default: RECIPE-FLOW"
    )

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from prefect.client.schemas.schedules import CronSchedule

        try:
            CronSchedule(cron=value)
        except ValidationError as exc:
            raise ValueError(_prefect_error(exc)) from None
        return value

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        from prefect.client.schemas.schedules import IntervalSchedule

        try:
            IntervalSchedule(interval=timedelta(seconds=60), timezone=value)
        except ValidationError as exc:
            raise ValueError(_prefect_error(exc)) from None
        return value

    @model_validator(mode="after")
    def _one_trigger(self) -> ScheduleSpec:
        if (self.cron is None) == (self.interval is None):
            raise ValueError("give exactly one of cron: (e.g. '0 3 * * *') or interval: (e.g. 1h)")
        return self

    def deployment_name(self, recipe: str) -> str:
        return self.name or f"{recipe}-{self.flow}"

    def describe(self) -> str:
        when = f"cron {self.cron!r}" if self.cron is not None else f"every {self.interval:g} s"
        return f"{self.flow} {when} ({self.timezone})"

    def prefect_schedule(self) -> object:
        """The Prefect schedule object (`prefect.schedules.Cron` or `Interval`)."""
        from prefect.schedules import Cron, Interval

        if self.cron is not None:
            return Cron(self.cron, timezone=self.timezone)
        return Interval(timedelta(seconds=self.interval), timezone=self.timezone)
