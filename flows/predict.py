"""Prefect flow `predict`: `covseg predict` over many scans, split into chunks.

    python -m flows.predict INPUT... --out DIR [--model SPEC] [--manifest FILE] [--chunk-size N]
                                              [--deployment predict-chunk/gpu]

The scans (files, folders, glob patterns, and the paths listed in a manifest, one per line, relative to
the manifest's folder) are found once, split into chunks of `predict.chunk_size` scans, and each chunk
calls `covseg.predict.predict_scans` into `DIR/chunks/<k>/` (so parallel chunks never share an output
name): as a flow run of the `predict-chunk/<name>` deployment on its work pool's workers when a
deployment is given (the `predict/control` deployment launches `predict-chunk/gpu`), else as tasks side
by side in this process. One combined report then lands in DIR (report_scans.csv, report_slices.csv,
report.json, label and overlay paths relative to DIR). With workers, the inputs, DIR and a checkpoint
`--model` must be on storage every worker sees at the same path (a registry URI needs no storage).
The flow never re-implements `covseg predict`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import pandas as pd

import covseg  # noqa: F401  (first: it turns telemetry off before Prefect reads its settings)

# time for a local (ephemeral) server's first start on a small machine (as flows.pipeline)
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from covseg.errors import CovsegError, DataError
from covseg.modelstore import is_model_uri
from covseg.names import CHAMPION, PATHS, PREDICT_REPORT_JSON, PREDICT_REPORT_SLICES
from covseg.params import load_params
from covseg.predict import predict_scans, write_report
from covseg.scans import Source, find_sources
from flows.pool import checked_deployment, launch

CHUNKS = "chunks"


def read_manifest(path: str | Path) -> list[str]:
    """Paths in a manifest, one per line ('#' comments and blank lines skipped), relative to its folder."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: manifest file is missing")
    lines = [line.strip() for line in path.read_text().splitlines()]
    return [str(path.parent / line) for line in lines if line and not line.startswith("#")]


