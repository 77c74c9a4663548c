"""The promotion gate's hardening: provenance on each version, scoring only on slices neither model saw,
and compare-and-set under a lease when promotions run at once (registry versions faked, scores faked)."""
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
    TAG_PROMOTION,
    TAG_PROMOTION_LOCK,
    TAG_TRAIN_SLICES,
    TRAINING_SLICES_FILE,
)

NAME = "covseg-unet"
VAL = list(range(100, 110))  # the validation slice ids on offer


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
    """make(n) -> the run id of n fake versions of covseg-unet (no model behind them: scores are faked)."""
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


def _scorer(scores, calls=None, delay=None):
    """scores: version -> score; every call recorded as (version, ids); delay: version -> seconds."""
    def score(uri, ids):
        v = int(uri.rsplit("/", 1)[1])
        if calls is not None:
            calls.append((v, list(ids)))
        time.sleep((delay or {}).get(v, 0))
        return scores[v]
    return registry.Scorer(VAL, score, lambda ids: 0.05)


# ----------------------------------------------------------------------------- provenance


def test_provenance_round_trip_inline_and_as_artifact(versions):
    run_id = versions(2)
    _tag(run_id, 1, [3, 1, 2])
    p1 = registry.provenance(NAME, 1)
    assert p1.data_version == "md5-a" and p1.train_slice_ids == {1, 2, 3}
    assert MlflowClient().get_model_version(NAME, "1").tags[TAG_TRAIN_SLICES] == "1,2,3"
    many = list(range(5000))  # too long for a tag: the run artifact, checked against the sha256
    _tag(run_id, 2, many)
    assert TAG_TRAIN_SLICES not in MlflowClient().get_model_version(NAME, "2").tags
    assert TRAINING_SLICES_FILE in {a.path for a in MlflowClient().list_artifacts(run_id)}
    assert registry.provenance(NAME, 2).train_slice_ids == set(many)


def test_tampered_provenance_is_refused(versions):
    run_id = versions(1)
    _tag(run_id, 1, [1, 2, 3])
    MlflowClient().set_model_version_tag(NAME, "1", TAG_TRAIN_SLICES, "1,2")  # hides slice 3
    with pytest.raises(CovsegError, match=r"covseg-unet v1 tag train_slice_ids: the 2 training slice ids do not "
                                          r"match"):
        registry.provenance(NAME, 1)


def test_version_without_provenance_has_none(versions):
    versions(1)
    assert registry.provenance(NAME, 1).train_slice_ids is None and not registry.provenance(NAME, 1).known


# ----------------------------------------------------------------------------- scoring only unseen slices


def test_gate_scores_only_slices_neither_version_was_trained_on(versions, reg):
    run_id = versions(2)
    _tag(run_id, 1, [1, 2, 100, 101])       # the champion saw two validation slices
    _tag(run_id, 2, [1, 2, 102, 103, 104])  # the challenger three others
    registry.promote(reg, _scorer({1: 0.5}), version=1)
    calls = []
    decision = registry.promote(reg, _scorer({1: 0.5, 2: 0.6}, calls), version=2)
    unseen = [105, 106, 107, 108, 109]
    assert calls == [(2, unseen), (1, unseen)]
    assert decision["eval_slice_ids"] == unseen and decision["excluded_slice_ids"] == [100, 101, 102, 103, 104]
    assert decision["promoted"] is True and registry.aliases(NAME)[CHAMPION] == 2
    recorded = json.loads(MlflowClient().get_model_version(NAME, "2").tags[TAG_PROMOTION])
    assert recorded["eval_slice_ids"] == unseen


def test_gate_refuses_when_too_few_unseen_slices_remain(versions, reg):
    run_id = versions(2)
    _tag(run_id, 1, VAL[:4])
    _tag(run_id, 2, VAL[3:8])  # together they saw 8 of the 10
    registry.promote(reg, _scorer({1: 0.5}), version=1)
    with pytest.raises(CovsegError, match=r"only 2 of the 10 validation slices were seen by neither version "
                                          r"\(trained: v2 on 5, v1 on 4 slices\), fewer than "
                                          r"registry.min_eval_slices 3"):
        registry.promote(reg, _scorer({1: 0.5, 2: 0.9}), version=2)
    assert registry.aliases(NAME) == {CHALLENGER: 1, CHAMPION: 1}, "nothing moved"


