"""What MLflow tracking adds to one training run, measured piece by piece against an embedded store.

    python benchmarks/tracking_overhead.py [--epochs 40] [--size 512]

Times what the train and evaluate stages and `covseg register` do for tracking (import, run start with all
params, one log_metrics per epoch, the evaluation artifacts, logging the full-size model, registration),
with a default-size U-Net, in a throw-away folder. Writes benchmarks/results/tracking_overhead.json.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    from covseg.atomic import write_json
    from covseg.names import KAGGLE_F1, PATHS, SHORT
    from covseg.params import load_params

    params = load_params(ROOT / PATHS.params)
    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        os.mkdir(".dvc")
        t = time.perf_counter()
        import mlflow

        from covseg import modelstore, registry, tracking
        times["import mlflow"] = time.perf_counter() - t

        from covseg.model import Segmenter, build_model
        model = Segmenter(build_model(params.model), params.train.scale)
        t = time.perf_counter()
        run = tracking.start_training_run(params.tracking.experiment, params.flat())
        times["start run + log all params"] = time.perf_counter() - t
        t = time.perf_counter()
        for epoch in range(1, args.epochs + 1):
            tracking.log_epoch({"epoch": epoch, "train_loss": 1.0, "val_loss": 1.0, "lr": 1e-3,
                                **{f"val_f1_{c}": 0.5 for c in SHORT}, f"val_{KAGGLE_F1}": 0.5, "seconds": 1.0})
        times[f"log_metrics x {args.epochs} epochs"] = time.perf_counter() - t
        mlflow.end_run()
        figures = Path(tmp) / "evaluation"
        figures.mkdir()
        for i in range(8):
            (figures / f"figure{i}.png").write_bytes(os.urandom(250_000))
        t = time.perf_counter()
        with tracking.resume(run.info.run_id, params.tracking.experiment):
            mlflow.log_metrics({KAGGLE_F1: 0.5, "f1_ggo": 0.5})
            mlflow.log_artifacts(str(figures), "evaluation")
        times["evaluate: metrics, 8 figures"] = time.perf_counter() - t
        with tracking.resume(run.info.run_id, params.tracking.experiment):
            t = time.perf_counter()
            uri = modelstore.log(model, (args.size, args.size))
            times["register: log the model (full-size example, signature)"] = time.perf_counter() - t
            t = time.perf_counter()
            registry.register(uri, params.registry.model_name, {KAGGLE_F1: 0.5})
            times["register: the version and a tag"] = time.perf_counter() - t
    result = {"seconds": {k: round(v, 2) for k, v in times.items()},
              "total_seconds": round(sum(times.values()), 1), "epochs": args.epochs, "size": args.size}
    write_json(result, ROOT / "benchmarks" / "results" / "tracking_overhead.json")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
