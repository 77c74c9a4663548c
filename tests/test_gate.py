"""The promotion gate's decision (covseg.gate.decide), on out-of-fold scores as `covseg register` tags them: no
MLflow, no model. tests/test_promotion.py has the gate against a registry: tags read, aliases moved, decisions
recorded, the lock."""
import pytest

from covseg.errors import CovsegError
from covseg.gate import OutOfFold, decide
from covseg.names import HEADLINE_METRICS


@pytest.fixture
def reg(params):
    return params.override({"registry.min_eval_slices": 3, "registry.min_score": 0.1}).registry


def oof(version, score=None, slices=10, trivial=0.05, data="md5-a", calibrated=True, **scores) -> OutOfFold:
    """A version's out-of-fold scores: `score` on every headline metric (but `scores`), or none at all."""
    tagged = {} if score is None else {**{m: score for m in HEADLINE_METRICS}, **scores}
    return OutOfFold(version, calibrated, f"key{version}" if calibrated else "", data, tagged,
                     slices if calibrated else None, 5 if calibrated else None, trivial if calibrated else None)


def test_an_uncalibrated_challenger_is_refused_naming_the_commands(reg):
    with pytest.raises(CovsegError, match=r"^covseg-unet v1 is not calibrated \(recipe key unknown\): it has no "
                                          r"out-of-fold scores.*nothing changed\. Run `covseg cv` and `covseg "
                                          r"calibrate` for its recipe, commit calibration\.json, then `dvc repro` "
                                          r"and `covseg register` \(it tags the version again\)$"):
        decide(reg, oof(1, calibrated=False), None, False)
    lacking = OutOfFold(3, True, "key3", "md5-a", {"dice_ggo": 0.6}, 10, 5, 0.05)
    with pytest.raises(CovsegError, match=r"^covseg-unet v3 lacks the tags oof_kaggle_f1: .*`covseg calibrate`"):
        decide(reg, lacking, None, False)


def test_scores_from_too_few_out_of_fold_slices_are_refused(reg):
    with pytest.raises(CovsegError, match=r"^covseg-unet v2: its out-of-fold scores come from 2 slices, fewer than "
                                          r"registry.min_eval_slices 3: not compared, nothing changed"):
        decide(reg, oof(2, 0.9, slices=2), oof(1, 0.5), False)
    assert decide(reg, oof(2, 0.9, slices=3), oof(1, 0.5), False)["promoted"]


def test_a_champion_without_out_of_fold_scores_is_refused_naming_force(reg):
    with pytest.raises(CovsegError, match=r"^covseg-unet: champion v1 has no out-of-fold kaggle_f1 .* so v2 cannot "
                                          r"be compared with it; nothing changed\..*`covseg promote --force "
                                          r"--version N`$"):
        decide(reg, oof(2, 0.9), oof(1, calibrated=False), False)


def test_other_data_versions_are_refused_unless_allowed(reg):
    champion = oof(1, 0.5, data="md5-a")
    with pytest.raises(CovsegError, match=r"^covseg-unet: the data versions differ \(v2 md5-b, v1 md5-a\): "
                                          r"out-of-fold scores measured on other data are not comparable; nothing "
                                          r"changed\. Pass --allow-data-change"):
        decide(reg, oof(2, 0.9, data="md5-b"), champion, False)
    with pytest.raises(CovsegError, match=r"data versions are not known to match \(v3 unknown, v1 md5-a\)"):
        decide(reg, oof(3, 0.9, data=""), champion, False)  # no data.dvc where it was trained
    decision = decide(reg, oof(2, 0.9, data="md5-b"), champion, True)
    assert decision["promoted"] and decision["data_changed"] and decision["allow_data_change"]
    assert decision["data_versions"] == {"v2": "md5-b", "v1": "md5-a"}
    same = decide(reg, oof(2, 0.9), champion, False)
    assert same["data_changed"] is False and same["data_versions"] == {"v2": "md5-a", "v1": "md5-a"}


def test_a_first_champion_must_reach_min_score_and_beat_the_constant_predictor(reg):
    weak = decide(reg, oof(1, 0.08), None, False)
    assert weak["promoted"] is False
    assert weak["reason"] == "no champion yet, and out-of-fold kaggle_f1 0.0800 is below registry.min_score 0.1"
    trivial = decide(reg, oof(2, 0.3, trivial=0.3), None, False)
    assert trivial["promoted"] is False and "does not beat the constant predictor's (0.3000)" in trivial["reason"]
    first = decide(reg, oof(3, 0.35, trivial=0.3), None, False)
    assert first["promoted"] is True and first["reason"].startswith("no champion yet; out-of-fold")
    assert first["champion_before"] is None and first["floor"] == 0.3 and first["min_score"] == 0.1


def test_a_challenger_must_beat_the_champion_by_the_margin(reg):
    champion = oof(1, 0.40, slices=11)
    close = decide(reg, oof(2, 0.404, slices=12), champion, False)
    assert close["promoted"] is False
    assert close["reason"] == "out-of-fold kaggle_f1 0.4040 vs champion v1 0.4000: does not beat it by 0.005"
    assert (close["challenger_score"], close["champion_score"]) == (0.404, 0.4)
    assert (close["challenger_oof_slices"], close["champion_oof_slices"]) == (12, 11)
    assert decide(reg, oof(3, 0.405), champion, False)["promoted"], "by the margin exactly"
    assert decide(reg, oof(3, 0.45), champion, False)["promoted"]
    same = decide(reg, oof(1, 0.40), champion, False)
    assert same["promoted"] is False and same["reason"] == "version 1 is already the champion"


def test_the_gate_compares_the_promotion_metric(params):
    reg = params.override({"registry.promotion_metric": "dice_ggo", "registry.min_score": 0.1,
                           "registry.min_eval_slices": 3}).registry
    decision = decide(reg, oof(2, 0.4, dice_ggo=0.6), oof(1, 0.5, dice_ggo=0.3), False)  # worse kaggle_f1
    assert decision["promoted"] and decision["metric"] == "dice_ggo" and decision["champion_score"] == 0.3
    assert not decide(reg, oof(2, 0.6, dice_ggo=0.3), oof(1, 0.5, dice_ggo=0.6), False)["promoted"]
