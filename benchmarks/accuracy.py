"""Cross-validated accuracy of params.yaml, of named params sets and of variants of them, side by side.

    python benchmarks/accuracy.py --data ../shared/data/medseg [--sets default old_default] [--jobs 2]
    python benchmarks/accuracy.py --data ... --sets gpu "e80=default+train.epochs=80" --out-dir benchmarks/results/h200

Runs `covseg cv` (k-fold cross-validation on the labelled slices; never the test slices) for each set:
`default` is params.yaml as it is, a name is a set of params.yaml:sets, and `NAME=BASE+KEY=VALUE+...`
is BASE (default or a set) with `-S KEY=VALUE` overrides, for ablations. Every (set, fold) is one
process; `--jobs N` runs N at once (one CPU thread each when N > 1), the longest recipes first. Folds
already in OUT_DIR/cv/ for the same params and data are not run again. With `--deadline S`, folds still
running after S seconds are stopped and the summary covers the folds that finished. Writes
OUT_DIR/accuracy.json and accuracy.md (mean +- std over folds per measure, and what the inference-time
levers add). With `--run-only` the folds are run and nothing is summarised (a later call, which finds
them done, does that). A fold counts as done only if its JSON is of the same params and data.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from machine import machine  # benchmarks/machine.py

from covseg.atomic import atomic_output, write_json
from covseg.crossval import CV_METRICS, recipe_key
from covseg.data import fingerprint
from covseg.params import load_params, parse_overrides

ROOT = Path(__file__).resolve().parents[1]


def parse_spec(spec: str) -> tuple[str, str, list[str]]:
    """'gpu' -> ('gpu', 'gpu', []); 'e80=default+train.epochs=80' -> ('e80', 'default', ['train.epochs=80'])."""
    if "=" not in spec.split("+")[0]:
        return spec, spec, []
    name, rest = spec.split("=", 1)
    base, *overrides = rest.split("+")
    return name, base, overrides


def cv_command(data: str, spec: str, folds: list[int], out_dir: Path) -> list[str]:
    name, base, overrides = parse_spec(spec)
    return [sys.executable, "-m", "covseg.cli", "cv", "--raw", data, "--folds", ",".join(map(str, folds)),
            "--out", str(out_dir / "cv" / f"{name}.json"), *([] if base == "default" else ["--set", base]),
            *[arg for o in overrides for arg in ("-S", o)]]


def spec_params(params, spec: str):
    """The params a spec's folds run with."""
    _, base, overrides = parse_spec(spec)
    return params.with_set(None if base == "default" else base).override(parse_overrides(overrides), "-S")


def recipe_of(data: str, spec: str) -> str:
    """The recipe key `covseg cv` records in the folds of this spec on `data`."""
    return recipe_key(spec_params(load_params(ROOT / "params.yaml"), spec), fingerprint(data))


def finished_folds(out_dir: Path, name: str, folds: int, recipe: str) -> list[int]:
    """The folds whose JSON holds results of `recipe` (a fold of other params or data is not done)."""
    def done(path: Path) -> bool:
        return path.is_file() and json.loads(path.read_text()).get("recipe") == recipe

    return [k for k in range(folds) if done(out_dir / "cv" / f"{name}.fold{k}.json")]


def work(params, spec: str) -> float:
    """Rough cost of one fold of a set (epochs x members x pixels x channels^2), to start the longest first."""
    p = spec_params(params, spec)
    t = p.train
    side = (t.crop or 512 * t.scale) ** 2 * (t.crops_per_slice if t.crop else 1)
    return (t.epochs + t.pseudo_epochs) * t.members * side * p.model.base_channels ** 2


