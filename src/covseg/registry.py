"""The MLflow model registry: one registered model, a version per training run, aliases
`challenger` / `champion`, and promotion by a metric gate. Aliases, never the deprecated stages."""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import mlflow
from mlflow import MlflowClient

from covseg.errors import CovsegError
from covseg.names import CHALLENGER, CHAMPION, TAG_DATA_VERSION, TAG_PROMOTION
from covseg.params import Evaluate, Registry, Tracking


def register(model_uri: str, run_id: str, name: str, tags: dict) -> int:
    """Register the run's model as a new version (once per run); tag it; return the version number."""
    client = MlflowClient()
    existing = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    version = existing[0].version if existing else mlflow.register_model(model_uri, name).version
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))
    return int(version)


def aliases(name: str, uri: str | None = None) -> dict[str, int]:
    """alias -> version (search_model_versions does not return aliases; the registered model does)."""
    try:
        return {alias: int(v) for alias, v in MlflowClient(uri).get_registered_model(name).aliases.items()}
    except mlflow.exceptions.MlflowException:
        return {}


def latest_version(name: str) -> int:
    versions = MlflowClient().search_model_versions(f"name='{name}'")
    if not versions:
        raise CovsegError(f"registered model {name!r} has no versions yet: train one first (dvc repro)")
    return max(int(v.version) for v in versions)


def champion_data_version(name: str, uri: str | None = None) -> str:
    """The data version the champion was trained on ('' when there is no champion)."""
    champion = aliases(name, uri).get(CHAMPION)
    if champion is None:
        return ""
    return MlflowClient(uri).get_model_version(name, str(champion)).tags.get(TAG_DATA_VERSION, "")


def _record(name: str, version: int, decision: dict) -> None:
    client = MlflowClient()
    client.set_model_version_tag(name, version, TAG_PROMOTION, json.dumps(decision))
    client.update_model_version(name, version, description=decision["reason"])


def promote(name: str, score: Callable[[str], float], margin: float, metric: str,
            version: int | None = None, min_score: float = 0.0, floor: float | None = None) -> dict:
    """Score `version` (default: the newest) and the champion on the same data with `score(model_uri)`;
    the scored version becomes the challenger, and the champion only if it beats the champion by `margin`.
    With no champion yet, a version must reach `min_score` and beat `floor` (the constant predictor's)."""
    client = MlflowClient()
    challenger = version or latest_version(name)
    champion = aliases(name).get(CHAMPION)
    decision = {"challenger": challenger, "champion_before": champion, "metric": metric, "margin": margin,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    decision["challenger_score"] = s = score(f"models:/{name}/{challenger}")
    client.set_registered_model_alias(name, CHALLENGER, challenger)  # only once it has a score
    if champion is None:
        if s < min_score:
            promoted, reason = False, f"no champion yet, and {metric} {s:.4f} is below registry.min_score {min_score}"
        elif floor is not None and s <= floor:
            promoted, reason = False, (f"no champion yet, and {metric} {s:.4f} does not beat the constant "
                                       f"predictor ({floor:.4f})")
        else:
            promoted, reason = True, f"no champion yet; {metric} {s:.4f} passes the floor"
    elif champion == challenger:
        promoted, reason = False, f"version {challenger} is already the champion"
    else:
        decision["champion_score"] = score(f"models:/{name}/{champion}")
        promoted = decision["challenger_score"] >= decision["champion_score"] + margin
        reason = (f"{metric} {decision['challenger_score']:.4f} vs champion v{champion} "
                  f"{decision['champion_score']:.4f}: {'beats' if promoted else 'does not beat'} it by {margin}")
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, challenger)
    decision.update(promoted=promoted, champion_after=challenger if promoted else champion,
                    reason=f"{'promoted' if promoted else 'not promoted'}: {reason}")
    _record(name, challenger, decision)
    return decision


def set_champion(name: str, version: int) -> dict:
    """Promote or roll back by hand: `champion` -> `version`, recorded on the version."""
    before = aliases(name).get(CHAMPION)
    MlflowClient().get_model_version(name, str(version))  # raises if there is no such version
    MlflowClient().set_registered_model_alias(name, CHAMPION, version)
    decision = {"challenger": version, "champion_before": before, "champion_after": version, "promoted": True,
                "reason": f"set by hand: champion v{before} -> v{version}",
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    _record(name, version, decision)
    return decision


def run_promotion(processed: str | Path, reg: Registry, ev: Evaluate, tracking: Tracking, device: str,
                  version: int | None = None, force: bool = False) -> dict:
    """`covseg promote`: the gate on the validation data in `processed`, or (`force` with `version`)
    a promotion or roll-back by hand. Returns the decision."""
    from covseg import tracking as tracking_store
    from covseg.evaluation import score_model, summary_metrics, trivial_score
    from covseg.model import load_model, pick_device
    from covseg.preprocessing import load_processed

    tracking_store.configure(tracking.experiment)
    if force:
        if version is None:
            raise CovsegError("promote --force needs --version N: the version to make champion")
        return set_champion(reg.model_name, version)
    images, labels = load_processed(processed, "val")
    dev = pick_device(device)

    def score(uri: str) -> float:
        model, _ = load_model(uri, dev)
        return summary_metrics(score_model(model, images, labels, ev.batch_size, dev)[1])[reg.promotion_metric]

    return promote(reg.model_name, score, reg.promotion_margin, reg.promotion_metric, version,
                   min_score=reg.min_score, floor=trivial_score(labels, reg.promotion_metric))
