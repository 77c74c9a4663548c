"""Seconds per training epoch of the default recipe's network (params.yaml) on random slices: the measure by
which two machines' training speeds are compared (docs/performance.md, "Training speed"); writes
benchmarks/results/<name>.json.

    python benchmarks/epoch.py --slices 41 --size 512                          # the real data's training set
    benchmarks/avx2/run python benchmarks/epoch.py --slices 41 --size 512 --name epoch_avx2   # as AVX2 only
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import commit, machine, write_result  # benchmarks/machine.py

ROOT = Path(__file__).resolve().parents[1]


def seconds_per_epoch(slices: int, size: int, epochs: int) -> list[float]:
    """Each epoch's seconds: one network of the default recipe (its scale, batch, augmentation, precision) on
    `slices` random slices of `size` pixels, no validation."""
    from covseg.params import load_params
    from covseg.training import train

    p = load_params(ROOT / "params.yaml")
    t = p.train.model_copy(update={"members": 1, "epochs": epochs})
    rng = np.random.default_rng(0)
    images = rng.random((slices, size, size), dtype=np.float32)
    labels = rng.integers(0, 4, (slices, size, size)).astype(np.uint8)
    none = np.zeros((0, size, size), np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        history = train(t, p.model, p.seed, images, labels, none, none.astype(np.uint8), Path(tmp) / "model.pt")
    return [round(float(s), 2) for s in history["seconds"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=41, help="training slices (default 41: the real data's 4 folds)")
    ap.add_argument("--size", type=int, default=512, help="slice size in pixels (default 512)")
    ap.add_argument("--epochs", type=int, default=3, help="epochs to time; the first is not counted (default 3)")
    ap.add_argument("--name", default="epoch", help="the result's file name under benchmarks/results/")
    args = ap.parse_args()
    started = time.strftime("%Y-%m-%d")
    seconds = seconds_per_epoch(args.slices, args.size, args.epochs)
    steady = seconds[1:] or seconds
    result = {"machine": machine(), "date": started, "commit": commit(ROOT), "slices": args.slices, "size": args.size,
              "epochs_s": seconds, "seconds_per_epoch": round(float(np.median(steady)), 2)}
    write_result(args.name, result)


if __name__ == "__main__":
    main()