def run_all(data: str, specs: list[str], folds: int, jobs: int, out_dir: Path, deadline: float | None) -> None:
    """Every (set, fold) not yet done, `jobs` processes at a time, longest first; stop at the deadline.
    A fold that fails does not stop the others; the call fails at the end, naming them."""
    params = load_params(ROOT / "params.yaml")

    def pending(spec: str) -> list[int]:
        done = finished_folds(out_dir, parse_spec(spec)[0], folds, recipe_of(data, spec))
        return [k for k in range(folds) if k not in done]

    queue = sorted(((spec, k) for spec in specs for k in pending(spec)), key=lambda job: -work(params, job[0]))
    env = {**os.environ, **({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"} if jobs > 1 else {})}
    logs = out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    start, running, failed = time.monotonic(), [], []
    while queue or running:
        late = deadline is not None and time.monotonic() - start > deadline
        while queue and len(running) < jobs and not late:
            spec, k = queue.pop(0)
            log = open(logs / f"{parse_spec(spec)[0]}.fold{k}.log", "w")  # noqa: SIM115 (closed when it ends)
            running.append((subprocess.Popen(cv_command(data, spec, [k], out_dir), env=env, stdout=log,
                                             stderr=subprocess.STDOUT), parse_spec(spec)[0], k, log))
        for job in list(running):
            proc, name, k, log = job
            if proc.poll() is None:
                if not late:
                    continue
                proc.kill()
                proc.wait()
                print(f"{name} fold {k}: stopped at the deadline", flush=True)
            elif proc.returncode:
                failed.append(f"{name} fold {k}: see {log.name}")
                print(f"{name} fold {k}: FAILED (exit code {proc.returncode}, {log.name})", flush=True)
            else:
                print(f"{name} fold {k}: done after {time.monotonic() - start:.0f}s", flush=True)
            running.remove(job)
            log.close()
        if late:
            queue.clear()
        time.sleep(1)
    if failed:
        raise SystemExit("failed:\n" + "\n".join(failed))


def summarise(data: str, spec: str, folds: int, out_dir: Path) -> dict | None:
    """The summary over the folds that finished (no fold is run here: their params and data must match)."""
    name = parse_spec(spec)[0]
    done = finished_folds(out_dir, name, folds, recipe_of(data, spec))
    if not done:
        return None
    subprocess.run(cv_command(data, spec, done, out_dir), check=True, stdout=subprocess.DEVNULL)
    return json.loads((out_dir / "cv" / f"{name}.json").read_text())


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


def paired(results: dict[str, dict], pair: str) -> dict:
    """'A:B': per measure, A's score less B's on every fold both ran (the same held-out slices): mean, standard
    deviation and on how many folds A was higher."""
    a, b = pair.split(":")
    if a not in results or b not in results:
        raise SystemExit(f"--pairs {pair}: both sets must be among --sets and have finished folds")
    fa, fb = ({f["fold"]: f for f in results[n]["per_fold"]} for n in (a, b))
    folds = sorted(fa.keys() & fb.keys())
    out = {"folds": folds}
    for m in CV_METRICS:
        d = np.array([fa[k][m] - fb[k][m] for k in folds])
        out[m] = {"mean": float(d.mean()), "std": float(d.std(ddof=1)) if len(d) > 1 else 0.0,
                  "higher": int((d > 0).sum())}
    return out


def pairs_table(diffs: dict[str, dict]) -> str:
    lines = ["| A against B (folds) | " + " | ".join(f"Δ {m}" for m in CV_METRICS) + " |",
             "|" + "---|" * (len(CV_METRICS) + 1)]
    for pair, d in diffs.items():
        cells = [f"{d[m]['mean']:+.3f} ± {d[m]['std']:.3f} ({d[m]['higher']}/{len(d['folds'])})" for m in CV_METRICS]
        lines.append(f"| {pair.replace(':', ' against ')} ({', '.join(map(str, d['folds']))}) | " + " | ".join(cells)
                     + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a Kaggle-layout folder of labelled slices")
    parser.add_argument("--sets", nargs="+", default=["default", "old_default"],
                        help="'default' (params.yaml), names under params.yaml:sets, or NAME=BASE+KEY=VALUE+...")
    parser.add_argument("--jobs", type=int, default=1, help="folds run at once (one CPU thread each when > 1)")
    parser.add_argument("--partial", nargs="*", default=[], metavar="SET",
                        help="sets summarised over the folds already in OUT_DIR/cv (not run)")
    parser.add_argument("--pairs", nargs="*", default=[], metavar="A:B",
                        help="also report set A less set B fold by fold (both among --sets): the lever A adds")
    parser.add_argument("--deadline", type=float, help="seconds after which running folds are stopped")
    parser.add_argument("--run-only", action="store_true",
                        help="run the folds but write no summary (summarise later, e.g. on another machine)")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results",
                        help="where cv/ and accuracy.json / .md go (default: benchmarks/results)")
    args = parser.parse_args()
    folds = load_params(ROOT / "params.yaml").split.folds
    where = args.out_dir / "machine.txt"  # the machine the folds ran on, for a summary written elsewhere
    to_run = [s for s in args.sets if parse_spec(s)[0] not in args.partial]
    if to_run:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        where.write_text(machine() + "\n")
    run_all(args.data, to_run, folds, args.jobs, args.out_dir, args.deadline)
    if args.run_only:
        return
    results = {parse_spec(s)[0]: r for s in args.sets if (r := summarise(args.data, s, folds, args.out_dir))}
    diffs = {pair: paired(results, pair) for pair in args.pairs}
    summary = {"machine": where.read_text().strip() if where.is_file() else machine(), "data": args.data,
               "folds": folds, "sets": args.sets, "pairs": diffs,
               "results": {n: {k: v for k, v in s.items() if k not in ("per_fold", "params")} | {
                   "per_fold": [{k: f[k] for k in (*CV_METRICS, "fold", "seconds")} for f in s["per_fold"]]}
                   for n, s in results.items()}}
    write_json(summary, args.out_dir / "accuracy.json")
    with atomic_output(args.out_dir / "accuracy.md") as tmp:
        tmp.write_text(f"# Cross-validated accuracy ({folds} folds, labelled slices of {args.data})\n\n"
                       f"Machine: {summary['machine']}. Mean ± standard deviation over folds; per-slice Dice "
                       "over the slices that have the class. 'training s / fold' is wall time as run (with "
                       "--jobs, folds side by side, other work beside them): not a speed figure.\n\n"
                       + table(results)
                       + (("\nPaired by fold: set A's score less set B's on the same held-out slices, mean ± std "
                           "over folds (on how many A was higher).\n\n" + pairs_table(diffs)) if diffs else ""))
    print((args.out_dir / "accuracy.md").read_text())


if __name__ == "__main__":
    main()
