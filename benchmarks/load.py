"""Load test: N trainings at once against one MLflow server and the Prefect `gpu` pool, tiny params.

    python benchmarks/load.py [--runs 8] [--epochs 3]

Starts an MLflow server and a Prefect server on 127.0.0.1 (tests/servers.py), makes a fresh tiny
project (tests/projects.py), deploys infra/prefect.yaml, starts N process workers on the pool `gpu`
(one flow run each, OMP_NUM_THREADS=1) and creates N `train/gpu` flow runs at once, promote=True, all of
one recipe; each flow run runs the pipeline (`dvc exp run`), then `covseg register` and `covseg promote`
(the gate, under the promotion lock: here the Prefect global concurrency limit, the workers having a Prefect
API). The gate compares a version's out-of-fold scores, so the recipe is calibrated first (`covseg
cv`, `covseg calibrate`, calibration.json committed in the project) and every run warm-starts
(`train.init`) from one checkpoint trained first, outside the servers, so that a few epochs pass the
gate's floor; validate / preprocess have run once in the project (the working copies restore them from
the shared DVC run cache, as a team's cache would). N versions of one recipe carry the same scores: the
first decided becomes champion and the others do not beat it. Then checks: N completed flow runs; N
MLflow runs, each with every epoch's train_loss; N registered versions, each with its recorded gate
decision; a consistent champion (see `champion_problems`); and the promotion lock, a Prefect global
concurrency limit, used by the gates and free at the end (see `lock_problems`).
Meanwhile it samples memory and times a registry round trip under the load (read a registered model, write a
tag: what each gate's reads and writes cost; the lock does not depend on it). Writes
benchmarks/results/load.json (counts, wall times, per-run times and gate decisions, peak memory, registry
latency, the problems found).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from contextlib import contextmanager, suppress
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "benchmarks")]

from projects import TINY, make_project  # noqa: E402
from servers import mlflow_server, prefect_server, prefect_workers  # noqa: E402

from covseg import locks, shell  # noqa: E402
from covseg.names import (  # noqa: E402
    CHALLENGER,
    CHAMPION,
    ENV_REPO,
    ENV_TRACKING_URI,
    PATHS,
    TAG_FLOW_RUN,
    TAG_PROMOTION,
)
from covseg.params import apply_overrides, load_params, read_tree  # noqa: E402

RESULT = ROOT / "benchmarks" / "results" / "load.json"
DEPLOYMENT, POOL = "train/gpu", "gpu"
# a U-Net a little wider than TINY's, so that the warm start's checkpoint scores above registry.min_score
MODEL = {"model.base_channels": 8, "model.depth": 3}
PRETRAIN = {"train.epochs": 40, "train.lr": 0.02, "train.val_every": 40}


def run_overrides(init: Path) -> list[str]:
    """Every run's `-S` overrides: the shared warm start (one recipe, so one calibration serves them all)."""
    return [f"train.init={init}"]


@contextmanager
def repeating(every: float, step):
    """Calls `step()` every `every` seconds in a background thread while the block runs."""
    stop = threading.Event()

    def loop():
        while not stop.wait(every):
            step()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextmanager
def peak_memory():
    """Samples memory once a second; yields a dict of peaks so far: "tree_rss_mb", the summed RSS of this
    process and all its descendants (servers, workers, flow runs, dvc, covseg; an upper bound: shared
    pages count once per process), and "machine_used_mb", the machine's memory in use above what it was
    at the start (other processes on the machine count too)."""
    import psutil

    def used() -> float:
        vm = psutil.virtual_memory()
        return (vm.total - vm.available) / 2**20

    peak, base, me = {"tree_rss_mb": 0.0, "machine_used_mb": 0.0}, used(), psutil.Process()

    def sample():
        total = 0
        for proc in [me, *me.children(recursive=True)]:
            with suppress(psutil.Error):  # it ended meanwhile
                total += proc.memory_info().rss
        peak["tree_rss_mb"] = max(peak["tree_rss_mb"], total / 2**20)
        peak["machine_used_mb"] = max(peak["machine_used_mb"], used() - base)

    with repeating(1.0, sample):
        yield peak


