"""Cross-validated accuracy of params.yaml and of named params sets, side by side.

    python benchmarks/accuracy.py --data ../shared/data/medseg [--sets default old_default] [--jobs 2]

Runs `covseg cv` (k-fold cross-validation on the labelled slices; never the test slices) for each set,
`default` being params.yaml as it is. With `--jobs N` the folds of a set run in N processes of one
thread each. Folds already in benchmarks/results/cv/ for the same params and data are not run again.
Writes benchmarks/results/accuracy.json and accuracy.md (mean +- std over folds per measure, and what
the inference-time levers add).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from covseg.atomic import atomic_output, write_json
from covseg.crossval import CV_METRICS
from covseg.params import load_params

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}"


def cv_command(data: str, name: str, folds: list[int]) -> list[str]:
    return [sys.executable, "-m", "covseg.cli", "cv", "--raw", data, "--folds", ",".join(map(str, folds)),
            "--out", str(RESULTS / "cv" / f"{name}.json"), *([] if name == "default" else ["--set", name])]


def finished_folds(name: str, folds: int) -> list[int]:
    return [k for k in range(folds) if (RESULTS / "cv" / f"{name}.fold{k}.json").is_file()]


def run_set(data: str, name: str, folds: int, jobs: int, run: bool = True) -> dict:
    """All folds of one set, in `jobs` processes, then one pass that only summarises (with `run`
    False: only the folds already there, whose params and data must still match, else they are run)."""
    if not run:
        subprocess.run(cv_command(data, name, finished_folds(name, folds)), check=True)
        return json.loads((RESULTS / "cv" / f"{name}.json").read_text())
    groups = [list(range(folds))[i::jobs] for i in range(jobs)]
    env = {**os.environ, **({"OMP_NUM_THREADS": "1"} if jobs > 1 else {})}
    procs = [subprocess.Popen(cv_command(data, name, g), env=env) for g in groups if g]
    if any(p.wait() != 0 for p in procs):
        raise SystemExit(f"cross-validation of {name} failed")
    subprocess.run(cv_command(data, name, list(range(folds))), check=True)
    return json.loads((RESULTS / "cv" / f"{name}.json").read_text())


def table(results: dict[str, dict]) -> str:
    """Markdown: one row per set, then one per inference-time lever left out (same trained models)."""
    def row(label: str, s: dict, prefix: str = "", seconds: str = "") -> str:
        cells = [f"{s[f'{prefix}{m}_mean']:.3f} ± {s[f'{prefix}{m}_std']:.3f}" for m in CV_METRICS]
        return f"| {label} | " + " | ".join(cells) + f" | {seconds} |"

    lines = ["| set (folds) | " + " | ".join(CV_METRICS) + " | training s / fold |",
             "|" + "---|" * (len(CV_METRICS) + 2)]
    for name, s in results.items():
        lines.append(row(f"{name} ({', '.join(map(str, s['folds_run']))})", s,
                         seconds=f"{s['train_seconds_mean']:.0f}"))
        levers = sorted({k.split(".")[0] for k in s if k.startswith("without_")})
        lines += [row(f"{name}, {lever.replace('_', ' ')}", s, f"{lever}.", "same models") for lever in levers]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a Kaggle-layout folder of labelled slices")
    parser.add_argument("--sets", nargs="+", default=["default", "old_default"],
                        help="'default' (params.yaml) and names under params.yaml:sets")
    parser.add_argument("--jobs", type=int, default=1, help="processes per set (one thread each when > 1)")
    parser.add_argument("--partial", nargs="*", default=[], metavar="SET",
                        help="sets summarised over the folds already in benchmarks/results/cv (not run)")
    args = parser.parse_args()
    folds = load_params(ROOT / "params.yaml").split.folds
    results = {name: run_set(args.data, name, folds, args.jobs, name not in args.partial) for name in args.sets}
    summary = {"machine": machine(), "data": args.data, "folds": folds,
               "results": {n: {k: v for k, v in s.items() if k not in ("per_fold", "params")} | {
                   "per_fold": [{k: f[k] for k in (*CV_METRICS, "fold", "seconds")} for f in s["per_fold"]]}
                   for n, s in results.items()}}
    write_json(summary, RESULTS / "accuracy.json")
    with atomic_output(RESULTS / "accuracy.md") as tmp:
        tmp.write_text(f"# Cross-validated accuracy ({folds} folds, labelled slices of {args.data})\n\n"
                       f"Machine: {summary['machine']}. Mean ± standard deviation over folds; per-slice Dice "
                       "over the slices that have the class. 'training s / fold' is wall time as run (with "
                       "--jobs, folds side by side on one thread each, other work beside them): not a speed "
                       "figure.\n\n"
                       + table(results))
    print((RESULTS / "accuracy.md").read_text())


if __name__ == "__main__":
    main()
