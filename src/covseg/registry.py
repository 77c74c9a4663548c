"""The MLflow model registry: one registered model, a version per trained (and calibrated) model, aliases
`challenger` / `champion`, and promotion by a metric gate. Aliases, never the deprecated stages.

The gate compares out-of-fold scores. The shipped model trains on every labelled slice, so no slice is
left on which it could be scored fairly; a recipe's quality is instead its out-of-fold scores from
cross-validation, measured by nested CV (`covseg cv`, `covseg calibrate`, calibration.json), which the
evaluate stage tags on each version it registers (`calibrated`, `oof_<metric>`, `oof_slices`,
`oof_folds`, `oof_trivial_kaggle_f1`). No model is loaded or scored here. A version without them (no
calibration for its recipe and data) is refused, naming the commands that make one; so is one whose
scores come from fewer than `min_eval_slices` out-of-fold slices. With no champion, a version must
reach `min_score` and its out-of-fold kaggle_f1 must beat the constant predictor's on the same slices;
else it must beat the champion's out-of-fold score by `promotion_margin`. Scores measured on other data
are not comparable: versions whose `data_version` tags differ (or are unknown) are compared only with
`allow_data_change`.

Provenance: each version registered by the evaluate stage is also tagged with the data version it was
trained on and the ids of its training slices (inline when short, else the run artifact
`training_slices.json`; their sha256 and count always); the gate reads the data version.

Promotion is compare-and-set. The decision is made without a lock; the moves of the aliases and the
recorded decision happen under a lease on the registered model (`PromotionLock`), after the champion
alias is read again: if it moved since, the challenger is compared again with the new champion (up to
`MAX_ROUNDS` times, then the gate gives up and changes nothing). Guarantee: among promotions that all
go through this module, each decision compares the challenger with the version that is champion when
the alias moves, so two promotions at once cannot both win against the same champion and a worse
version never replaces a better one it was not compared with. Limits: MLflow has no transactions, so the
lease is Fischer's timed mutual exclusion on a tag (write, wait `lock_settle_s`, read back): it holds
while a registry write lands within `lock_settle_s / 2` of the read before it (a slower writer backs
off and leaves its late tag to expire, and the holder reads the lease again just before it moves
`champion`), and while the machines' clocks agree to well within `lock_lease_s`. Anyone who moves the
alias another way (the MLflow UI, an older covseg) is not excluded; the re-check then catches a move
made before it, not one in the last instant.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import socket
import time
import uuid
from dataclasses import dataclass

import mlflow
from mlflow import MlflowClient

from covseg.errors import CovsegError
from covseg.names import (
    CHALLENGER,
    CHAMPION,
    HEADLINE_METRICS,
    KAGGLE_F1,
    OOF_PREFIX,
    TAG_CALIBRATED,
    TAG_DATA_VERSION,
    TAG_OOF_FOLDS,
    TAG_OOF_SLICES,
    TAG_OOF_TRIVIAL,
    TAG_PROMOTION,
    TAG_PROMOTION_LOCK,
    TAG_RECIPE_KEY,
    TAG_TRAIN_SLICES,
    TAG_TRAIN_SLICES_COUNT,
    TAG_TRAIN_SLICES_SHA256,
    TRAINING_SLICES_FILE,
)
from covseg.params import Registry, Tracking

INLINE_IDS_MAX_CHARS = 1000  # longer lists of training slice ids go to the run artifact
MAX_ROUNDS = 5  # times the gate decides again because the champion moved, before it gives up


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
        raise CovsegError(f"registered model {name!r} has no versions yet: train one first (dvc repro)")
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
        newest = f"newest: {max(numbers)}" if numbers else "it has none yet: train one first (dvc repro)"
        raise CovsegError(f"model {name} has no version {version} ({newest})") from None
    return version


def champion_data_version(name: str, uri: str | None = None) -> str:
    """The data version the champion was trained on ('' when there is no champion)."""
    champion = aliases(name, uri).get(CHAMPION)
    if champion is None:
        return ""
    return MlflowClient(uri).get_model_version(name, str(champion)).tags.get(TAG_DATA_VERSION, "")


# ----------------------------------------------------------------------------- provenance


def slices_digest(ids) -> str:
    """sha256 of the sorted slice ids (as the JSON list `[1,2,3]`)."""
    return hashlib.sha256(json.dumps(sorted(int(i) for i in ids), separators=(",", ":")).encode()).hexdigest()


def record_provenance(name: str, version: int, run_id: str, data_version: str, train_slice_ids) -> dict:
    """Tag `version` with what it was trained on: the data version, the training slice ids (inline when
    short, else the run artifact TRAINING_SLICES_FILE), their sha256 and count. Returns the tags."""
    client = MlflowClient()
    ids = sorted(int(i) for i in train_slice_ids)
    text = ",".join(map(str, ids))
    tags = {TAG_DATA_VERSION: data_version, TAG_TRAIN_SLICES_SHA256: slices_digest(ids),
            TAG_TRAIN_SLICES_COUNT: str(len(ids))}
    if len(text) <= INLINE_IDS_MAX_CHARS:
        tags[TAG_TRAIN_SLICES] = text
    else:
        client.log_dict(run_id, {"data_version": data_version, "train_slice_ids": ids}, TRAINING_SLICES_FILE)
        if TAG_TRAIN_SLICES in client.get_model_version(name, str(version)).tags:
            client.delete_model_version_tag(name, str(version), TAG_TRAIN_SLICES)
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, value)
    return tags


# ----------------------------------------------------------------------------- the lease


class PromotionLock:
    """A lease on the registered model, held in its tag TAG_PROMOTION_LOCK: {token, owner, expires}.

    Taken as Fischer's timed mutual exclusion: read it free (absent, expired or ours), write ours, wait
    `settle_s`, read it back; ours only if the write landed within `settle_s / 2` of the read and the tag
    still holds our token. `confirm()` reads it again just before a critical write. Retries with jitter
    until `wait_s`, then a CovsegError naming the holder. See the module docstring for its limits.
    """

    def __init__(self, name: str, lease_s: float, wait_s: float, settle_s: float):
        self.name, self.lease_s, self.wait_s, self.settle_s = name, lease_s, wait_s, settle_s
        self.token = uuid.uuid4().hex
        self.owner = f"{socket.gethostname()} pid {os.getpid()}"
        self.client = MlflowClient()

    def _read(self) -> dict | None:
        raw = self.client.get_registered_model(self.name).tags.get(TAG_PROMOTION_LOCK)
        if raw is None:
            return None
        try:
            held = json.loads(raw)
            return held if isinstance(held, dict) else {"expires": 0}
        except ValueError:
            return {"expires": 0}  # unreadable: treated as expired

    def _free(self, held: dict | None) -> bool:
        return held is None or held.get("token") == self.token or float(held.get("expires", 0)) < time.time()

    def acquire(self) -> None:
        deadline = time.monotonic() + self.wait_s
        while True:
            start = time.monotonic()
            held = self._read()
            if self._free(held):
                self.client.set_registered_model_tag(self.name, TAG_PROMOTION_LOCK, json.dumps(
                    {"token": self.token, "owner": self.owner, "expires": time.time() + self.lease_s}))
                if time.monotonic() - start < self.settle_s / 2:  # else another may have read it free too
                    time.sleep(self.settle_s)
                    held = self._read()
                    if held is not None and held.get("token") == self.token:
                        return
                else:  # the late write may sit on another's lease: it stays held by no one until it expires
                    self.token = uuid.uuid4().hex
            if time.monotonic() > deadline:
                raise CovsegError(f"{self.name}: could not take the promotion lock (tag {TAG_PROMOTION_LOCK}) "
                                  f"within registry.lock_wait_s {self.wait_s}s: held by "
                                  f"{(held or {}).get('owner', 'unknown')}; nothing changed")
            time.sleep(self.settle_s * (0.5 + random.random()))

    def confirm(self) -> None:
        """Raise unless the lease is still ours with at least `settle_s` to run."""
        held = self._read()
        ours = held is not None and held.get("token") == self.token
        if not ours or float(held.get("expires", 0)) < time.time() + self.settle_s:
            raise LockLost(f"{self.name}: the promotion lock was lost (now {held}); nothing moved")

    def release(self) -> None:
        held = self._read()
        if held is not None and held.get("token") == self.token:
            self.client.delete_registered_model_tag(self.name, TAG_PROMOTION_LOCK)

    def __enter__(self) -> PromotionLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class LockLost(CovsegError):
    """The lease expired or was overwritten before a critical write."""


def lock_for(reg: Registry) -> PromotionLock:
    return PromotionLock(reg.model_name, reg.lock_lease_s, reg.lock_wait_s, reg.lock_settle_s)


# ----------------------------------------------------------------------------- the gate


@dataclass(frozen=True)
class OutOfFold:
    """A version's out-of-fold scores, as the evaluate stage tagged them (what the gate compares)."""
    version: int
    calibrated: bool
    recipe_key: str  # '' when untagged
    data_version: str  # '' when unknown
    scores: dict[str, float]  # headline metric -> out-of-fold score, for those tagged
    slices: int | None  # the out-of-fold slices the scores come from
    folds: int | None
    trivial: float | None  # the constant predictor's kaggle_f1 on those slices

    def missing(self, metrics) -> list[str]:
        """The tags a challenger needs to be judged on `metrics` (and the floor) that this one lacks."""
        need = {f"{OOF_PREFIX}{m}": self.scores.get(m) for m in dict.fromkeys(metrics)}
        need.update({TAG_OOF_SLICES: self.slices, TAG_OOF_TRIVIAL: self.trivial})
        return [tag for tag, value in need.items() if value is None]


