"""Promotion against a registry (covseg.promotion; the decision from the scores alone: tests/test_gate.py):
the out-of-fold scores tagged on each version read and compared (no model is scored), refusals that name
what to run, a version not of covseg's form refused, provenance recorded on each version, and
compare-and-set under the promotion lock when promotions run at once. The versions are of one tiny covseg
model logged once per module in a SQLite store; their tags are set as `covseg register` sets them."""
import json
import shutil
import threading
import time

import mlflow
import pytest
import yaml
from mlflow import MlflowClient

from covseg import locks, modelstore, promotion, provenance, registry
from covseg.errors import CovsegError
from covseg.model import Segmenter, UNet
from covseg.names import (
    CHALLENGER,
    CHAMPION,
    ENV_TRACKING_URI,
    HEADLINE_METRICS,
    OOF_PREFIX,
    TAG_DATA_VERSION,
    TAG_OOF_SLICES,
    TAG_PROMOTION,
    TAG_TRAIN_SLICES,
    TAG_TRAIN_SLICES_COUNT,
    TAG_TRAIN_SLICES_SHA256,
    TRAINING_SLICES_FILE,
)
from covseg.stages.register import version_tags

NAME = "covseg-unet"


@pytest.fixture(autouse=True)
def _file_lock(monkeypatch):
    """The promotion lock here is the file lock beside each test's store, even when another test of the session
    configured a Prefect API (the Prefect limit as the lock: tests/test_locks.py)."""
    monkeypatch.setattr(locks, "prefect_api_url", lambda: None)


