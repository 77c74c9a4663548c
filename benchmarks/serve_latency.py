"""REST round trip of `covseg serve` for one slice, per model size, against an embedded store.

    python benchmarks/serve_latency.py [--size 512] [--repeats 5] [--out FILE]

For each model (tiny: base_channels 4, depth 2; default width: base_channels 16, depth 4; both at full
resolution, scale 1.0), logs it in covseg's form (covseg.modelstore.log) and registers it, then
serves `models:/covseg-unet@champion` with `covseg serve --device cpu` and
MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false (tests/servers.py starts and stops the server), POSTs one random
(1, 1, size, size) slice as
`{"inputs": ...}` `repeats` times, and compares with the model's own forward pass in this process.
Writes benchmarks/results/serve_latency.json (or --out).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"tiny (base_channels 4, depth 2)": (4, 2), "base_channels 16, depth 4": (16, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve_latency.json")
    args = parser.parse_args()
    import mlflow
    import numpy as np
    import torch
    from mlflow import MlflowClient

    sys.path.insert(0, str(ROOT / "tests"))
    from servers import covseg_server

    from covseg import modelstore, tracking
    from covseg.atomic import write_json
    from covseg.model import Segmenter, UNet
    from covseg.names import CHAMPION, ENV_ALLOW_PICKLE, ENV_TRACKING_URI

    x = np.random.default_rng(0).random((1, 1, args.size, args.size), dtype=np.float32)
    body = json.dumps({"inputs": x.tolist()}).encode()
    results = {}
    for label, (width, depth) in MODELS.items():
        with tempfile.TemporaryDirectory() as tmp:
            uri = f"sqlite:///{tmp}/mlflow.db"
            env = {ENV_TRACKING_URI: uri, ENV_ALLOW_PICKLE: "false"}
            os.environ.update(env)
            torch.manual_seed(0)
            net = Segmenter(UNet(base_channels=width, depth=depth), 1.0).eval()
            tracking.configure("serve-benchmark", uri)
            with mlflow.start_run():
                t = time.perf_counter()
                model_uri = modelstore.log(net, (args.size, args.size))
                log_seconds = time.perf_counter() - t
            version = mlflow.register_model(model_uri, "covseg-unet").version
            MlflowClient().set_registered_model_alias("covseg-unet", CHAMPION, version)
            t = time.perf_counter()
            with torch.no_grad():
                local = net(torch.from_numpy(x)).numpy()
            local_seconds = time.perf_counter() - t
            times = []
            with covseg_server(Path(tmp), "models:/covseg-unet@champion", env) as url:
                for _ in range(args.repeats):
                    request = urllib.request.Request(f"{url}/invocations", data=body,
                                                     headers={"Content-Type": "application/json"})
                    t = time.perf_counter()
                    with urllib.request.urlopen(request, timeout=300) as response:
                        answer = response.read()
                    times.append(time.perf_counter() - t)
            served = np.asarray(json.loads(answer)["predictions"], dtype=np.float32)
            results[label] = {
                "round_trip_seconds_median": round(statistics.median(times), 3),
                "round_trip_seconds_all": [round(s, 3) for s in times],
                "local_forward_seconds": round(local_seconds, 3), "log_model_seconds": round(log_seconds, 2),
                "request_mb": round(len(body) / 1e6, 1), "response_mb": round(len(answer) / 1e6, 1),
                "max_abs_diff_vs_local": float(np.abs(served - local).max())}
            print(label, json.dumps(results[label]), flush=True)
    result = {"size": args.size, "slices_per_request": 1, "repeats": args.repeats, "models": results,
              "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, OMP_NUM_THREADS="
                         f"{os.environ.get('OMP_NUM_THREADS', '(unset)')}"}
    write_json(result, args.out)


if __name__ == "__main__":
    main()