def out_of_fold(name: str, version: int) -> OutOfFold:
    """The out-of-fold scores tagged on `version` (a tag that is not a number is a CovsegError)."""
    tags = MlflowClient().get_model_version(name, str(version)).tags

    def number(tag: str, whole: bool = False):
        raw = tags.get(tag)
        if raw is None:
            return None
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < 0 or (whole and not value.is_integer()):
            raise CovsegError(f"{name} v{version}: tag {tag} is {raw!r}, not {'a count' if whole else 'a score'}; "
                              f"run `dvc repro` (evaluate tags the version again)")
        return int(value) if whole else value

    return OutOfFold(int(version), tags.get(TAG_CALIBRATED) == "true", tags.get(TAG_RECIPE_KEY, ""),
                     tags.get(TAG_DATA_VERSION, ""),
                     {m: s for m in HEADLINE_METRICS if (s := number(f"{OOF_PREFIX}{m}")) is not None},
                     number(TAG_OOF_SLICES, True), number(TAG_OOF_FOLDS, True), number(TAG_OOF_TRIVIAL))


def _check_challenger(reg: Registry, mine: OutOfFold) -> None:
    """Refuse (CovsegError) a challenger the gate cannot judge: no out-of-fold scores, or too few slices."""
    name, v = reg.model_name, mine.version
    missing = mine.missing((reg.promotion_metric, KAGGLE_F1))
    if not mine.calibrated or missing:
        what = (f"is not calibrated (recipe key {mine.recipe_key or 'unknown'})" if not mine.calibrated
                else f"lacks the tags {', '.join(missing)}")
        raise CovsegError(f"{name} v{v} {what}: it has no out-of-fold scores to compare, so the gate refuses it; "
                          f"nothing changed. Run `covseg cv` and `covseg calibrate` for its recipe, commit "
                          f"calibration.json, then `dvc repro` (evaluate tags the version again)")
    if mine.slices < reg.min_eval_slices:
        raise CovsegError(f"{name} v{v}: its out-of-fold scores come from {mine.slices} slices, fewer than "
                          f"registry.min_eval_slices {reg.min_eval_slices}: not compared, nothing changed. "
                          f"Cross-validate and calibrate on more labelled slices, or lower registry.min_eval_slices")


