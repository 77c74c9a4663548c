"""Promotion: the aliases move by the gate's decision (covseg.gate), compare-and-set under the promotion lock.

The decision is made without the lock; the moves of the aliases and the recorded decision happen under it
(covseg.locks: a Prefect global concurrency limit where a Prefect API is configured, else a file lock beside
the embedded store), after the champion alias is read again: if it moved since, the challenger is compared
again with the new champion (up to `MAX_ROUNDS` times, then nothing changes). So two promotions at once
cannot both win against the same champion, and a worse version never replaces a better one it was not
compared with. Anyone who moves the alias another way (the MLflow UI) is not excluded; the re-check then
catches a move made before it. Before any of this, a version that is not of the form covseg logs is refused
(covseg.modelstore.check_version_form).
"""
from __future__ import annotations

import json
import time

from mlflow import MlflowClient

from covseg import modelstore
from covseg.errors import CovsegError
from covseg.gate import decide, out_of_fold
from covseg.locks import promotion_lock
from covseg.names import CHALLENGER, CHAMPION, TAG_PROMOTION
from covseg.params import Registry, Tracking
from covseg.registry import aliases, check_version, latest_version

MAX_ROUNDS = 5  # times the gate decides again because the champion moved, before it gives up


def _record(name: str, version: int, decision: dict) -> None:
    client = MlflowClient()
    client.set_model_version_tag(name, version, TAG_PROMOTION, json.dumps(decision))
    client.update_model_version(name, version, description=decision["reason"])


def _lock(reg: Registry):
    return promotion_lock(reg.model_name, reg.lock_wait_s, reg.lock_lease_s)


def promote(reg: Registry, version: int | None = None, allow_data_change: bool = False) -> dict:
    """The gate, compare-and-set: refuse `version` (default: the newest) unless it is of covseg's form; compare
    its out-of-fold scores with the champion's (`gate.decide`); under the promotion lock, read the champion
    again and, if it moved meanwhile, decide again against the new one; else the version becomes the
    challenger, and the champion if it beats the champion by the margin (with no champion: reaches
    `min_score` and beats the constant predictor). The decision is recorded on the version and returned."""
    name = reg.model_name
    client = MlflowClient()
    challenger = latest_version(name) if version is None else check_version(name, version)
    modelstore.check_version_form(name, challenger)
    champion = aliases(name).get(CHAMPION)
    seen = []
    for round_ in range(1, MAX_ROUNDS + 1):
        seen.append(champion)
        decision = decide(reg, out_of_fold(name, challenger),
                          None if champion is None else out_of_fold(name, champion), allow_data_change)
        with _lock(reg):
            now = aliases(name).get(CHAMPION)
            if now != champion:  # it moved while we decided: compare with the new one
                champion = now
                continue
            client.set_registered_model_alias(name, CHALLENGER, challenger)  # only once it is judged
            promoted = decision["promoted"]
            if promoted:
                client.set_registered_model_alias(name, CHAMPION, challenger)
            decision.update(champion_after=challenger if promoted else champion, champions_seen=seen,
                            rounds=round_, time=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                            reason=f"{'promoted' if promoted else 'not promoted'}: {decision['reason']}")
            _record(name, challenger, decision)
        return decision
    moves = " -> ".join(f"v{v}" for v in seen)
    raise CovsegError(f"{name}: the champion moved {MAX_ROUNDS} times while v{challenger} was being compared "
                      f"({moves}); nothing changed: run covseg promote again")


def set_champion(reg: Registry, version: int) -> dict:
    """Promote or roll back by hand: `champion` -> `version` (of covseg's form) under the promotion lock,
    recorded on the version."""
    name = reg.model_name
    check_version(name, version)
    modelstore.check_version_form(name, version)
    with _lock(reg):
        before = aliases(name).get(CHAMPION)
        MlflowClient().set_registered_model_alias(name, CHAMPION, version)
        decision = {"challenger": version, "champion_before": before, "champion_after": version, "promoted": True,
                    "reason": f"set by hand: champion v{before} -> v{version}",
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        _record(name, version, decision)
    return decision


def run_promotion(reg: Registry, tracking: Tracking, version: int | None = None, force: bool = False,
                  allow_data_change: bool = False) -> dict:
    """`covseg promote`: the gate on the versions' out-of-fold scores, or (`force` with `version`) a
    promotion or roll-back by hand. Returns the decision."""
    from covseg import tracking as tracking_store

    tracking_store.configure(tracking.experiment)
    if version is not None:  # a wrong --version is one line
        check_version(reg.model_name, version)
    if force:
        if version is None:
            raise CovsegError("promote --force needs --version N: the version to make champion")
        return set_champion(reg, version)
    return promote(reg, version, allow_data_change)