@contextmanager
def registry_probe(uri: str, every: float = 2.0):
    """Times, every `every` seconds, a registry round trip of the kind each gate makes (read a registered
    model, write a tag), on a registered model of its own; yields the list of durations (s). A lower bound
    of what a gate sees: this process is idle, the flow runs compete for the CPU."""
    from mlflow import MlflowClient

    client, name = MlflowClient(uri), "load-probe"
    client.create_registered_model(name)
    samples = []

    def probe():
        start = time.monotonic()
        client.get_registered_model(name)
        client.set_registered_model_tag(name, "probe", str(start))
        samples.append(time.monotonic() - start)

    with repeating(every, probe):
        yield samples


def latency_summary(samples: list[float]) -> dict:
    ordered = sorted(samples)
    if not ordered:
        return {"count": 0}
    return {"count": len(ordered), "median_s": round(ordered[len(ordered) // 2], 3),
            "p95_s": round(ordered[int(0.95 * (len(ordered) - 1))], 3), "max_s": round(ordered[-1], 3)}


def prepare(root: Path, epochs: int) -> tuple[Path, Path]:
    """The project (TINY params, MODEL, `epochs`) after `dvc repro preprocess`, the warm-start checkpoint
    trained on it with PRETRAIN and the runs' recipe calibrated, committed (MLflow runs in a store of
    their own)."""
    project = make_project(root / "project", {**TINY, **MODEL, "train.epochs": epochs})
    shell.run(["dvc", "repro", "preprocess"], project)
    tree, _ = apply_overrides(read_tree(project / PATHS.params), PRETRAIN, "PRETRAIN")
    (root / "pretrain.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    init = project / "models" / "init.pt"  # under the repository: a flow may warm-start only from there
    init.parent.mkdir(exist_ok=True)
    shell.run(["covseg", "--params", root / "pretrain.yaml", "train", "--data", PATHS.processed, "--model", init,
               "--history", root / "init_history.csv", "--state", root / "init_state.pt"],
              project, {ENV_TRACKING_URI: f"sqlite:///{root / 'pretrain.db'}"})
    recipe = [arg for item in run_overrides(init) for arg in ("-S", item)]
    for command in (["covseg", "cv", *recipe], ["covseg", "calibrate", "--cv", f"{PATHS.cv}/default", *recipe]):
        shell.run(command, project, {ENV_TRACKING_URI: f"sqlite:///{root / 'pretrain.db'}"})
    shell.run(["git", "add", PATHS.calibration], project)
    shell.run(["git", "commit", "-qm", "calibration of the load test's recipe"], project)
    return project, init


def wait_for_workers(client, count: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while len([w for w in client.read_workers_for_work_pool(POOL) if w.status.value == "ONLINE"]) < count:
        if time.time() > deadline:
            raise TimeoutError(f"fewer than {count} workers came online on pool {POOL} within {timeout}s")
        time.sleep(1)


def trigger_and_wait(client, param_sets: list[dict], timeout: float) -> list:
    """One flow run of DEPLOYMENT per parameter set, all created at once; waits until all are final."""
    deployment = client.read_deployment_by_name(DEPLOYMENT)
    ids = [client.create_flow_run_from_deployment(deployment.id, parameters=p).id for p in param_sets]
    deadline = time.time() + timeout
    while True:
        runs = [client.read_flow_run(i) for i in ids]
        if all(r.state is not None and r.state.is_final() for r in runs):
            return runs
        if time.time() > deadline:
            return runs  # the checks report the runs that did not finish
        time.sleep(2)


def champion_problems(decisions: dict[int, dict], champion: int | None, min_score: float) -> list[str]:
    """What is inconsistent in the gate decisions recorded on the versions (version -> decision) and the
    final champion. All versions carry out-of-fold scores of the same slices, so a version's score is its
    `challenger_score` wherever it appears. Consistent: promotions form one chain, each beating the
    champion it replaced by the margin; no version that was not promoted beat the champion it was
    compared with; the champion is the chain's end and scores within the margin of the best version."""
    problems = []
    score = {v: d["challenger_score"] for v, d in decisions.items()}
    if len({d["challenger_oof_slices"] for d in decisions.values()}) > 1:
        problems.append("the versions' out-of-fold scores come from different slices")
    for v, d in decisions.items():
        before, margin = d["champion_before"], d["margin"]
        if before is not None and abs(d["champion_score"] - score.get(before, d["champion_score"])) > 1e-9:
            problems.append(f"v{v} scored champion v{before} {d['champion_score']} but v{before} scored itself "
                            f"{score[before]}")
        if d["promoted"]:
            if before is None and d["challenger_score"] < min_score:
                problems.append(f"v{v} became the first champion below registry.min_score")
            if before is not None and d["challenger_score"] < d["champion_score"] + margin:
                problems.append(f"v{v} replaced v{before} without beating it by {margin}")
        elif before is not None and d["challenger_score"] >= d["champion_score"] + margin:
            problems.append(f"v{v} beat champion v{before} by the margin but was not promoted")
    promoted = {d["champion_before"]: v for v, d in decisions.items() if d["promoted"]}
    if len(promoted) != sum(d["promoted"] for d in decisions.values()):
        problems.append("two promotions replaced the same champion")
    chain, at = [], None
    while at in promoted and len(chain) <= len(decisions):
        at = promoted[at]
        chain.append(at)
    if len(chain) != len(promoted) or (chain[-1] if chain else None) != champion:
        problems.append(f"the promotions {sorted(promoted.values())} do not form one chain ending at the "
                        f"champion v{champion} (chain {chain})")
    if champion is not None and score and max(score.values()) >= score[champion] + decisions[champion]["margin"]:
        best = max(score, key=score.get)
        problems.append(f"v{best} ({score[best]}) beats champion v{champion} ({score[champion]}) by the margin")
    if champion is None and any(s >= min_score for s in score.values()):
        problems.append("no champion, yet a version reached registry.min_score")
    return problems


def lock_problems(limit, name: str, gates: int) -> list[str]:
    """What is wrong with the promotion lock `limit` (the Prefect global concurrency limit `name`, None when
    there is none) after `gates` promotions: they must have taken it (so it exists, one slot, active) and
    released it."""
    if limit is None:
        return [f"no Prefect global concurrency limit {name}: the {gates} gates did not take the Prefect lock"] \
            if gates else []
    problems = []
    if limit.limit != 1 or not limit.active:
        problems.append(f"the promotion lock {name} has limit {limit.limit}, active {limit.active}: not one slot")
    if limit.active_slots:
        problems.append(f"the promotion lock {name} is still held ({limit.active_slots} slots) after every gate")
    return problems


def check(uri: str, prefect, flow_runs: list, params, epochs: int) -> dict:
    """Counts and problems: the flow runs, the MLflow runs and their histories, the versions, the champion,
    the promotion lock (read with the Prefect client `prefect`)."""
    from mlflow import MlflowClient
    from prefect.exceptions import ObjectNotFound

    client = MlflowClient(uri)
    name, problems = params.registry.model_name, []
    completed = [r for r in flow_runs if r.state is not None and r.state.is_completed()]
    problems += [f"flow run {r.name} ended {r.state.name if r.state else 'without a state'}: "
                 f"{r.state.message if r.state else ''}" for r in flow_runs if r not in completed]
    experiment = client.get_experiment_by_name(params.tracking.experiment)
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    by_flow = {r.data.tags.get(TAG_FLOW_RUN): r for r in runs}
    if set(by_flow) != {str(r.id) for r in flow_runs} or len(runs) != len(flow_runs):
        problems.append(f"{len(runs)} MLflow runs for {len(flow_runs)} flow runs, or not one each")
    full_history = 0
    for run in runs:
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train_loss"))
        if steps != list(range(1, epochs + 1)) or run.info.status != "FINISHED":
            problems.append(f"MLflow run {run.info.run_id} ({run.info.status}): epochs logged {steps}, expected "
                            f"1..{epochs}")
        else:
            full_history += 1
    versions = client.search_model_versions(f"name='{name}'")
    run_ids = {r.info.run_id for r in runs}
    if len(versions) != len(flow_runs) or {v.run_id for v in versions} != run_ids:
        problems.append(f"{len(versions)} registered versions for {len(runs)} MLflow runs, or not one each")
    decisions = {int(v.version): json.loads(v.tags[TAG_PROMOTION]) for v in versions if TAG_PROMOTION in v.tags}
    problems += [f"v{v.version} has no recorded gate decision" for v in versions if TAG_PROMOTION not in v.tags]
    problems += [f"v{v}'s decision names v{d['challenger']}" for v, d in decisions.items() if d["challenger"] != v]
    model = client.get_registered_model(name) if versions else None
    aliases = {a: int(v) for a, v in model.aliases.items()} if model else {}
    problems += [f"alias {a} -> v{v}, which does not exist" for a, v in aliases.items() if v not in decisions]
    if decisions:
        last = max(versions, key=lambda v: v.last_updated_timestamp)  # the last decision recorded
        if aliases.get(CHALLENGER) != int(last.version):
            problems.append(f"challenger is v{aliases.get(CHALLENGER)}, but v{last.version}'s decision came last")
        problems += champion_problems(decisions, aliases.get(CHAMPION), params.registry.min_score)
    lock = locks.lock_name(name)
    try:
        limit = prefect.read_global_concurrency_limit_by_name(lock)
    except ObjectNotFound:
        limit = None
    problems += lock_problems(limit, lock, len(decisions))
    version_of_run = {v.run_id: int(v.version) for v in versions}
    return {"flow_runs_completed": len(completed), "mlflow_runs": len(runs), "runs_with_full_history": full_history,
            "registered_versions": len(versions), "aliases": aliases,
            "promotion_lock": {"prefect_limit": lock, "exists": limit is not None,
                               "active_slots": limit.active_slots if limit else None},
            "problems": problems, "decisions": decisions,
            "version_of_flow_run": {f: version_of_run.get(r.info.run_id) for f, r in by_flow.items()}}


def load_test(root: Path, n: int = 8, epochs: int = 3, timeout: float = 1200) -> dict:
    """The whole load test in `root` (a fresh folder); returns the result (result["problems"] empty if it passed)."""
    from prefect.client.orchestration import SyncPrefectClient

    t0 = time.time()
    project, init = prepare(root, epochs)
    params = load_params(project / PATHS.params)
    prepared = time.time()
    with peak_memory() as peak, mlflow_server(root) as uri, registry_probe(uri) as latencies:
        env = {ENV_TRACKING_URI: uri, ENV_REPO: str(project), "OMP_NUM_THREADS": "1"}
        with prefect_server(root, env) as api:
            for pool in (POOL, "control"):
                shell.run(["prefect", "work-pool", "create", pool, "--type", "process"], project, env)
            shell.run(["prefect", "--no-prompt", "deploy", "--all", "--prefect-file", "infra/prefect.yaml"],
                      project, env)
            with prefect_workers(root, env, POOL, n), SyncPrefectClient(api) as client:
                wait_for_workers(client, n)
                ready = time.time()
                param_sets = [{"overrides": run_overrides(init), "promote": True} for _ in range(n)]
                flow_runs = trigger_and_wait(client, param_sets, timeout)
                done = time.time()
                result = check(uri, client, flow_runs, params, epochs)
    gate, version_of = result.pop("decisions"), result.pop("version_of_flow_run")
    rows = []
    for fr in flow_runs:
        version = version_of.get(str(fr.id))
        decision = gate.get(version, {})
        rows.append({"flow_run": fr.name, "state": fr.state.name if fr.state else None,
                     "version": version,
                     "score": decision.get("challenger_score"), "promoted": decision.get("promoted"),
                     "champion_before": decision.get("champion_before"), "gate_rounds": decision.get("rounds"),
                     "run_s": round(fr.total_run_time.total_seconds(), 1),
                     "start_s": round(fr.start_time.timestamp() - ready, 1) if fr.start_time else None,
                     "end_s": round(fr.end_time.timestamp() - ready, 1) if fr.end_time else None})
    import psutil
    from machine import machine  # benchmarks/machine.py

    return {"machine": f"{machine()}, {psutil.virtual_memory().total / 2**30:.0f} GiB",
            "date": time.strftime("%Y-%m-%d"), "runs": n, "epochs": epochs,
            "overrides": "every run: train.init = the one warm start (one calibrated recipe)",
            "prepare_s": round(prepared - t0, 1), "servers_deploy_workers_s": round(ready - prepared, 1),
            "load_wall_s": round(done - ready, 1), "total_s": round(time.time() - t0, 1),
            "peak_memory_mb": {k: round(v) for k, v in peak.items()},
            "registry_read_write_s": latency_summary(latencies),
            **result, "flow_runs": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    from covseg.atomic import write_json

    with tempfile.TemporaryDirectory(prefix="covseg-load-") as tmp:
        result = load_test(Path(tmp), args.runs, args.epochs)
    write_json(result, RESULT)
    print(json.dumps(result, indent=1))
    if result["problems"]:
        raise SystemExit(f"{len(result['problems'])} problems: see {RESULT}")


if __name__ == "__main__":
    main()