def _decide(reg: Registry, mine: OutOfFold, theirs: OutOfFold | None, allow_data_change: bool) -> dict:
    """The decision on challenger `mine` against champion `theirs` (None: no champion), from their out-of-fold
    scores: {promoted, reason, the scores, slices and data versions}. Refuses (CovsegError) a challenger or a
    champion the gate cannot judge, and versions of other data unless `allow_data_change`."""
    name, metric, margin = reg.model_name, reg.promotion_metric, reg.promotion_margin
    _check_challenger(reg, mine)
    s = mine.scores[metric]
    decision = {"challenger": mine.version, "champion_before": None if theirs is None else theirs.version,
                "metric": metric, "margin": margin, "challenger_score": s, "challenger_oof_slices": mine.slices,
                "challenger_oof_folds": mine.folds, "challenger_recipe_key": mine.recipe_key,
                "data_versions": {f"v{mine.version}": mine.data_version}}
    if theirs is None:
        f1, floor = mine.scores[KAGGLE_F1], mine.trivial
        decision.update(min_score=reg.min_score, challenger_kaggle_f1=f1, floor=floor)
        if s < reg.min_score:
            reason = f"no champion yet, and out-of-fold {metric} {s:.4f} is below registry.min_score {reg.min_score}"
        elif f1 <= floor:
            reason = (f"no champion yet, and out-of-fold {KAGGLE_F1} {f1:.4f} does not beat the constant "
                      f"predictor's ({floor:.4f})")
        else:
            return {**decision, "promoted": True,
                    "reason": f"no champion yet; out-of-fold {metric} {s:.4f} reaches registry.min_score "
                              f"{reg.min_score} and {KAGGLE_F1} {f1:.4f} beats the constant predictor's ({floor:.4f})"}
        return {**decision, "promoted": False, "reason": reason}
    if theirs.version == mine.version:
        return {**decision, "promoted": False, "reason": f"version {mine.version} is already the champion"}
    if not theirs.calibrated or metric not in theirs.scores:
        raise CovsegError(f"{name}: champion v{theirs.version} has no out-of-fold {metric} (not calibrated, or "
                          f"registered before the gate compared out-of-fold scores), so v{mine.version} cannot be "
                          f"compared with it; nothing changed. Calibrate and register its recipe again, or set a "
                          f"champion by hand: `covseg promote --force --version N`")
    data = {f"v{mine.version}": mine.data_version, f"v{theirs.version}": theirs.data_version}
    known = all(data.values())
    changed = not known or mine.data_version != theirs.data_version
    if changed and not allow_data_change:
        listed = ", ".join(f"{k} {v or 'unknown'}" for k, v in data.items())
        raise CovsegError(f"{name}: the data versions {'differ' if known else 'are not known to match'} ({listed}): "
                          f"out-of-fold scores measured on other data are not comparable; nothing changed. Pass "
                          f"--allow-data-change to compare anyway")
    c = theirs.scores[metric]
    promoted = s >= c + margin
    return {**decision, "champion_score": c, "champion_oof_slices": theirs.slices, "champion_oof_folds": theirs.folds,
            "champion_recipe_key": theirs.recipe_key, "data_versions": data, "data_changed": changed,
            "allow_data_change": allow_data_change, "promoted": promoted,
            "reason": f"out-of-fold {metric} {s:.4f} vs champion v{theirs.version} {c:.4f}: "
                      f"{'beats' if promoted else 'does not beat'} it by {margin}"}


