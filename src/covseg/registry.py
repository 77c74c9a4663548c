"""The MLflow model registry: one registered model, a version per training run, aliases
`challenger` / `champion`, and promotion by a metric gate. Aliases, never the deprecated stages.

Provenance: each version registered by the evaluate stage is tagged with the data version it was trained
on and the ids of its training slices (inline when short, else the run artifact `training_slices.json`;
their sha256 and count always), so that the gate scores only validation slices neither model saw.

Promotion is compare-and-set. Scoring runs without a lock; the moves of the aliases and the recorded
decision happen under a lease on the registered model (`PromotionLock`), after the champion alias is
read again: if it moved since scoring, both versions are scored again against the new champion (up to
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
import os
import random
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from mlflow import MlflowClient

from covseg.errors import CovsegError
from covseg.names import (
    CHALLENGER,
    CHAMPION,
    PATHS,
    TAG_DATA_VERSION,
    TAG_PROMOTION,
    TAG_PROMOTION_LOCK,
    TAG_TRAIN_SLICES,
    TAG_TRAIN_SLICES_COUNT,
    TAG_TRAIN_SLICES_SHA256,
    TRAINING_SLICES_FILE,
)
from covseg.params import Evaluate, Registry, Tracking

INLINE_IDS_MAX_CHARS = 1000  # longer lists of training slice ids go to the run artifact
MAX_ROUNDS = 5  # times the gate scores again because the champion moved, before it gives up


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


@dataclass(frozen=True)
class Provenance:
    version: int
    data_version: str  # '' when unknown
    train_slice_ids: frozenset[int] | None  # None when the version has no recorded training slices

    @property
    def known(self) -> bool:
        return bool(self.data_version) and self.train_slice_ids is not None


def provenance(name: str, version: int) -> Provenance:
    """What `version` was trained on, read back from its tags (or its run's artifact) and checked
    against the recorded sha256 and count."""
    mv = MlflowClient().get_model_version(name, str(version))
    tags, where = mv.tags, f"{name} v{version}"
    if TAG_TRAIN_SLICES_SHA256 not in tags:
        return Provenance(int(version), tags.get(TAG_DATA_VERSION, ""), None)
    try:
        if TAG_TRAIN_SLICES in tags:
            ids = [int(i) for i in tags[TAG_TRAIN_SLICES].split(",") if i]
            where += f" tag {TAG_TRAIN_SLICES}"
        else:
            where += f" run {mv.run_id} artifact {TRAINING_SLICES_FILE}"
            ids = [int(i) for i in mlflow.artifacts.load_dict(f"runs:/{mv.run_id}/{TRAINING_SLICES_FILE}")
                   ["train_slice_ids"]]
    except (ValueError, TypeError, KeyError, OSError, mlflow.exceptions.MlflowException) as exc:
        raise CovsegError(f"{where}: training slice ids are unreadable ({exc})") from None
    if slices_digest(ids) != tags[TAG_TRAIN_SLICES_SHA256] or str(len(ids)) != tags.get(TAG_TRAIN_SLICES_COUNT):
        raise CovsegError(f"{where}: the {len(ids)} training slice ids do not match the recorded "
                          f"{TAG_TRAIN_SLICES_SHA256} / {TAG_TRAIN_SLICES_COUNT} tags: provenance was tampered with")
    return Provenance(int(version), tags.get(TAG_DATA_VERSION, ""), frozenset(ids))


def eval_plan(name: str, val_slice_ids: list[int], challenger: Provenance, champion: Provenance | None,
              eval_data_version: str, min_eval_slices: int, allow_data_change: bool) -> dict:
    """The validation slices to score on: those of `val_slice_ids` neither version was trained on.
    Refuses (CovsegError) when a version has no provenance or the data versions differ (unless
    `allow_data_change`), and when fewer than `min_eval_slices` slices remain."""
    versions = [p for p in (challenger, champion) if p is not None]
    missing = [p.version for p in versions if not p.known]
    data = {f"v{p.version}": p.data_version for p in versions}
    if eval_data_version:  # the workspace's data.dvc, when there is one
        data["validation data"] = eval_data_version
    changed = len(set(data.values())) > 1
    if missing and not allow_data_change:
        which = ", ".join(f"v{v}" for v in missing)
        raise CovsegError(f"{name} {which}: no training provenance (data version and training slice ids; "
                          f"registered before covseg recorded them), so the gate cannot tell which validation "
                          f"slices it saw; pass --allow-data-change to score it on the slices the other version "
                          f"did not see")
    if changed and not allow_data_change:
        listed = ", ".join(f"{k} {v or 'unknown'}" for k, v in data.items())
        raise CovsegError(f"{name}: the data versions differ ({listed}): slice ids may not name the same "
                          f"slices; pass --allow-data-change to compare anyway")
    seen = set().union(*(p.train_slice_ids for p in versions if p.train_slice_ids is not None))
    eval_ids = [int(i) for i in val_slice_ids if int(i) not in seen]
    if len(eval_ids) < min_eval_slices:
        trained = ", ".join(f"v{p.version} on {len(p.train_slice_ids) if p.train_slice_ids is not None else '?'}"
                            for p in versions)
        raise CovsegError(
            f"{name}: only {len(eval_ids)} of the {len(val_slice_ids)} validation slices were seen by "
            f"neither version (trained: {trained} slices), fewer than registry.min_eval_slices "
            f"{min_eval_slices}: not scored, nothing changed. Preprocess with a split.fold whose slices "
            f"neither version trained on, or lower registry.min_eval_slices")
    return {"eval_slice_ids": eval_ids, "excluded_slice_ids": sorted(set(map(int, val_slice_ids)) & seen),
            "data_versions": data, "data_changed": changed, "provenance_missing": missing,
            "allow_data_change": allow_data_change}


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


@dataclass
class Scorer:
    """What the gate scores with: the validation slices on offer, `score(model_uri, slice_ids)` -> the
    promotion metric on those slices, and `floor(slice_ids)` -> the constant predictor's (or None)."""
    slice_ids: list[int]
    score: Callable[[str, list[int]], float]
    floor: Callable[[list[int]], float | None] = field(default=lambda ids: None)


def _record(name: str, version: int, decision: dict) -> None:
    client = MlflowClient()
    client.set_model_version_tag(name, version, TAG_PROMOTION, json.dumps(decision))
    client.update_model_version(name, version, description=decision["reason"])


def _decide(reg: Registry, challenger: int, champion: int | None, s: float, champion_score: float | None,
            floor: float | None) -> tuple[bool, str]:
    metric, margin = reg.promotion_metric, reg.promotion_margin
    if champion is None:
        if s < reg.min_score:
            return False, f"no champion yet, and {metric} {s:.4f} is below registry.min_score {reg.min_score}"
        if floor is not None and s <= floor:
            return False, f"no champion yet, and {metric} {s:.4f} does not beat the constant predictor ({floor:.4f})"
        return True, f"no champion yet; {metric} {s:.4f} passes the floor"
    if champion == challenger:
        return False, f"version {challenger} is already the champion"
    promoted = s >= champion_score + margin
    return promoted, (f"{metric} {s:.4f} vs champion v{champion} {champion_score:.4f}: "
                      f"{'beats' if promoted else 'does not beat'} it by {margin}")


def promote(reg: Registry, scorer: Scorer, version: int | None = None, allow_data_change: bool = False,
            eval_data_version: str = "") -> dict:
    """The gate, compare-and-set: score `version` (default: the newest) and the champion on the
    validation slices neither was trained on (`eval_plan`); under the promotion lock, read the champion
    again and, if it moved meanwhile, score again against the new one; else the scored version becomes
    the challenger, and the champion if it beats the champion by the margin (with no champion: reaches
    `min_score` and beats the constant predictor). The decision is recorded on the version and returned."""
    name = reg.model_name
    client = MlflowClient()
    challenger = latest_version(name) if version is None else check_version(name, version)
    challenger_prov = provenance(name, challenger)
    lock = lock_for(reg)
    cache: dict[tuple, float] = {}

    def score(v: int, ids: list[int]) -> float:
        if (v, tuple(ids)) not in cache:
            cache[(v, tuple(ids))] = float(scorer.score(f"models:/{name}/{v}", ids))
        return cache[(v, tuple(ids))]

    champion = aliases(name).get(CHAMPION)
    seen = []
    for round_ in range(1, MAX_ROUNDS + 1):
        seen.append(champion)
        champion_prov = provenance(name, champion) if champion not in (None, challenger) else None
        plan = eval_plan(name, scorer.slice_ids, challenger_prov, champion_prov, eval_data_version,
                         reg.min_eval_slices, allow_data_change)
        ids = plan["eval_slice_ids"]
        decision = {"challenger": challenger, "champion_before": champion, "metric": reg.promotion_metric,
                    "margin": reg.promotion_margin, **plan, "challenger_score": score(challenger, ids)}
        if champion_prov is not None:
            decision["champion_score"] = score(champion, ids)
        promoted, reason = _decide(reg, challenger, champion, decision["challenger_score"],
                                   decision.get("champion_score"), scorer.floor(ids) if champion is None else None)
        with lock:
            now = aliases(name).get(CHAMPION)
            if now != champion:  # it moved while we scored: compare with the new one
                champion = now
                continue
            try:
                lock.confirm()
            except LockLost:  # overwritten by a slow writer, or expired: take it again
                continue
            client.set_registered_model_alias(name, CHALLENGER, challenger)  # only once it has a score
            if promoted:
                client.set_registered_model_alias(name, CHAMPION, challenger)
            decision.update(promoted=promoted, champion_after=challenger if promoted else champion,
                            champions_seen=seen, rounds=round_, time=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                            reason=f"{'promoted' if promoted else 'not promoted'}: {reason}")
            _record(name, challenger, decision)
        return decision
    moves = " -> ".join(f"v{v}" for v in seen)
    raise CovsegError(f"{name}: the champion moved {MAX_ROUNDS} times while v{challenger} was being scored "
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


def run_promotion(processed: str | Path, reg: Registry, ev: Evaluate, tracking: Tracking, device: str,
                  version: int | None = None, force: bool = False, allow_data_change: bool = False) -> dict:
    """`covseg promote`: the gate on the validation slices of `processed` that neither version was
    trained on, or (`force` with `version`) a promotion or roll-back by hand. Returns the decision."""
    from covseg import tracking as tracking_store
    from covseg.data import data_version
    from covseg.evaluation import score_model, summary_metrics, trivial_score
    from covseg.model import load_model, pick_device
    from covseg.preprocessing import load_processed, load_split

    tracking_store.configure(tracking.experiment)
    if version is not None:  # before anything is loaded: a wrong --version is one line
        check_version(reg.model_name, version)
    if force:
        if version is None:
            raise CovsegError("promote --force needs --version N: the version to make champion")
        return set_champion(reg, version)
    images, labels = load_processed(processed, "val")
    val_ids = [int(i) for i in load_split(processed)["val_slice_ids"]]
    if len(val_ids) != len(labels) or len(set(val_ids)) != len(val_ids):
        raise CovsegError(f"{Path(processed) / 'split.json'}: val_slice_ids lists {len(val_ids)} ids "
                          f"({len(set(val_ids))} distinct) for {len(labels)} validation slices")
    row = {sid: i for i, sid in enumerate(val_ids)}
    dev = pick_device(device)

    def score(uri: str, ids: list[int]) -> float:
        rows = [row[i] for i in ids]
        model, _ = load_model(uri, dev)
        cm = score_model(model, images[rows], labels[rows], ev.batch_size, dev)[1]
        return summary_metrics(cm)[reg.promotion_metric]

    def floor(ids: list[int]) -> float:
        return trivial_score(labels[[row[i] for i in ids]], reg.promotion_metric)

    return promote(reg, Scorer(val_ids, score, floor), version, allow_data_change,
                   eval_data_version=data_version(Path(PATHS.dvc_file)))