def chunked(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _plain(source: Source) -> dict:
    return {"path": str(source.path), "kind": source.kind, "files": [str(f) for f in source.files]}


@task(cache_policy=NO_CACHE)
def list_scans(inputs: list[str], out: str) -> dict:
    """{"sources": [{"path", "kind", "files"}], "failed": [...], "skipped": [...]}: the scans of `inputs`."""
    sources, failed, skipped = find_sources(inputs, exclude=Path(out))
    return {"sources": [_plain(s) for s in sources], "failed": failed, "skipped": skipped}


@task(cache_policy=NO_CACHE)
def predict_chunk(sources: list[dict], out: str, model: str, params_path: str) -> dict:
    """`covseg predict` on one chunk of scans, into `out` (the chunk's own folder)."""
    params = load_params(params_path)
    found = [Source(Path(s["path"]), s["kind"], [Path(f) for f in s["files"]]) for s in sources]
    result = predict_scans(found, out, model, params.predict, params.window, progress=False)
    return {"out": out, "report": str(result["report"]), "ok": sum(r["status"] == "ok" for r in result["scans"]),
            "failed": len(result["failed"])}


@task(cache_policy=NO_CACHE)
def combine_reports(out: str, chunks: list[dict], found: dict, model: str, params_path: str) -> dict:
    """One report in `out` from the chunks' reports; label and overlay paths become relative to `out`."""
    params = load_params(params_path)
    out_dir = Path(out)
    scans = [{"scan": "", "input": f["input"], "format": "", "status": "failed", "error": f["error"]}
             for f in found["failed"]]
    failed, slices = list(found["failed"]), []
    for chunk in chunks:
        folder = Path(chunk["out"])
        prefix = folder.relative_to(out_dir)
        report = json.loads(Path(chunk["report"]).read_text())
        for row in report["scans"]:
            if row["status"] == "ok":
                row["labels"] = str(prefix / row["labels"])
                row["overlays"] = [str(prefix / p) for p in row["overlays"]]
                row["scan"] = f"{prefix.name}/{row['scan']}"
            scans.append(row)
        failed += report["failed"]
        table = pd.read_csv(folder / PREDICT_REPORT_SLICES)  # blanks (no lung) read as NaN, written blank
        table["scan"] = f"{prefix.name}/" + table["scan"].astype(str)
        slices += table.to_dict("records")
    path = write_report(out_dir, scans, slices, failed, found["skipped"], params.predict, params.window,
                        {"model": model, "chunks": [c["out"] for c in chunks]})
    return {"report": str(path), "scans": len(scans), "ok": sum(r["status"] == "ok" for r in scans),
            "failed": len(failed)}


@flow(name="predict-chunk", log_prints=True)
def predict_chunk_run(sources: list[dict], out: str, model: str, params_path: str = PATHS.params) -> dict:
    """One chunk of a `predict` flow run on a pool's worker (the `predict-chunk/gpu` deployment)."""
    result = predict_chunk(sources, out, model, params_path)
    print(f"{result['ok']} scans predicted, {result['failed']} failed -> {out}")
    return result


def _absolute(spec: str) -> str:
    """A checkpoint path made absolute (workers run in another folder); a model URI as it is."""
    return spec if is_model_uri(spec) else str(Path(spec).resolve())


@flow(name="predict", log_prints=True)
def predict(inputs: list[str], out: str, model: str | None = None, manifest: str | None = None,
            chunk_size: int | None = None, params_path: str = PATHS.params,
            deployment: str | None = None) -> dict:
    """Predict many scans in chunks, one combined report in `out`. With a `predict-chunk/<name>`
    `deployment`, each chunk is a flow run on that deployment's pool (as many at once as it has
    workers); without, the chunks are tasks side by side in this process."""
    deployment = checked_deployment(deployment, "predict-chunk", "batch predictions")
    params = load_params(params_path)  # checked before anything runs
    size = chunk_size or params.predict.chunk_size
    if size < 1:
        raise CovsegError(f"chunk_size = {size} is not allowed: must be at least 1")
    model = _absolute(model or f"models:/{params.registry.model_name}@{CHAMPION}")
    out, params_path = str(Path(out).resolve()), str(Path(params_path).resolve())
    inputs = list(inputs) + (read_manifest(manifest) if manifest else [])
    found = list_scans([str(Path(i).absolute()) for i in inputs], out)
    if not found["sources"] and not found["failed"]:
        raise CovsegError(f"no scans found in {', '.join(inputs) or '(no inputs)'}")
    parts = [(part, str(Path(out) / CHUNKS / f"{k:04d}")) for k, part in enumerate(chunked(found["sources"], size))]
    if deployment:
        runs = [launch.submit(deployment, {"sources": part, "out": folder, "model": model, "params_path": params_path})
                for part, folder in parts]
        for run in runs:
            run.result()  # raises if a chunk's run did not complete
        chunks = [{"out": folder, "report": str(Path(folder) / PREDICT_REPORT_JSON)} for _, folder in parts]
    else:
        futures = [predict_chunk.submit(part, folder, model, params_path) for part, folder in parts]
        chunks = [f.result() for f in futures]
    result = combine_reports(out, chunks, found, model, params_path)
    logger = get_run_logger()
    for failure in found["failed"]:
        logger.warning(failure["error"])
    print(f"{result['ok']} of {result['scans']} scans predicted in {len(parts)} chunk(s)"
          f"{' on ' + deployment if deployment else ''}; report: {result['report']}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.predict", description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="*", metavar="INPUT")
    parser.add_argument("--out", required=True)
    parser.add_argument("--model")
    parser.add_argument("--manifest", help="a text file of scan paths, one per line")
    parser.add_argument("--chunk-size", type=int)
    parser.add_argument("--params", default=PATHS.params)
    parser.add_argument("--deployment", help="run each chunk on this predict-chunk/<name> deployment's pool")
    args = parser.parse_args(argv)
    result = predict(args.inputs, args.out, args.model, args.manifest, args.chunk_size, args.params,
                     args.deployment)
    print(json.dumps(result, indent=1))
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
