"""Batch prediction over a work pool: the `predict/control` deployment with 1 and with 2 workers.

    python benchmarks/predict_flow.py [--model models/model.pt] [--volumes 8] [--slices 40] [--chunk-size 2]

Starts a Prefect server on 127.0.0.1 (a throw-away PREFECT_HOME), the pools `gpu` and `control`, deploys
infra/prefect.yaml from this checkout, starts the control worker and N process workers on `gpu`, and
times `prefect deployment run predict/control --watch` on the same batch of NIfTI volumes (real MedSeg
slices when ../shared/data/medseg exists, else synthetic), for each N. Each worker runs one chunk at a time
with `predict.threads: 1` (one core each), so on a 2-core machine 2 workers can at best halve the time.
Writes benchmarks/results/predict_flow.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import yaml
from machine import machine  # benchmarks/machine.py

from covseg import shell
from covseg.atomic import write_json
from covseg.names import ENV_REPO, PATHS, PREDICT_REPORT_JSON
from covseg.params import apply_overrides, read_tree

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from predict import slices  # noqa: E402  (benchmarks/predict.py: real slices, else synthetic)
from servers import prefect_server, prefect_workers  # noqa: E402  (the tests' server helpers, 127.0.0.1 only)


def write_volumes(folder: Path, volumes: int, depth: int) -> str:
    hu, source = slices(volumes * depth)
    folder.mkdir(parents=True)
    for v in range(volumes):
        part = np.moveaxis(hu[v * depth:(v + 1) * depth], 0, 2).astype(np.int16)
        nib.save(nib.Nifti1Image(part, np.diag([0.8, 0.8, 2.5, 1.0])), folder / f"ct{v:02d}.nii.gz")
    return source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / PATHS.model), help="a checkpoint or an MLflow model URI")
    parser.add_argument("--volumes", type=int, default=8)
    parser.add_argument("--slices", type=int, default=40, help="512x512 slices per volume")
    parser.add_argument("--chunk-size", type=int, default=2, help="volumes per predict-chunk run")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "predict_flow.json"))
    args = parser.parse_args()
    model = args.model if ":/" in args.model else str(Path(args.model).resolve())

    with tempfile.TemporaryDirectory(prefix="covseg-bench-") as tmp:
        root = Path(tmp)
        source = write_volumes(root / "scans", args.volumes, args.slices)
        tree, _ = apply_overrides(read_tree(ROOT / PATHS.params), {"predict.threads": 1})
        (root / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
        env = {ENV_REPO: str(ROOT), "OMP_NUM_THREADS": "1"}
        result = {"machine": machine(),
                  "data": source, "volumes": args.volumes, "slices_per_volume": args.slices,
                  "chunk_size": args.chunk_size, "model": args.model, "threads_per_worker": 1, "runs": []}
        with prefect_server(root, env):
            for pool in ("gpu", "control"):
                shell.run(["prefect", "work-pool", "create", pool, "--type", "process"], ROOT, env)
            shell.run(["prefect", "--no-prompt", "deploy", "--all", "--prefect-file", "infra/prefect.yaml"], ROOT, env)
            with prefect_workers(root, env, "control", 1):
                for n in args.workers:
                    out = root / f"pred-{n}"
                    with prefect_workers(root, env, "gpu", n):
                        start = time.perf_counter()
                        shell.run(["prefect", "deployment", "run", "predict/control", "--watch", "--params",
                                   json.dumps({"inputs": [str(root / "scans")], "out": str(out), "model": model,
                                               "chunk_size": args.chunk_size,
                                               "params_path": str(root / "params.yaml")})], ROOT, env, timeout=3600)
                        seconds = time.perf_counter() - start
                    report = json.loads((out / PREDICT_REPORT_JSON).read_text())
                    if report["summary"]["failed"]:
                        raise SystemExit(f"{n} workers: {report['failed']}")
                    result["runs"].append({"workers": n, "seconds": round(seconds, 1),
                                           "seconds_per_slice": round(seconds / (args.volumes * args.slices), 3)})
                    print(f"{n} worker(s): {seconds:.1f} s for {args.volumes} x {args.slices} slices", flush=True)
    base = result["runs"][0]["seconds"]
    for run in result["runs"]:
        run["speed_up"] = round(base / run["seconds"], 2)
    write_json(result, args.out)
    print(json.dumps(result["runs"]), f"-> {args.out}")


if __name__ == "__main__":
    main()
