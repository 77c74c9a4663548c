"""The newcomer's first run, timed: a fresh clone of this repository, the README's first command (`bash
infra/setup.sh`, then `dvc repro` on the embedded data), each part and each stage; writes
benchmarks/results/<name>.json.

    python benchmarks/first_run.py                                    # this machine
    benchmarks/avx2/run python benchmarks/first_run.py --name first_run_avx2   # as without native bfloat16
    python benchmarks/first_run.py --no-pip-cache   # pip's and uv's caches off (their indexes still serve)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

from machine import commit, machine, write_result  # benchmarks/machine.py

ROOT = Path(__file__).resolve().parents[1]


def timed(cmd: str, cwd: Path, env: dict) -> tuple[float, str]:
    """(seconds, output) of a shell line; raises with its output if it fails."""
    start = time.perf_counter()
    proc = subprocess.run(["bash", "-c", cmd], cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return seconds, proc.stdout + proc.stderr


def first_run(rev: str, pip_cache: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "MLFLOW_TRACKING_URI")}
    env["PATH"] = ":".join(p for p in env["PATH"].split(":") if ".venv" not in p)  # the clone's own .venv only
    if not pip_cache:
        env["PIP_NO_CACHE_DIR"] = env["UV_NO_CACHE"] = "1"
    with tempfile.TemporaryDirectory(prefix="covseg-first-run-") as tmp:
        clone = Path(tmp) / "covseg"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        subprocess.run(["git", "checkout", "-q", rev], cwd=clone, check=True)
        sha = commit(clone)
        setup_s, _ = timed("bash infra/setup.sh", clone, env)
        repro_s, out = timed(". .venv/bin/activate && dvc repro", clone, env)
        metrics = json.loads((clone / "reports/metrics.json").read_text())
    stages = {name: float(s) for name, s in re.findall(r"\[covseg (\w+)\] done in ([\d.]+)s", out)}
    return {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "commit": sha,
            "pip_cache": "warm (this machine's)" if pip_cache else "none (PIP_NO_CACHE_DIR=1, UV_NO_CACHE=1)",
            "setup_s": round(setup_s, 1), "dvc_repro_s": round(repro_s, 1), "first_run_s": round(setup_s + repro_s, 1),
            "stages_s": stages, "kaggle_f1": metrics.get("kaggle_f1"), "calibrated": metrics.get("calibrated")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", default="HEAD", help="the commit to clone (default HEAD)")
    ap.add_argument("--name", default="first_run", help="the result's file name under benchmarks/results/")
    ap.add_argument("--no-pip-cache", action="store_true",
                    help="set PIP_NO_CACHE_DIR=1 and UV_NO_CACHE=1 for the set-up")
    args = ap.parse_args()
    result = first_run(args.rev, not args.no_pip_cache)
    write_result(args.name, result)


if __name__ == "__main__":
    main()
