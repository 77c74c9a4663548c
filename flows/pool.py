"""Running a flow's parts as deployment runs on a work pool: the one place that launches them."""
from __future__ import annotations

import re

from prefect import task

from covseg.errors import ParamsError


def checked_deployment(deployment: str | None, flow: str, who: str) -> str | None:
    """`deployment` if it is a `<flow>/<name>` deployment (or None: run in this process); anything else
    is refused before a run starts."""
    if deployment is not None and not re.fullmatch(rf"{re.escape(flow)}/[A-Za-z0-9_-]+", deployment):
        raise ParamsError(f"deployment {deployment!r} is not allowed: {who} launch {flow}/<name> deployments only")
    return deployment


@task
def launch(deployment: str, parameters: dict) -> str:
    """One deployment run on its pool; waits for it and returns its id (raises if it did not complete)."""
    from prefect.deployments import run_deployment

    run = run_deployment(deployment, parameters=parameters, timeout=None, poll_interval=2)
    if not run.state.is_completed():
        raise RuntimeError(f"flow run {run.name} ({run.id}) ended {run.state.type.value}: {run.state.message}")
    return str(run.id)
