"""Speed and memory of `covseg predict`: seconds per 512x512 slice, per 100-slice NIfTI volume, peak RSS.

    python benchmarks/predict.py [--model models/model.pt] [--slices 100] [--jit]

The volume is made of the real slices in ../shared/data/medseg (repeated to --slices) when that
folder exists, else of synthetic ones (covseg.data.synthesize). Per-slice time is the model alone
(windowing, batches of predict.batch_size, argmax, under torch.inference_mode), and "before" the same
without the speed work (one slice per forward pass, autograd on); the volume time is the
whole `covseg.predict.predict_scans` run (read the NIfTI, predict, write labels, overlays and report).
`--jit` also times a TorchScript trace of the model, an optional speed-up. Writes
benchmarks/results/predict.json.
"""
from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import machine  # benchmarks/machine.py

from covseg.atomic import write_json
from covseg.names import PATHS, RAW_IMAGES
from covseg.params import load_params

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "medseg"


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def slices(n: int, size: int = 512) -> tuple[np.ndarray, str]:
    """(n, size, size) HU slices: real ones repeated when the MedSeg folder exists, else synthetic."""
    if (REAL / RAW_IMAGES).is_file():
        images = np.load(REAL / RAW_IMAGES, mmap_mode="r")
        index = np.arange(n) % len(images)
        return np.asarray(images[index, ..., 0], dtype=np.float32), f"{REAL / RAW_IMAGES} (repeated)"
    from covseg.data import synthesize

    images, _, _ = synthesize(n_labelled=max(n, 2), n_test=1, size=size, seed=0)
    return images[:n, ..., 0].astype(np.float32), "covseg.data.synthesize"


def time_per_slice(model, hu: np.ndarray, batch_size: int, device, repeat: int) -> float:
    from covseg.params import Window
    from covseg.predict import segment

    win = Window(hu_min=-1000.0, hu_max=400.0)
    segment(model, hu[:batch_size], win, batch_size, device)  # warm up
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        segment(model, hu, win, batch_size, device)
        best = min(best, time.perf_counter() - start)
    return best / len(hu)


def time_before(model, hu: np.ndarray, device, repeat: int) -> float:
    """The speed work undone: one slice per forward pass, autograd on (a training loop's forward)."""
    import torch

    from covseg.preprocessing import window

    x = torch.from_numpy(window(hu, -1000.0, 400.0))[:, None].to(device)
    with torch.enable_grad():
        model(x[:1]).argmax(1)  # warm up
        best = float("inf")
        for _ in range(repeat):
            start = time.perf_counter()
            for i in range(len(x)):
                model(x[i:i + 1]).argmax(1)
            best = min(best, time.perf_counter() - start)
    return best / len(hu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / PATHS.model), help="a checkpoint or MLflow model URI")
    parser.add_argument("--slices", type=int, default=100, help="slices in the volume (default 100)")
    parser.add_argument("--timing-slices", type=int, default=8, help="slices timed for the per-slice figure")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, help="torch threads (default: predict.threads)")
    parser.add_argument("--jit", action="store_true", help="also time a TorchScript trace of the model")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "predict.json"))
    args = parser.parse_args()

    import nibabel as nib
    import torch

    from covseg.model import pick_device
    from covseg.modelstore import load
    from covseg.predict import predict_scans

    params = load_params(ROOT / PATHS.params)
    pp = params.predict
    if args.threads is not None:
        pp = params.override({"predict.threads": args.threads}).predict
    if pp.threads:
        torch.set_num_threads(pp.threads)
    device = pick_device(pp.device)
    rss_start = peak_rss_mb()
    start = time.perf_counter()
    model, _ = load(args.model, device)
    load_s = time.perf_counter() - start
    hu, source = slices(args.slices)
    result = {"machine": machine(),
              "model": args.model, "device": str(device), "threads": torch.get_num_threads(),
              "batch_size": pp.batch_size, "slice_size": list(hu.shape[1:]), "data": source,
              "model_load_s": round(load_s, 2), "rss_before_model_mb": rss_start}
    timed = hu[:args.timing_slices]
    result["seconds_per_slice"] = round(time_per_slice(model, timed, pp.batch_size, device, args.repeat), 4)
    print(f"model: {result['seconds_per_slice']:.3f} s per {hu.shape[1]}x{hu.shape[2]} slice", flush=True)
    result["seconds_per_slice_before"] = round(time_before(model, timed, device, args.repeat), 4)
    print(f"before (batch 1, autograd on): {result['seconds_per_slice_before']:.3f} s per slice", flush=True)
    if args.jit:
        with torch.inference_mode():
            traced = torch.jit.trace(model, torch.zeros(pp.batch_size, 1, *hu.shape[1:], device=device))
        result["seconds_per_slice_jit"] = round(time_per_slice(traced, timed, pp.batch_size, device,
                                                               args.repeat), 4)
        print(f"TorchScript: {result['seconds_per_slice_jit']:.3f} s per slice", flush=True)

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "volume.nii.gz"
        affine = np.array([[0, -0.8, 0, 0], [-0.8, 0, 0, 0], [0, 0, 2.5, 0], [0, 0, 0, 1.0]])  # display order
        nib.save(nib.Nifti1Image(np.moveaxis(hu, 0, 2).astype(np.int16), affine), path)
        start = time.perf_counter()
        run = predict_scans([path], Path(folder) / "out", model, pp, params.window, progress=False)
        volume_s = time.perf_counter() - start
    if run["failed"]:
        raise SystemExit(f"the benchmark volume failed: {run['failed']}")
    result.update({"volume_slices": len(hu), "seconds_per_volume": round(volume_s, 2),
                   "peak_rss_mb": peak_rss_mb()})
    if len(hu) == 100:
        result["seconds_per_100_slice_volume"] = result["seconds_per_volume"]
    print(f"volume of {len(hu)} slices: {volume_s:.1f} s end to end; peak RSS {result['peak_rss_mb']} MB")
    write_json(result, args.out)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
