"""The load test of benchmarks/load.py: its champion and lock checks (fast), and 3 trainings at once (slow)."""
import re
import sys
from types import SimpleNamespace

import pytest
from projects import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
from load import champion_problems, load_test, lock_problems


def decision(v, score, before=None, champion_score=None, promoted=False, slices=10):
    return {v: {"challenger": v, "challenger_score": score, "champion_before": before, "champion_score": champion_score,
                "promoted": promoted, "margin": 0.005, "challenger_oof_slices": slices}}


# v2 first champion, v1 beat it, v3 lost to v2, v4 lost to v1 (out-of-fold scores of the same ten slices)
RACE = {**decision(2, 0.64, promoted=True), **decision(1, 0.67, 2, 0.64, True), **decision(3, 0.36, 2, 0.64),
        **decision(4, 0.56, 1, 0.67)}


def test_a_consistent_race_has_no_problems():
    assert champion_problems(RACE, champion=1, min_score=0.2) == []
    assert champion_problems({**decision(1, 0.1)}, champion=None, min_score=0.2) == []


@pytest.mark.parametrize("decisions, champion, problem", [
    ({**RACE, **decision(3, 0.70, 2, 0.64, True)}, 1, "two promotions replaced the same champion"),
    ({**RACE, **decision(3, 0.90, 2, 0.64)}, 1, "v3 beat champion v2 by the margin but was not promoted"),
    ({**RACE, **decision(3, 0.90)}, 1, r"v3 \(0.9\) beats champion v1 \(0.67\) by the margin"),
    (RACE, 2, "do not form one chain ending at the champion v2"),
    ({**RACE, **decision(4, 0.56, 1, 0.5)}, 1, "v4 scored champion v1 0.5 but v1 scored itself 0.67"),
    ({**RACE, **decision(4, 0.56, 1, 0.67, slices=12)}, 1, "out-of-fold scores come from different slices"),
    ({**RACE, **decision(1, 0.643, 2, 0.64, True), **decision(4, 0.56, 1, 0.643)}, 1,
     "v1 replaced v2 without beating it by 0.005"),
    ({**decision(1, 0.1, promoted=True)}, 1, "v1 became the first champion below registry.min_score"),
    ({**decision(1, 0.3)}, None, "no champion, yet a version reached registry.min_score"),
])
def test_an_inconsistent_race_is_named(decisions, champion, problem):
    problems = champion_problems(decisions, champion, min_score=0.2)
    assert any(re.search(problem, p) for p in problems), problems


def limit(active_slots=0, limit=1, active=True):
    return SimpleNamespace(active_slots=active_slots, limit=limit, active=active)


@pytest.mark.parametrize("found, gates, problem", [
    (limit(), 8, None),
    (None, 0, None),
    (None, 8, "no Prefect global concurrency limit L: the 8 gates did not take the Prefect lock"),
    (limit(active_slots=1), 8, r"the promotion lock L is still held \(1 slots\) after every gate"),
    (limit(limit=2), 8, "the promotion lock L has limit 2, active True: not one slot"),
])
def test_the_promotion_lock_must_have_been_taken_and_released(found, gates, problem):
    problems = lock_problems(found, "L", gates)
    assert (problems == []) if problem is None else any(re.fullmatch(problem, p) for p in problems), problems


@pytest.mark.slow
def test_three_trainings_at_once(tmp_path):
    """3 train/gpu runs at once of one calibrated recipe on 3 process workers, one MLflow server, promote=True:
    each registers its version (`covseg register`) and runs the gate under the Prefect promotion lock (as few
    as still race for it; `python benchmarks/load.py` runs 8)."""
    result = load_test(tmp_path, n=3, epochs=2, timeout=900)
    assert result["problems"] == []
    counts = ("flow_runs_completed", "mlflow_runs", "runs_with_full_history", "registered_versions")
    assert [result[k] for k in counts] == [3, 3, 3, 3]
    assert result["aliases"].get("champion"), "the calibrated, warm-started versions pass the gate: a champion"
    assert result["promotion_lock"]["exists"] and result["promotion_lock"]["active_slots"] == 0
    print({k: result[k] for k in ("load_wall_s", "total_s", "peak_memory_mb", "registry_read_write_s")})
