"""The MLflow model registry: one registered model, a version per trained and calibrated model (registered by
`covseg register`), aliases `challenger` / `champion` (never the deprecated stages). What each version is
judged on: covseg.gate; how aliases move: covseg.promotion; what it was trained on: covseg.provenance."""
from __future__ import annotations

import mlflow
from mlflow import MlflowClient

from covseg.errors import CovsegError
from covseg.names import CHAMPION, TAG_DATA_VERSION

FIRST_ONE = "train and register one first (dvc repro, then covseg register)"


def find_version(name: str, run_id: str, match: dict) -> int | None:
    """The newest version of `name` registered from run `run_id` whose tags hold every item of `match`."""
    versions = MlflowClient().search_model_versions(f"name='{name}' and run_id='{run_id}'")
    found = [int(v.version) for v in versions if all(v.tags.get(k) == str(val) for k, val in match.items())]
    return max(found) if found else None


def register(model_uri: str, name: str, tags: dict) -> int:
    """Register the logged model `model_uri` as a new version of `name`; tag it; return the version number."""
    version = int(mlflow.register_model(model_uri, name).version)
    tag(name, version, tags)
    return version


def tag(name: str, version: int, tags: dict) -> None:
    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, str(value))


def aliases(name: str, uri: str | None = None) -> dict[str, int]:
    """alias -> version (search_model_versions does not return aliases; the registered model does)."""
    try:
        return {alias: int(v) for alias, v in MlflowClient(uri).get_registered_model(name).aliases.items()}
    except mlflow.exceptions.MlflowException:
        return {}


def latest_version(name: str) -> int:
    versions = MlflowClient().search_model_versions(f"name='{name}'")
    if not versions:
        raise CovsegError(f"registered model {name!r} has no versions yet: {FIRST_ONE}")
    return max(int(v.version) for v in versions)


def check_version(name: str, version: int, uri: str | None = None) -> int:
    """`version` when `name` has it; else a CovsegError naming the version and what is wrong with it."""
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CovsegError(f"version {version}: must be a version number >= 1")
    client = MlflowClient(uri)
    try:
        client.get_model_version(name, str(version))
    except mlflow.exceptions.MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        numbers = [int(v.version) for v in client.search_model_versions(f"name='{name}'")]
        newest = f"newest: {max(numbers)}" if numbers else f"it has none yet: {FIRST_ONE}"
        raise CovsegError(f"model {name} has no version {version} ({newest})") from None
    return version


def champion_data_version(name: str, uri: str | None = None) -> str:
    """The data version the champion was trained on ('' when there is no champion)."""
    champion = aliases(name, uri).get(CHAMPION)
    if champion is None:
        return ""
    return MlflowClient(uri).get_model_version(name, str(champion)).tags.get(TAG_DATA_VERSION, "")
