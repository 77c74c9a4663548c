"""Per-class logit offsets (model.class_bias): chosen by cross-validation, measured by nested cross-validation.

    covseg cv --raw DATA -S "model.class_bias=[0,0,0,0]" --out benchmarks/results/cv/default_nobias.json
    # (that saves each fold's held-out logits beside its JSON: <out>.fold<k>.logits.npz, not in git)
    python benchmarks/class_bias.py --cv benchmarks/results/cv/default_nobias.json --classes ggo
    python benchmarks/class_bias.py --cv benchmarks/results/cv/selftrain.json --classes ggo \
        --against benchmarks/results/class_bias.default_nobias.ggo.json   # two recipes, fold by fold

Reads the held-out logits `covseg cv` saved beside each fold (trained without an offset, or with it taken
off), chooses offsets (of `--classes`) for each fold on the other folds only, scores the fold without and
with them, and chooses the offsets on all folds: that is the value for params.yaml:model.class_bias.
Never uses test slices. Writes OUT_DIR/class_bias.<cv name>.<classes>.json and .md; benchmarks/accuracy.py
puts them in docs/accuracy.md.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from covseg.atomic import atomic_output, write_json
from covseg.calibration import F1, load_fold_logits, nested_cv
from covseg.errors import CovsegError
from covseg.names import DICE, KAGGLE_F1, SCORED, SHORT

ROOT = Path(__file__).resolve().parents[1]
MEASURES = (*DICE, *F1, KAGGLE_F1)


def delta_cell(after: list[float], before: list[float]) -> str:
    """Mean ± std of the per-fold difference, and on how many folds it is positive."""
    delta = np.asarray(after) - np.asarray(before)
    return f"Δ {delta.mean():+.3f} ± {delta.std(ddof=1):.3f}, {int((delta > 0).sum())}/{len(delta)} up"


def against(result: dict, other: dict, name: str) -> list[str]:
    """Rows comparing `result`'s nested figures (with offsets) with `other`'s, fold by fold."""
    mine, theirs = ({r["fold"]: r["with"] for r in x["per_fold"]} for x in (result, other))
    if set(mine) != set(theirs):
        raise CovsegError(f"--against {name}: its folds {sorted(theirs)} are not these {sorted(mine)}")
    folds = sorted(mine)
    cells = [f"{np.mean([theirs[f][m] for f in folds]):.3f} → {np.mean([mine[f][m] for f in folds]):.3f} "
             f"({delta_cell([mine[f][m] for f in folds], [theirs[f][m] for f in folds])})" for m in MEASURES]
    return [f"Against {name} (each with its own nested offsets), fold by fold:", "",
            "| | " + " | ".join(MEASURES) + " |", "|" + "---|" * (len(MEASURES) + 1),
            f"| {name} → this | {' | '.join(cells)} |", ""]


def report(result: dict, source: str) -> str:
    rows = result["per_fold"]
    lines = [f"# Per-class logit offsets by nested cross-validation ({source})", "",
             "Each fold is scored with offsets chosen on the other folds only. Offsets are for "
             "(ground glass, consolidation, lungs other, background).", "",
             "| fold | offsets chosen on the other folds | " + " | ".join(f"{m} without → with" for m in MEASURES)
             + " |", "|" + "---|" * (len(MEASURES) + 2)]
    for r in rows:
        lines.append(f"| {r['fold']} | {r['class_bias']} | " + " | ".join(
            f"{r['without'][m]:.3f} → {r['with'][m]:.3f}" for m in MEASURES) + " |")
    cells = []
    for m in MEASURES:
        after, before = [r["with"][m] for r in rows], [r["without"][m] for r in rows]
        cells.append(f"{np.mean(before):.3f} → {np.mean(after):.3f} ({delta_cell(after, before)})")
    spread = [f"{np.mean(w):.3f} ± {np.std(w, ddof=1):.3f}" for w in ([r["with"][m] for r in rows] for m in MEASURES)]
    lines += [f"| mean | | {' | '.join(cells)} |", f"| with, mean ± std | | {' | '.join(spread)} |", "",
              f"Offsets chosen on all folds (the value for params.yaml model.class_bias, if adopted): "
              f"{result['class_bias']}", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cv", required=True, type=Path, help="the --out of `covseg cv` (its folds' logits beside it)")
    parser.add_argument("--classes", nargs="+", choices=[SHORT[c] for c in SCORED], default=[SHORT[c] for c in SCORED],
                        help="the classes that get an offset (the others keep 0)")
    parser.add_argument("--against", type=Path, help="another class_bias JSON of the same folds, compared fold by fold")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    start = time.perf_counter()
    try:
        result = nested_cv(load_fold_logits(args.cv), classes=[SHORT.index(c) for c in args.classes])
        text = report(result, f"{args.cv.name}, offsets for {', '.join(args.classes)}")
        if args.against:
            text += "\n".join(against(result, json.loads(args.against.read_text()), args.against.name))
    except CovsegError as exc:
        raise SystemExit(f"error: {exc}") from None
    result |= {"cv": str(args.cv), "seconds": round(time.perf_counter() - start, 1)}
    stem = f"class_bias.{args.cv.stem}.{'+'.join(args.classes)}"
    write_json(result, args.out_dir / f"{stem}.json")
    with atomic_output(args.out_dir / f"{stem}.md") as tmp:
        tmp.write_text(text)
    print((args.out_dir / f"{stem}.md").read_text())


if __name__ == "__main__":
    main()