def test_gate_refuses_other_data_versions_unless_allowed(versions, reg):
    run_id = versions(2)
    _tag(run_id, 1, [1], data="md5-a")
    _tag(run_id, 2, [2], data="md5-b")
    registry.promote(reg, _scorer({1: 0.5}), version=1)
    with pytest.raises(CovsegError, match="data versions differ.*v2 md5-b, v1 md5-a.*--allow-data-change"):
        registry.promote(reg, _scorer({1: 0.5, 2: 0.9}), version=2)
    with pytest.raises(CovsegError, match="v1 md5-a, validation data md5-c"):
        registry.promote(reg, _scorer({1: 0.5}), version=1, eval_data_version="md5-c")
    assert registry.aliases(NAME)[CHAMPION] == 1
    decision = registry.promote(reg, _scorer({1: 0.5, 2: 0.9}), version=2, allow_data_change=True)
    assert decision["promoted"] and decision["data_changed"] and decision["allow_data_change"]
    assert decision["data_versions"] == {"v2": "md5-b", "v1": "md5-a"}


def test_gate_refuses_a_version_without_provenance_unless_allowed(versions, reg):
    run_id = versions(2)
    _tag(run_id, 2, [100])  # v1 is an older version: no provenance
    with pytest.raises(CovsegError, match=r"covseg-unet v1: no training provenance"):
        registry.promote(reg, _scorer({1: 0.5}), version=1)
    first = registry.promote(reg, _scorer({1: 0.5}), version=1, allow_data_change=True)
    assert first["promoted"] and first["provenance_missing"] == [1]
    with pytest.raises(CovsegError, match=r"covseg-unet v1: no training provenance"):
        registry.promote(reg, _scorer({1: 0.5, 2: 0.9}), version=2)
    decision = registry.promote(reg, _scorer({1: 0.5, 2: 0.9}), version=2, allow_data_change=True)
    assert decision["promoted"] and decision["eval_slice_ids"] == VAL[1:]


# ----------------------------------------------------------------------------- the version asked for


@pytest.mark.parametrize("version, message", [
    (0, r"^version 0: must be a version number >= 1$"),
    (-2, r"^version -2: must be a version number >= 1$"),
    (999, r"^model covseg-unet has no version 999 \(newest: 2\)$"),
])
def test_gate_and_roll_back_refuse_a_version_that_is_not_there(versions, reg, version, message):
    """The audit: --version 999 was a raw MLflow traceback, and --version 0 silently scored the newest."""
    run_id = versions(2)
    _tag(run_id, 1, [1])
    _tag(run_id, 2, [2])
    calls = []
    with pytest.raises(CovsegError, match=message):
        registry.promote(reg, _scorer({1: 0.5, 2: 0.9}, calls), version=version)
    with pytest.raises(CovsegError, match=message):
        registry.set_champion(reg, version)
    assert calls == [] and registry.aliases(NAME) == {}, "nothing scored, nothing moved"


@pytest.mark.parametrize("args, message", [
    (["--version", "0"], "covseg promote: error: version 0: must be a version number >= 1"),
    (["--version", "-1", "--force"], "covseg promote: error: version -1: must be a version number >= 1"),
    (["--version", "999"], "covseg promote: error: model covseg-unet has no version 999 (newest: 1)"),
    (["--version", "999", "--force"], "covseg promote: error: model covseg-unet has no version 999 (newest: 1)"),
])
def test_promote_names_a_wrong_version_in_one_line(versions, tmp_path, capsys, args, message):
    from projects import ROOT

    from covseg.cli import main

    versions(1)
    assert main(["--params", str(ROOT / "params.yaml"), "promote", "--data", str(tmp_path / "processed"),
                 *args]) == 1
    assert capsys.readouterr().err.strip() == message
    assert registry.aliases(NAME) == {}


def test_a_model_without_versions_says_so(versions, reg):
    versions(0)
    with pytest.raises(CovsegError, match=r"^model covseg-unet has no version 3 \(it has none yet"):
        registry.promote(reg, _scorer({}), version=3)


# ----------------------------------------------------------------------------- compare-and-set


def _race(reg, scores, delay, challengers):
    """Promotions of `challengers` started together in threads; returns {version: decision or error}."""
    results = {}
    start = threading.Barrier(len(challengers))

    def one(v):
        start.wait()
        try:
            results[v] = registry.promote(reg, _scorer(scores, delay=delay), version=v)
        except Exception as exc:
            results[v] = exc
    threads = [threading.Thread(target=one, args=(v,)) for v in challengers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


@pytest.mark.parametrize("slow", [3, 2], ids=["worse-finishes-last", "better-finishes-last"])
def test_two_promotions_at_once_leave_the_better_champion(versions, reg, slow):
    """Champion v1 (0.5); v2 (0.9) and v3 (0.6) both beat it. Whichever finishes scoring last must
    compare itself with the champion the other one just set."""
    run_id = versions(3)
    for v in (1, 2, 3):
        _tag(run_id, v, [v])
    registry.promote(reg, _scorer({1: 0.5}), version=1)
    results = _race(reg, {1: 0.5, 2: 0.9, 3: 0.6}, {slow: 1.5}, [2, 3])
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
