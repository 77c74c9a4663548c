"""The promotion gate: the out-of-fold scores tagged on each version compared (no model is scored), refusals
that name what to run, provenance recorded on each version, and compare-and-set under a lease when promotions
run at once (registry versions faked in a SQLite store, their tags set as the evaluate stage sets them)."""
import json
import shutil
import threading
import time

import mlflow
import pytest
from mlflow import MlflowClient

from covseg import registry
from covseg.errors import CovsegError
from covseg.names import (
    CHALLENGER,
    CHAMPION,
    ENV_TRACKING_URI,
    HEADLINE_METRICS,
    OOF_PREFIX,
    TAG_DATA_VERSION,
    TAG_OOF_SLICES,
    TAG_PROMOTION,
    TAG_PROMOTION_LOCK,
    TAG_TRAIN_SLICES,
    TAG_TRAIN_SLICES_COUNT,
    TAG_TRAIN_SLICES_SHA256,
    TRAINING_SLICES_FILE,
)
from covseg.stages.evaluate import version_tags

NAME = "covseg-unet"


@pytest.fixture
def reg(params):
    return params.override({"registry.min_eval_slices": 3, "registry.min_score": 0.1,
                            "registry.lock_settle_s": 1.0, "registry.lock_wait_s": 120.0}).registry


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory):
    """An MLflow SQLite store with its tables made (about 6 s here), copied by each test."""
    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def versions(empty_store, tmp_path, monkeypatch):
    """make(n) -> the run id of n fake versions of covseg-unet (no model behind them: the gate loads none)."""
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv(ENV_TRACKING_URI, store)
    mlflow.set_tracking_uri(store)
    client = MlflowClient(store)
    exp = client.create_experiment("covseg", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(exp).info.run_id
    client.create_registered_model(NAME)

    def make(n):
        for _ in range(n):
            client.create_model_version(NAME, f"runs:/{run_id}/model", run_id=run_id)
        return run_id
    return make


def _tag(run_id, version, train_ids, data="md5-a"):
    registry.record_provenance(NAME, version, run_id, data, train_ids)


def _calibrated(run_id, version, score, slices=10, trivial=0.05, data="md5-a", **scores):
    """Tag `version` as evaluate tags a calibrated model: out-of-fold `score` on every headline metric (but
    `scores`), from `slices` slices, the constant predictor's kaggle_f1 `trivial`, trained on `data`."""
    metrics = {"calibrated": True, **{m: score for m in HEADLINE_METRICS}, **scores, "oof_slices": slices,
               "oof_folds": 5, "trivial_kaggle_f1": trivial}
    registry.tag(NAME, version, version_tags(metrics, f"key{version}"))
    _tag(run_id, version, [version], data)


def _uncalibrated(run_id, version, data="md5-a"):
    """Tag `version` as evaluate tags a model whose recipe and data have no calibration."""
    registry.tag(NAME, version, version_tags({"calibrated": False}, f"key{version}"))
    _tag(run_id, version, [version], data)


def _recorded(version):
    return json.loads(MlflowClient().get_model_version(NAME, str(version)).tags[TAG_PROMOTION])


# ----------------------------------------------------------------------------- provenance


def test_provenance_is_recorded_inline_or_as_an_artifact(versions):
    run_id = versions(1)
    _tag(run_id, 1, [3, 1, 2])
    tags = MlflowClient().get_model_version(NAME, "1").tags
    assert tags[TAG_DATA_VERSION] == "md5-a" and tags[TAG_TRAIN_SLICES] == "1,2,3"
    assert tags[TAG_TRAIN_SLICES_COUNT] == "3" and tags[TAG_TRAIN_SLICES_SHA256] == registry.slices_digest([1, 2, 3])
    many = list(range(5000))  # too long for a tag: the run artifact, and the short list's tag goes
    _tag(run_id, 1, many, data="md5-b")
    tags = MlflowClient().get_model_version(NAME, "1").tags
    assert TAG_TRAIN_SLICES not in tags and tags[TAG_TRAIN_SLICES_COUNT] == "5000"
    assert tags[TAG_TRAIN_SLICES_SHA256] == registry.slices_digest(many) and tags[TAG_DATA_VERSION] == "md5-b"
    assert mlflow.artifacts.load_dict(f"runs:/{run_id}/{TRAINING_SLICES_FILE}") == {"data_version": "md5-b",
                                                                                    "train_slice_ids": many}


# ----------------------------------------------------------------------------- what the gate refuses


def test_an_uncalibrated_challenger_is_refused_naming_the_commands(versions, reg):
    run_id = versions(3)
    _uncalibrated(run_id, 1)
    with pytest.raises(CovsegError, match=r"^covseg-unet v1 is not calibrated \(recipe key key1\): it has no "
                                          r"out-of-fold scores.*nothing changed\. Run `covseg cv` and `covseg "
                                          r"calibrate` for its recipe, commit calibration\.json, then `dvc repro` "
                                          r"\(evaluate tags the version again\)$"):
        registry.promote(reg, version=1)
    with pytest.raises(CovsegError, match=r"^covseg-unet v2 is not calibrated \(recipe key unknown\)"):
        registry.promote(reg, version=2)  # no tags at all: registered before evaluate tagged calibrations
    _calibrated(run_id, 3, 0.6)
    MlflowClient().delete_model_version_tag(NAME, "3", f"{OOF_PREFIX}kaggle_f1")
    with pytest.raises(CovsegError, match=r"^covseg-unet v3 lacks the tags oof_kaggle_f1: .*`covseg calibrate`"):
        registry.promote(reg, version=3)
    assert registry.aliases(NAME) == {}, "nothing moved"
    assert all(TAG_PROMOTION not in MlflowClient().get_model_version(NAME, str(v)).tags for v in (1, 2, 3))


def test_an_unreadable_score_tag_is_named(versions, reg):
    run_id = versions(1)
    _calibrated(run_id, 1, 0.6)
    MlflowClient().set_model_version_tag(NAME, "1", TAG_OOF_SLICES, "ten")
    with pytest.raises(CovsegError, match=r"^covseg-unet v1: tag oof_slices is 'ten', not a count; run `dvc repro`"):
        registry.promote(reg, version=1)


def test_scores_from_too_few_out_of_fold_slices_are_refused(versions, reg):
    run_id = versions(2)
    _calibrated(run_id, 1, 0.5)
    registry.promote(reg, version=1)
    _calibrated(run_id, 2, 0.9, slices=2)
    with pytest.raises(CovsegError, match=r"^covseg-unet v2: its out-of-fold scores come from 2 slices, fewer than "
                                          r"registry.min_eval_slices 3: not compared, nothing changed"):
        registry.promote(reg, version=2)
    assert registry.aliases(NAME) == {CHALLENGER: 1, CHAMPION: 1}, "nothing moved"


def test_a_champion_without_out_of_fold_scores_is_refused_naming_force(versions, reg):
    run_id = versions(2)
    _uncalibrated(run_id, 1)
    registry.set_champion(reg, 1)  # by hand: the gate would refuse it
    _calibrated(run_id, 2, 0.9)
    with pytest.raises(CovsegError, match=r"^covseg-unet: champion v1 has no out-of-fold kaggle_f1 .* so v2 cannot "
                                          r"be compared with it; nothing changed\..*`covseg promote --force "
                                          r"--version N`$"):
        registry.promote(reg, version=2)
    assert registry.aliases(NAME) == {CHAMPION: 1}, "nothing moved"
    assert registry.set_champion(reg, 2)["champion_before"] == 1  # the way out it names


def test_other_data_versions_are_refused_unless_allowed(versions, reg):
    run_id = versions(3)
    _calibrated(run_id, 1, 0.5, data="md5-a")
    _calibrated(run_id, 2, 0.9, data="md5-b")
    _calibrated(run_id, 3, 0.9, data="")  # no data.dvc where it was trained
    registry.promote(reg, version=1)
    with pytest.raises(CovsegError, match=r"^covseg-unet: the data versions differ \(v2 md5-b, v1 md5-a\): "
                                          r"out-of-fold scores measured on other data are not comparable; nothing "
                                          r"changed\. Pass --allow-data-change"):
        registry.promote(reg, version=2)
    with pytest.raises(CovsegError, match=r"data versions are not known to match \(v3 unknown, v1 md5-a\)"):
        registry.promote(reg, version=3)
    assert registry.aliases(NAME) == {CHALLENGER: 1, CHAMPION: 1}
    decision = registry.promote(reg, version=2, allow_data_change=True)
    assert decision["promoted"] and decision["data_changed"] and decision["allow_data_change"]
    assert decision["data_versions"] == {"v2": "md5-b", "v1": "md5-a"}
    assert registry.aliases(NAME) == {CHALLENGER: 2, CHAMPION: 2}


# ----------------------------------------------------------------------------- what the gate decides


def test_a_first_champion_must_reach_min_score_and_beat_the_constant_predictor(versions, reg):
    run_id = versions(3)
    _calibrated(run_id, 1, 0.08)
    weak = registry.promote(reg, version=1)
    assert weak["promoted"] is False and weak["reason"] == ("not promoted: no champion yet, and out-of-fold "
                                                            "kaggle_f1 0.0800 is below registry.min_score 0.1")
    assert registry.aliases(NAME) == {CHALLENGER: 1}
    _calibrated(run_id, 2, 0.3, trivial=0.3)
    trivial = registry.promote(reg, version=2)
    assert trivial["promoted"] is False and "does not beat the constant predictor's (0.3000)" in trivial["reason"]
    assert registry.aliases(NAME) == {CHALLENGER: 2}
    _calibrated(run_id, 3, 0.35, trivial=0.3)
    first = registry.promote(reg, version=3)
    assert first["promoted"] is True and first["reason"].startswith("promoted: no champion yet; out-of-fold")
    assert first["champion_before"] is None and first["champion_after"] == 3 and first["floor"] == 0.3
    assert registry.aliases(NAME) == {CHALLENGER: 3, CHAMPION: 3}


def test_a_challenger_must_beat_the_champion_by_the_margin(versions, reg):
    run_id = versions(3)
    for v, score in ((1, 0.40), (2, 0.404), (3, 0.45)):
        _calibrated(run_id, v, score, slices=10 + v)
    registry.promote(reg, version=1)
    close = registry.promote(reg, version=2)
    assert close["promoted"] is False
    assert close["reason"] == ("not promoted: out-of-fold kaggle_f1 0.4040 vs champion v1 0.4000: does not beat it "
                               "by 0.005")
    assert registry.aliases(NAME) == {CHALLENGER: 2, CHAMPION: 1}
    better = registry.promote(reg)  # the newest: v3
    assert better["promoted"] is True and better["champion_before"] == 1 and better["champion_after"] == 3
    assert registry.aliases(NAME) == {CHALLENGER: 3, CHAMPION: 3}
    same = registry.promote(reg, version=3)
    assert same["promoted"] is False and "already the champion" in same["reason"]
    recorded = _recorded(3)  # the last decision on v3
    assert recorded["reason"] == "not promoted: version 3 is already the champion"
    recorded = _recorded(2)
    assert recorded["promoted"] is False and recorded["challenger_score"] == 0.404 and recorded["champion_score"] == 0.4
    assert recorded["challenger_oof_slices"] == 12 and recorded["champion_oof_slices"] == 11
    assert recorded["data_versions"] == {"v2": "md5-a", "v1": "md5-a"} and recorded["data_changed"] is False
    assert MlflowClient().get_model_version(NAME, "2").description.startswith("not promoted: out-of-fold")


def test_the_gate_compares_the_promotion_metric(versions, params):
    reg = params.override({"registry.promotion_metric": "dice_ggo", "registry.min_score": 0.1,
                           "registry.min_eval_slices": 3, "registry.lock_settle_s": 1.0}).registry
    run_id = versions(2)
    _calibrated(run_id, 1, 0.5, dice_ggo=0.3)
    _calibrated(run_id, 2, 0.4, dice_ggo=0.6)  # worse kaggle_f1, better Dice
    assert registry.promote(reg, version=1)["promoted"]
    decision = registry.promote(reg, version=2)
    assert decision["promoted"] and decision["metric"] == "dice_ggo" and decision["champion_score"] == 0.3


def test_roll_back_by_hand_needs_a_version(versions, reg, params):
    run_id = versions(2)
    _calibrated(run_id, 1, 0.5)
    _calibrated(run_id, 2, 0.6)
    registry.promote(reg, version=1)
    registry.promote(reg, version=2)
    decision = registry.set_champion(reg, 1)
    assert decision["champion_before"] == 2 and registry.aliases(NAME)[CHAMPION] == 1
    assert _recorded(1)["reason"] == "set by hand: champion v2 -> v1"
    with pytest.raises(CovsegError, match="--force needs --version"):
        registry.run_promotion(reg, params.tracking, None, force=True)


def test_promote_prints_both_out_of_fold_scores(versions, tmp_path, capsys):
    from projects import ROOT

    from covseg.cli import main

    run_id = versions(2)
    _calibrated(run_id, 1, 0.5, slices=40)
    _calibrated(run_id, 2, 0.6, slices=40)
    args = ["--params", str(ROOT / "params.yaml"), "promote"]
    assert main([*args, "--version", "1"]) == 0
    assert main([*args, "--output", str(tmp_path / "decision.json")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == ("covseg-unet: promoted: out-of-fold kaggle_f1 0.6000 vs champion v1 0.5000: beats it by 0.005 "
                       "(champion: v2); out-of-fold kaggle_f1: v2 0.6000 (40 slices), champion v1 0.5000 (40 slices)")
    assert json.loads((tmp_path / "decision.json").read_text())["champion_after"] == 2


# ----------------------------------------------------------------------------- the version asked for


@pytest.mark.parametrize("version, message", [
    (0, r"^version 0: must be a version number >= 1$"),
    (-2, r"^version -2: must be a version number >= 1$"),
    (999, r"^model covseg-unet has no version 999 \(newest: 2\)$"),
])
def test_gate_and_roll_back_refuse_a_version_that_is_not_there(versions, reg, version, message):
    """The audit: --version 999 was a raw MLflow traceback, and --version 0 silently took the newest."""
    run_id = versions(2)
    _calibrated(run_id, 1, 0.5)
    _calibrated(run_id, 2, 0.9)
    with pytest.raises(CovsegError, match=message):
        registry.promote(reg, version=version)
    with pytest.raises(CovsegError, match=message):
        registry.set_champion(reg, version)
    assert registry.aliases(NAME) == {}, "nothing moved"


@pytest.mark.parametrize("args, message", [
    (["--version", "0"], "covseg promote: error: version 0: must be a version number >= 1"),
    (["--version", "-1", "--force"], "covseg promote: error: version -1: must be a version number >= 1"),
    (["--version", "999"], "covseg promote: error: model covseg-unet has no version 999 (newest: 1)"),
    (["--version", "999", "--force"], "covseg promote: error: model covseg-unet has no version 999 (newest: 1)"),
])
def test_promote_names_a_wrong_version_in_one_line(versions, capsys, args, message):
    from projects import ROOT

    from covseg.cli import main

    versions(1)
    assert main(["--params", str(ROOT / "params.yaml"), "promote", *args]) == 1
    assert capsys.readouterr().err.strip() == message
    assert registry.aliases(NAME) == {}


def test_a_model_without_versions_says_so(versions, reg):
    versions(0)
    with pytest.raises(CovsegError, match=r"^model covseg-unet has no version 3 \(it has none yet"):
        registry.promote(reg, version=3)
    with pytest.raises(CovsegError, match=r"^registered model 'covseg-unet' has no versions yet"):
        registry.promote(reg)


# ----------------------------------------------------------------------------- compare-and-set


def test_a_champion_that_moves_while_deciding_is_compared_again(versions, reg, monkeypatch):
    """Champion v1 (0.5); v3 (0.6) beats it, but while v3 is being judged another promotion makes v2 (0.9)
    champion: under the lock v3 sees the move and is compared with v2 instead."""
    run_id = versions(3)
    for v, score in ((1, 0.5), (2, 0.9), (3, 0.6)):
        _calibrated(run_id, v, score)
    registry.promote(reg, version=1)
    read = registry.out_of_fold

    def moved_meanwhile(name, version):
        if version == 1:  # the champion's tags are read: the other promotion lands now
            MlflowClient().set_registered_model_alias(NAME, CHAMPION, 2)
        return read(name, version)

    monkeypatch.setattr(registry, "out_of_fold", moved_meanwhile)
    decision = registry.promote(reg, version=3)
    assert decision["promoted"] is False and decision["rounds"] == 2 and decision["champions_seen"] == [1, 2]
    assert decision["champion_before"] == 2 and decision["champion_score"] == 0.9
    assert registry.aliases(NAME) == {CHALLENGER: 3, CHAMPION: 2}


def test_a_champion_that_keeps_moving_changes_nothing(versions, reg, monkeypatch):
    run_id = versions(3)
    for v, score in ((1, 0.5), (2, 0.5), (3, 0.9)):
        _calibrated(run_id, v, score)
    registry.promote(reg, version=1)
    read = registry.out_of_fold

    def always_moving(name, version):
        if version in (1, 2):  # each time the champion is read, another promotion swaps it
            MlflowClient().set_registered_model_alias(NAME, CHAMPION, 3 - version)
        return read(name, version)

    monkeypatch.setattr(registry, "out_of_fold", always_moving)
    monkeypatch.setattr(registry, "MAX_ROUNDS", 3)
    with pytest.raises(CovsegError, match=r"^covseg-unet: the champion moved 3 times while v3 was being compared "
                                          r"\(v1 -> v2 -> v1\).*nothing changed"):
        registry.promote(reg, version=3)
    assert registry.aliases(NAME)[CHALLENGER] == 1 and TAG_PROMOTION not in \
        MlflowClient().get_model_version(NAME, "3").tags, "v3 was neither made challenger nor recorded"


def _race(reg, challengers):
    """Promotions of `challengers` started together in threads; returns {version: decision or error}."""
    results = {}
    start = threading.Barrier(len(challengers))

    def one(v):
        start.wait()
        try:
            results[v] = registry.promote(reg, version=v)
        except Exception as exc:
            results[v] = exc
    threads = [threading.Thread(target=one, args=(v,)) for v in challengers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


@pytest.mark.parametrize("slow", [3, 2], ids=["worse-finishes-last", "better-finishes-last"])
def test_two_promotions_at_once_leave_the_better_champion(versions, reg, monkeypatch, slow):
    """Champion v1 (0.5); v2 (0.9) and v3 (0.6) both beat it. Whichever finishes deciding last must
    compare itself with the champion the other one just set (reading `slow`'s tags takes 1.5 s)."""
    run_id = versions(3)
    for v, score in ((1, 0.5), (2, 0.9), (3, 0.6)):
        _calibrated(run_id, v, score)
    registry.promote(reg, version=1)
    read = registry.out_of_fold

    def slow_read(name, version):
        time.sleep(1.5 if version == slow else 0)
        return read(name, version)

    monkeypatch.setattr(registry, "out_of_fold", slow_read)
    results = _race(reg, [2, 3])
    assert not [r for r in results.values() if isinstance(r, Exception)], results
    final = registry.aliases(NAME)[CHAMPION]
    assert final == 2, results
    d2, d3 = results[2], results[3]
    assert d2["promoted"] and d2["champion_after"] == 2
    if not d3["promoted"]:  # v2 set first (as `slow` intends); v3 saw the champion move, compared with v2
        assert d2["champion_before"] == 1 and not d3["promoted"]
        assert d3["champions_seen"] == [1, 2] and d3["champion_before"] == 2 and d3["champion_after"] == 2
        assert d3["champion_score"] == 0.9
    else:  # v3 set first, then v2 beat v3
        assert d3["promoted"] and d3["champion_before"] == 1 and d2["champion_before"] == 3
        assert d2["champions_seen"] == [1, 3]
    assert TAG_PROMOTION_LOCK not in MlflowClient().get_registered_model(NAME).tags, "lock released"


def test_lock_waits_for_its_holder_then_gives_up_naming_it(versions, reg):
    versions(1)
    holder = registry.lock_for(reg)
    holder.acquire()
    waiter = registry.PromotionLock(NAME, 60, 0.5, 0.1)
    with pytest.raises(CovsegError, match=r"could not take the promotion lock .* within registry.lock_wait_s "
                                          r"0.5s: held by .* pid"):
        waiter.acquire()
    holder.release()
    waiter.acquire()
    waiter.release()


def test_an_expired_lease_is_taken_over_and_its_holder_cannot_move_the_champion(versions, reg):
    versions(1)
    # settle_s 1: a registry round trip on a loaded machine stays under settle_s / 2 (the lock's own rule)
    stale = registry.PromotionLock(NAME, 2.5, 10, 1.0)
    stale.acquire()
    time.sleep(2.6)  # its lease ran out (a crashed promotion)
    fresh = registry.PromotionLock(NAME, 60, 10, 1.0)
    fresh.acquire()
    with pytest.raises(registry.LockLost):
        stale.confirm()
    stale.release()  # not its lock any more: leaves it alone
    fresh.confirm()
    fresh.release()


def test_a_late_lock_write_never_lets_its_writer_in_beside_the_holder(versions, reg):
    """A's tag write lands after B took the lease (a registry round trip slower than settle_s / 2): A backs
    off, and must not then take its own late tag for a free lock while B holds the lease."""
    versions(1)
    late = registry.PromotionLock(NAME, 60, 1.5, 0.2)
    holder = registry.PromotionLock(NAME, 60, 5, 0.2)
    write = late.client.set_registered_model_tag
    taken = threading.Event()

    def slow_write(*args):
        taken.wait(10)  # the write is in flight while B takes the lease
        write(*args)

    late.client.set_registered_model_tag = slow_write
    read, has_read = late._read, threading.Event()

    def first_read():
        held = read()
        has_read.set()
        return held

    late._read = first_read
    thread = threading.Thread(target=holder.acquire)
    failure = []

    def contend():
        try:
            late.acquire()
        except CovsegError as error:
            failure.append(error)

    contender = threading.Thread(target=contend)
    contender.start()
    assert has_read.wait(10)  # A has read the lock free and is writing
    thread.start()
    thread.join()
    taken.set()  # B holds the lease; A's write lands on top of it
    contender.join()
    assert failure and "could not take the promotion lock" in str(failure[0]), "both would hold the lock"
    with pytest.raises(registry.LockLost):
        holder.confirm()  # B sees its lease overwritten: it moves nothing
