"""Wall time and peak memory of each pipeline stage, and the metrics evaluate reports, on a data folder.

    python benchmarks/pipeline.py --data ../shared/data/medseg [-S train.epochs=130 ...]

Runs in a throw-away clone of this repository (so data.dvc here is untouched), imports the data,
then `dvc repro --single-item` stage by stage under /usr/bin/time. The metrics are the recipe's out-of-fold
scores when the committed calibration.json has its recipe and data (else `calibrated` is false). Writes JSON
and Markdown under benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import tempfile
import time
from pathlib import Path

import yaml
from machine import machine  # benchmarks/machine.py

from covseg import shell
from covseg.atomic import atomic_output, write_json
from covseg.names import HEADLINE_METRICS, PATHS, STAGES
from covseg.params import compose

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a Kaggle-layout folder")
    parser.add_argument("-S", "--set", action="append", default=[],
                        help="as dvc exp run -S: recipe=NAME or key=value, composed from conf/")
    parser.add_argument("--name", default="pipeline_cpu")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="covseg-bench-")) / "repo"
    try:
        shell.run(["git", "clone", "-q", str(ROOT), str(work)], ROOT)
        tree, _ = compose(args.set, work / PATHS.conf)
        (work / PATHS.params).write_text(yaml.safe_dump(tree, sort_keys=False))
        t = time.time()
        shell.run(["covseg", "data", "import", str(Path(args.data).resolve())], work)
        rows = [{"stage": "data import", "seconds": round(time.time() - t, 1), "peak_rss_mb": None}]
        for stage in STAGES:
            proc = shell.run(["/usr/bin/time", "-f", "BENCH %e %M", "dvc", "repro", "--single-item", stage], work)
            wall, rss = re.findall(r"BENCH ([\d.]+) (\d+)", proc.stderr)[-1]
            rows.append({"stage": stage, "seconds": float(wall), "peak_rss_mb": round(int(rss) / 1024)})
            print(rows[-1], flush=True)
        metrics = json.loads((work / PATHS.metrics).read_text())
    finally:
        shutil.rmtree(work.parent, ignore_errors=True)

    result = {"machine": machine(), "data": str(args.data), "overrides": args.set,
              "date": time.strftime("%Y-%m-%d"), "stages": rows,
              "total_seconds": round(sum(r["seconds"] for r in rows), 1),
              "metrics": {k: metrics.get(k) for k in (
                  "calibrated", *HEADLINE_METRICS, "kaggle_f1_std", "dice_ggo_std", "dice_consolidation_std",
                  "trivial_kaggle_f1", "oof_slices", "train_slices", "epoch")}}
    out = write_json(result, ROOT / "benchmarks" / "results" / f"{args.name}.json")
    lines = [f"# {args.name}: {result['machine']}, {result['date']}", "",
             f"`python benchmarks/pipeline.py --data {args.data} {' '.join('-S ' + s for s in args.set)}`", "",
             "| stage | wall time (s) | peak RSS (MB) |", "|---|---|---|"]
    lines += [f"| {r['stage']} | {r['seconds']} | {r['peak_rss_mb'] or ''} |" for r in rows]
    lines += [f"| **total** | {result['total_seconds']} | |", "",
              "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in result["metrics"].items()]
    with atomic_output(out.with_suffix(".md")) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