@pytest.fixture
def reg(params):
    return params.override({"registry.min_eval_slices": 3, "registry.min_score": 0.1,
                            "registry.lock_wait_s": 120.0}).registry


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """An MLflow SQLite store (its tables made: about 3-6 s) with the experiment covseg, one run holding a tiny
    covseg model logged in covseg's form (modelstore.log: about 2 s) and the registered model covseg-unet,
    with no versions yet; each test copies it. Returns (store file, run id, the model's source, its model id)."""
    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ENV_TRACKING_URI, uri)
        mlflow.set_tracking_uri(uri)
        client = MlflowClient(uri)
        experiment = client.create_experiment("covseg", artifact_location=(root / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment) as run:
            model_uri = modelstore.log(Segmenter(UNet(base_channels=4, depth=2), 1.0).eval(), (16, 16))
        logged = mlflow.get_logged_model(model_uri.removeprefix("models:/"))
        client.create_registered_model(NAME)
    return root / "mlflow.db", run.info.run_id, logged.artifact_location, logged.model_id


@pytest.fixture
def versions(store, tmp_path, monkeypatch):
    """make(n) -> the run id, after n new versions of covseg-unet, each the store's one logged covseg model
    (the gate loads none of them; it checks each one's form)."""
    db, run_id, source, model_id = store
    shutil.copy(db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv(ENV_TRACKING_URI, uri)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)

    def make(n):
        for _ in range(n):
            client.create_model_version(NAME, source, run_id=run_id, model_id=model_id)
        return run_id
    return make


def _tag(run_id, version, train_ids, data="md5-a"):
    provenance.record_provenance(NAME, version, run_id, data, train_ids)


def _calibrated(run_id, version, score, slices=10, trivial=0.05, data="md5-a", **scores):
    """Tag `version` as `covseg register` tags a calibrated model: out-of-fold `score` on every headline metric
    (but `scores`), from `slices` slices, the constant predictor's kaggle_f1 `trivial`, trained on `data`."""
    metrics = {"calibrated": True, **{m: score for m in HEADLINE_METRICS}, **scores, "oof_slices": slices,
               "oof_folds": 5, "trivial_kaggle_f1": trivial}
    registry.tag(NAME, version, version_tags(metrics, f"key{version}"))
    _tag(run_id, version, [version], data)


def _uncalibrated(run_id, version, data="md5-a"):
    """Tag `version` as `covseg register` tags a model whose recipe and data have no calibration."""
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
    assert tags[TAG_TRAIN_SLICES_COUNT] == "3" and tags[TAG_TRAIN_SLICES_SHA256] == provenance.slices_digest([1, 2, 3])
    many = list(range(5000))  # too long for a tag: the run artifact, and the short list's tag goes
    _tag(run_id, 1, many, data="md5-b")
    tags = MlflowClient().get_model_version(NAME, "1").tags
    assert TAG_TRAIN_SLICES not in tags and tags[TAG_TRAIN_SLICES_COUNT] == "5000"
    assert tags[TAG_TRAIN_SLICES_SHA256] == provenance.slices_digest(many) and tags[TAG_DATA_VERSION] == "md5-b"
    assert mlflow.artifacts.load_dict(f"runs:/{run_id}/{TRAINING_SLICES_FILE}") == {"data_version": "md5-b",
                                                                                    "train_slice_ids": many}


# ----------------------------------------------------------------------------- what the gate refuses


def test_an_uncalibrated_challenger_is_refused_naming_the_commands(versions, reg):
    run_id = versions(3)
    _uncalibrated(run_id, 1)
    with pytest.raises(CovsegError, match=r"^covseg-unet v1 is not calibrated \(recipe key key1\): it has no "
                                          r"out-of-fold scores.*nothing changed\. Run `covseg cv` and `covseg "
                                          r"calibrate` for its recipe, commit calibration\.json, then `dvc repro` "
                                          r"and `covseg register` \(it tags the version again\)$"):
        promotion.promote(reg, version=1)
    with pytest.raises(CovsegError, match=r"^covseg-unet v2 is not calibrated \(recipe key unknown\)"):
        promotion.promote(reg, version=2)  # no tags at all: registered before versions were tagged with calibrations
    _calibrated(run_id, 3, 0.6)
    MlflowClient().delete_model_version_tag(NAME, "3", f"{OOF_PREFIX}kaggle_f1")
    with pytest.raises(CovsegError, match=r"^covseg-unet v3 lacks the tags oof_kaggle_f1: .*`covseg calibrate`"):
        promotion.promote(reg, version=3)
    assert registry.aliases(NAME) == {}, "nothing moved"
    assert all(TAG_PROMOTION not in MlflowClient().get_model_version(NAME, str(v)).tags for v in (1, 2, 3))


def test_an_unreadable_score_tag_is_named(versions, reg):
    run_id = versions(1)
    _calibrated(run_id, 1, 0.6)
    MlflowClient().set_model_version_tag(NAME, "1", TAG_OOF_SLICES, "ten")
    with pytest.raises(CovsegError, match=r"^covseg-unet v1: tag oof_slices is 'ten', not a count; run `dvc repro`, "
                                          r"then `covseg register`"):
        promotion.promote(reg, version=1)


def test_a_champion_without_out_of_fold_scores_is_refused_naming_force(versions, reg):
    run_id = versions(2)
    _uncalibrated(run_id, 1)
    promotion.set_champion(reg, 1)  # by hand: the gate would refuse it
    _calibrated(run_id, 2, 0.9)
    with pytest.raises(CovsegError, match=r"^covseg-unet: champion v1 has no out-of-fold kaggle_f1 .* so v2 cannot "
                                          r"be compared with it; nothing changed\..*`covseg promote --force "
                                          r"--version N`$"):
        promotion.promote(reg, version=2)
    assert registry.aliases(NAME) == {CHAMPION: 1}, "nothing moved"
    assert promotion.set_champion(reg, 2)["champion_before"] == 1  # the way out it names


def test_other_data_versions_are_refused_unless_allowed(versions, reg):
    run_id = versions(3)
    _calibrated(run_id, 1, 0.5, data="md5-a")
    _calibrated(run_id, 2, 0.9, data="md5-b")
    _calibrated(run_id, 3, 0.9, data="")  # no data.dvc where it was trained
    promotion.promote(reg, version=1)
    with pytest.raises(CovsegError, match=r"^covseg-unet: the data versions differ \(v2 md5-b, v1 md5-a\): "
                                          r"out-of-fold scores measured on other data are not comparable; nothing "
                                          r"changed\. Pass --allow-data-change"):
        promotion.promote(reg, version=2)
    with pytest.raises(CovsegError, match=r"data versions are not known to match \(v3 unknown, v1 md5-a\)"):
        promotion.promote(reg, version=3)
    assert registry.aliases(NAME) == {CHALLENGER: 1, CHAMPION: 1}
    decision = promotion.promote(reg, version=2, allow_data_change=True)
    assert decision["promoted"] and decision["data_changed"] and decision["allow_data_change"]
    assert decision["data_versions"] == {"v2": "md5-b", "v1": "md5-a"}
    assert registry.aliases(NAME) == {CHALLENGER: 2, CHAMPION: 2}


# a pyfunc as `mlflow.pyfunc.log_model(python_model=...)` writes it: code of its own, unpickled on load
PICKLED = {"MLmodel": yaml.safe_dump({"flavors": {"python_function": {
    "cloudpickle_version": "3.1.1", "code": None, "env": {"conda": "conda.yaml", "virtualenv": "python_env.yaml"},
    "loader_module": "mlflow.pyfunc.model", "python_model": "python_model.pkl", "python_version": "3.11.9",
    "streamable": False}}}), "python_model.pkl": "(a pickle)"}


@pytest.mark.parametrize("files, problem", [
    (PICKLED, r" is not of the form covseg logs \(loader_module 'mlflow.pyfunc.model' \(covseg logs "
              r"'covseg.serving'\); key 'cloudpickle_version'; key 'python_model'\): covseg neither loads, serves "
              r"nor promotes it, and runs none of its code; log it again in covseg's form"),
    ({"notes.txt": "not a model"}, r": no readable MLmodel \(.*\); it is not a model covseg logged"),
], ids=["pickled-pyfunc", "no-model"])
def test_a_version_not_of_covsegs_form_is_refused_by_the_gate_and_by_hand(versions, reg, capsys, files, problem):
    """A version registered from a run artifact that is not a covseg model, with out-of-fold scores that
    would beat the champion: neither the gate nor `promote --force` moves an alias to it."""
    from projects import ROOT

    from covseg.cli import main

    run_id = versions(1)
    _calibrated(run_id, 1, 0.5)
    promotion.promote(reg, version=1)
    client = MlflowClient()
    folder = f"other-{len(files)}-{sorted(files)[0]}"
    for path, text in files.items():
        client.log_text(run_id, text, f"{folder}/{path}")
    assert int(client.create_model_version(NAME, f"runs:/{run_id}/{folder}", run_id=run_id).version) == 2
    _calibrated(run_id, 2, 0.9)
    refused = rf"^covseg-unet v2{problem}"
    with pytest.raises(CovsegError, match=refused):
        promotion.promote(reg, version=2)
    with pytest.raises(CovsegError, match=refused):
        promotion.promote(reg)  # the newest
    with pytest.raises(CovsegError, match=refused):
        promotion.set_champion(reg, 2)
    assert main(["--params", str(ROOT / "params.yaml"), "promote", "--version", "2", "--force"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after MLflow's download progress bars
    assert err.startswith("covseg promote: error: covseg-unet v2") and ("form" in err or "MLmodel" in err), err
    assert registry.aliases(NAME) == {CHALLENGER: 1, CHAMPION: 1}, "nothing moved"
    assert TAG_PROMOTION not in client.get_model_version(NAME, "2").tags, "no decision recorded"


# ----------------------------------------------------------------------------- decisions applied
# (what the gate decides, from the scores alone: tests/test_gate.py)


def test_a_first_version_the_gate_rejects_is_the_challenger_only(versions, reg):
    run_id = versions(1)
    _calibrated(run_id, 1, 0.08)
    weak = promotion.promote(reg, version=1)
    assert weak["promoted"] is False and weak["reason"].startswith("not promoted: no champion yet")
    assert registry.aliases(NAME) == {CHALLENGER: 1} and _recorded(1)["promoted"] is False


def test_a_challenger_must_beat_the_champion_by_the_margin(versions, reg):
    run_id = versions(3)
    for v, score in ((1, 0.40), (2, 0.404), (3, 0.45)):
        _calibrated(run_id, v, score, slices=10 + v)
    promotion.promote(reg, version=1)
    close = promotion.promote(reg, version=2)
    assert close["promoted"] is False
    assert close["reason"] == ("not promoted: out-of-fold kaggle_f1 0.4040 vs champion v1 0.4000: does not beat it "
                               "by 0.005")
    assert registry.aliases(NAME) == {CHALLENGER: 2, CHAMPION: 1}
    better = promotion.promote(reg)  # the newest: v3
    assert better["promoted"] is True and better["champion_before"] == 1 and better["champion_after"] == 3
    assert registry.aliases(NAME) == {CHALLENGER: 3, CHAMPION: 3}
    same = promotion.promote(reg, version=3)
    assert same["promoted"] is False and "already the champion" in same["reason"]
    recorded = _recorded(3)  # the last decision on v3
    assert recorded["reason"] == "not promoted: version 3 is already the champion"
    recorded = _recorded(2)
    assert recorded["promoted"] is False and recorded["challenger_score"] == 0.404 and recorded["champion_score"] == 0.4
    assert recorded["challenger_oof_slices"] == 12 and recorded["champion_oof_slices"] == 11
    assert recorded["data_versions"] == {"v2": "md5-a", "v1": "md5-a"} and recorded["data_changed"] is False
    assert MlflowClient().get_model_version(NAME, "2").description.startswith("not promoted: out-of-fold")


def test_roll_back_by_hand_needs_a_version(versions, reg, params):
    run_id = versions(2)
    _calibrated(run_id, 1, 0.5)
    _calibrated(run_id, 2, 0.6)
    promotion.promote(reg, version=1)
    promotion.promote(reg, version=2)
    decision = promotion.set_champion(reg, 1)
    assert decision["champion_before"] == 2 and registry.aliases(NAME)[CHAMPION] == 1
    assert _recorded(1)["reason"] == "set by hand: champion v2 -> v1"
    with pytest.raises(CovsegError, match="--force needs --version"):
        promotion.run_promotion(reg, params.tracking, None, force=True)


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
        promotion.promote(reg, version=version)
    with pytest.raises(CovsegError, match=message):
        promotion.set_champion(reg, version)
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
        promotion.promote(reg, version=3)
    with pytest.raises(CovsegError, match=r"^registered model 'covseg-unet' has no versions yet"):
        promotion.promote(reg)


# ----------------------------------------------------------------------------- compare-and-set


def test_a_champion_that_moves_while_deciding_is_compared_again(versions, reg, monkeypatch):
    """Champion v1 (0.5); v3 (0.6) beats it, but while v3 is being judged another promotion makes v2 (0.9)
    champion: under the lock v3 sees the move and is compared with v2 instead."""
    run_id = versions(3)
    for v, score in ((1, 0.5), (2, 0.9), (3, 0.6)):
        _calibrated(run_id, v, score)
    promotion.promote(reg, version=1)
    read = promotion.out_of_fold

    def moved_meanwhile(name, version):
        if version == 1:  # the champion's tags are read: the other promotion lands now
            MlflowClient().set_registered_model_alias(NAME, CHAMPION, 2)
        return read(name, version)

    monkeypatch.setattr(promotion, "out_of_fold", moved_meanwhile)
    decision = promotion.promote(reg, version=3)
    assert decision["promoted"] is False and decision["rounds"] == 2 and decision["champions_seen"] == [1, 2]
    assert decision["champion_before"] == 2 and decision["champion_score"] == 0.9
    assert registry.aliases(NAME) == {CHALLENGER: 3, CHAMPION: 2}


def test_a_champion_that_keeps_moving_changes_nothing(versions, reg, monkeypatch):
    run_id = versions(3)
    for v, score in ((1, 0.5), (2, 0.5), (3, 0.9)):
        _calibrated(run_id, v, score)
    promotion.promote(reg, version=1)
    read = promotion.out_of_fold

    def always_moving(name, version):
        if version in (1, 2):  # each time the champion is read, another promotion swaps it
            MlflowClient().set_registered_model_alias(NAME, CHAMPION, 3 - version)
        return read(name, version)

    monkeypatch.setattr(promotion, "out_of_fold", always_moving)
    monkeypatch.setattr(promotion, "MAX_ROUNDS", 3)
    with pytest.raises(CovsegError, match=r"^covseg-unet: the champion moved 3 times while v3 was being compared "
                                          r"\(v1 -> v2 -> v1\).*nothing changed"):
        promotion.promote(reg, version=3)
    assert registry.aliases(NAME)[CHALLENGER] == 1 and TAG_PROMOTION not in \
        MlflowClient().get_model_version(NAME, "3").tags, "v3 was neither made challenger nor recorded"


def _race(reg, challengers):
    """Promotions of `challengers` started together in threads; returns {version: decision or error}."""
    results = {}
    start = threading.Barrier(len(challengers))

    def one(v):
        start.wait()
        try:
            results[v] = promotion.promote(reg, version=v)
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
    promotion.promote(reg, version=1)
    read = promotion.out_of_fold

    def slow_read(name, version):
        time.sleep(1.5 if version == slow else 0)
        return read(name, version)

    monkeypatch.setattr(promotion, "out_of_fold", slow_read)
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
    with locks.promotion_lock(NAME, 0, 60):  # released: taken at once
        pass


def test_a_promotion_that_cannot_take_the_lock_changes_nothing(versions, params):
    reg = params.override({"registry.min_eval_slices": 3, "registry.min_score": 0.1,
                           "registry.lock_wait_s": 0.3}).registry
    run_id = versions(1)
    _calibrated(run_id, 1, 0.5)
    busy = (r"^covseg-unet: could not take the promotion lock \(file lock .*\.lock\) within registry\.lock_wait_s "
            r"0\.3s: another promotion holds it; nothing changed$")
    with locks.promotion_lock(NAME, 0, 60):  # another promotion holds it
        with pytest.raises(CovsegError, match=busy):
            promotion.promote(reg, version=1)
        with pytest.raises(CovsegError, match=busy):
            promotion.set_champion(reg, 1)
    assert registry.aliases(NAME) == {} and TAG_PROMOTION not in MlflowClient().get_model_version(NAME, "1").tags
    assert promotion.promote(reg, version=1)["promoted"], "once it is released"
    assert registry.aliases(NAME) == {CHALLENGER: 1, CHAMPION: 1}