def _record(name: str, version: int, decision: dict) -> None:
    client = MlflowClient()
    client.set_model_version_tag(name, version, TAG_PROMOTION, json.dumps(decision))
    client.update_model_version(name, version, description=decision["reason"])


def promote(reg: Registry, version: int | None = None, allow_data_change: bool = False) -> dict:
    """The gate, compare-and-set: compare the out-of-fold scores tagged on `version` (default: the newest)
    with the champion's (`_decide`); under the promotion lock, read the champion again and, if it moved
    meanwhile, decide again against the new one; else the version becomes the challenger, and the champion
    if it beats the champion by the margin (with no champion: reaches `min_score` and beats the constant
    predictor). The decision is recorded on the version and returned. No model is loaded."""
    name = reg.model_name
    client = MlflowClient()
    challenger = latest_version(name) if version is None else check_version(name, version)
    lock = lock_for(reg)
    champion = aliases(name).get(CHAMPION)
    seen = []
    for round_ in range(1, MAX_ROUNDS + 1):
        seen.append(champion)
        decision = _decide(reg, out_of_fold(name, challenger),
                           None if champion is None else out_of_fold(name, champion), allow_data_change)
        with lock:
            now = aliases(name).get(CHAMPION)
            if now != champion:  # it moved while we decided: compare with the new one
                champion = now
                continue
            try:
                lock.confirm()
            except LockLost:  # overwritten by a slow writer, or expired: take it again
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
                      f"({moves}), or the promotion lock was lost; nothing changed: run covseg promote again")


def set_champion(reg: Registry, version: int) -> dict:
    """Promote or roll back by hand: `champion` -> `version` under the promotion lock, recorded on the version."""
    name = reg.model_name
    check_version(name, version)
    with lock_for(reg) as lock:
        before = aliases(name).get(CHAMPION)
        lock.confirm()
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
