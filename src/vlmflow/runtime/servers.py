"""The servers a run talks to, checked before it starts: a tracking or orchestration server that
does not answer is one clear line now, not minutes of the client libraries' retries and a
traceback at the end (MLflow's client retries a refused connection for about 5 minutes)."""

from __future__ import annotations

import os

import httpx

from vlmflow.errors import UserError

TIMEOUT_S = 10.0


def check_answers(what: str, url: str, setting: str) -> None:
    """Any HTTP answer from `url` will do (an auth-protected server answers 401): only a server
    that cannot be reached, or does not answer within TIMEOUT_S, is an error naming `setting`."""
    try:
        httpx.get(url, timeout=TIMEOUT_S)
    except httpx.HTTPError as exc:
        reason = type(exc).__name__ if not str(exc) else str(exc).splitlines()[0]
        raise UserError(f"{what} at {url} does not answer ({reason}): start it, or set {setting}") from None


def check_servers(mlflow_uri: str) -> None:
    """The MLflow tracking server (an http(s) tracking URI) and the Prefect server
    (PREFECT_API_URL, when set) answer."""
    if mlflow_uri.startswith(("http://", "https://")):
        check_answers(
            "the MLflow tracking server",
            f"{mlflow_uri.rstrip('/')}/health",
            "runtime.mlflow.tracking_uri or MLFLOW_TRACKING_URI to one that does",
        )
    api = os.environ.get("PREFECT_API_URL")
    if api:
        setting = "PREFECT_API_URL to one that does, or unset it"
        check_answers("the Prefect server", f"{api.rstrip('/')}/health", setting)
