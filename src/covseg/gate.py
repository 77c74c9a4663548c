"""The promotion gate's decision, from out-of-fold scores. No model is loaded or scored here.

The shipped model trains on every labelled slice, so no slice is left on which it could be scored fairly; a
recipe's quality is instead its out-of-fold scores from cross-validation, measured by nested CV (`covseg cv`,
`covseg calibrate`, calibration.json), which `covseg register` tags on each version (`calibrated`,
`oof_<metric>`, `oof_slices`, `oof_folds`, `oof_trivial_kaggle_f1`). A version without them (no calibration
for its recipe and data) is refused, naming the commands that make one; so is one whose scores come from
fewer than `min_eval_slices` out-of-fold slices. With no champion, a version must reach `min_score` and its
out-of-fold kaggle_f1 must beat the constant predictor's on the same slices; else it must beat the
champion's out-of-fold score by `promotion_margin`. Scores measured on other data are not comparable:
versions whose `data_version` tags differ (or are unknown) are compared only with `allow_data_change`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from mlflow import MlflowClient

from covseg.errors import CovsegError
from covseg.names import (
    HEADLINE_METRICS,
    KAGGLE_F1,
    OOF_PREFIX,
    TAG_CALIBRATED,
    TAG_DATA_VERSION,
    TAG_OOF_FOLDS,
    TAG_OOF_SLICES,
    TAG_OOF_TRIVIAL,
    TAG_RECIPE_KEY,
)
from covseg.params import Registry


@dataclass(frozen=True)
class OutOfFold:
    """A version's out-of-fold scores, as `covseg register` tagged them (what the gate compares)."""
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
                              f"run `dvc repro`, then `covseg register` (it tags the version again)")
        return int(value) if whole else value

    return OutOfFold(int(version), tags.get(TAG_CALIBRATED) == "true", tags.get(TAG_RECIPE_KEY, ""),
                     tags.get(TAG_DATA_VERSION, ""),
                     {m: s for m in HEADLINE_METRICS if (s := number(f"{OOF_PREFIX}{m}")) is not None},
                     number(TAG_OOF_SLICES, True), number(TAG_OOF_FOLDS, True), number(TAG_OOF_TRIVIAL))


def check_challenger(reg: Registry, mine: OutOfFold) -> None:
    """Refuse (CovsegError) a challenger the gate cannot judge: no out-of-fold scores, or too few slices."""
    name, v = reg.model_name, mine.version
    missing = mine.missing((reg.promotion_metric, KAGGLE_F1))
    if not mine.calibrated or missing:
        what = (f"is not calibrated (recipe key {mine.recipe_key or 'unknown'})" if not mine.calibrated
                else f"lacks the tags {', '.join(missing)}")
        raise CovsegError(f"{name} v{v} {what}: it has no out-of-fold scores to compare, so the gate refuses it; "
                          f"nothing changed. Run `covseg cv` and `covseg calibrate` for its recipe, commit "
                          f"calibration.json, then `dvc repro` and `covseg register` (it tags the version again)")
    if mine.slices < reg.min_eval_slices:
        raise CovsegError(f"{name} v{v}: its out-of-fold scores come from {mine.slices} slices, fewer than "
                          f"registry.min_eval_slices {reg.min_eval_slices}: not compared, nothing changed. "
                          f"Cross-validate and calibrate on more labelled slices, or lower registry.min_eval_slices")


def decide(reg: Registry, mine: OutOfFold, theirs: OutOfFold | None, allow_data_change: bool) -> dict:
    """The decision on challenger `mine` against champion `theirs` (None: no champion), from their out-of-fold
    scores: {promoted, reason, the scores, slices and data versions}. Refuses (CovsegError) a challenger or a
    champion the gate cannot judge, and versions of other data unless `allow_data_change`."""
    name, metric, margin = reg.model_name, reg.promotion_metric, reg.promotion_margin
    check_challenger(reg, mine)
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
