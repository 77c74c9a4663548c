"""The `covseg` command line: one subcommand per pipeline stage, plus data and registry commands.

Every stage reads `params.yaml`, takes its inputs and outputs as explicit paths (the ones in
`dvc.yaml`), and writes each output whole or not at all.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from covseg.config import load_params, write_json
from covseg.data import DataError

DEFAULTS = {"raw": "data/raw", "processed": "data/processed", "model": "models/model.pt",
            "history": "reports/train_history.csv", "validation": "reports/validation.json",
            "metrics": "reports/metrics.json", "evaluation": "reports/evaluation", "submission": "submission"}


# ----------------------------------------------------------------------------------- data


def cmd_data_import(args, params) -> None:
    from covseg.data import copy_raw, load_raw, record_with_dvc
    from covseg.validation import summary, validate_raw

    report = validate_raw(load_raw(args.source), params)  # raises before anything is written
    print(summary(report))
    copy_raw(args.source, args.raw)
    print(f"imported {args.source} -> {args.raw}")
    if not args.no_record:
        print(f"recorded with DVC in {args.dvc_file}: md5 {record_with_dvc(args.dvc_file)}")


def cmd_data_synth(args, params) -> None:
    from covseg.data import record_with_dvc, synthesize, write_raw

    s = params["synth"]
    n_labelled, n_test = args.n_labelled or s["n_labelled"], args.n_test or s["n_test"]
    size, seed = args.size or s["size"], s["seed"] if args.seed is None else args.seed
    write_raw(args.raw, *synthesize(n_labelled, n_test, size, seed))
    print(f"wrote {n_labelled} labelled and {n_test} test synthetic {size}x{size} slices (seed {seed}) to {args.raw}")
    if not args.no_record:
        print(f"recorded with DVC in {args.dvc_file}: md5 {record_with_dvc(args.dvc_file)}")


# ----------------------------------------------------------------------------------- stages


def cmd_validate(args, params) -> None:
    from covseg.data import load_raw
    from covseg.validation import ContractError, summary, validate_raw

    try:
        report = validate_raw(load_raw(args.raw), params)
    except ContractError as exc:
        write_json(exc.report, args.report)
        print(f"validation report: {args.report}", file=sys.stderr)
        raise
    write_json(report, args.report)
    print(summary(report))


def cmd_preprocess(args, params) -> None:
    import shutil

    from covseg.data import load_raw, one_hot_to_index, replace_dir
    from covseg.preprocessing import lesion_burden, preprocess
    from covseg.validation import summary, validate_processed

    raw = load_raw(args.raw)
    out = Path(args.out)
    staging = out.with_name(f".{out.name}.staging")
    split = preprocess(raw, staging, params)
    n_consolidation = int((lesion_burden(one_hot_to_index(raw.masks))[:, 1] > 0).sum())
    try:
        print(summary(validate_processed(staging, params, len(raw.images), n_consolidation)))
    except DataError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replace_dir(staging, out)
    print(f"{len(split['train_index'])} train / {len(split['val_index'])} validation slices "
          f"({split['train_with_consolidation']} / {split['val_with_consolidation']} with consolidation), "
          f"{len(split['test_slice_ids'])} test -> {out}")


def cmd_train(args, params) -> None:
    import mlflow

    from covseg import tracking
    from covseg.model import load_checkpoint, save_checkpoint
    from covseg.preprocessing import load_processed
    from covseg.training import train

    x_train, y_train = load_processed(args.data, "train")
    x_val, y_val = load_processed(args.data, "val")
    model_path, history_path = Path(args.model), Path(args.history)
    partial = model_path.with_name(f".{model_path.name}.partial")
    with tracking.start_training_run(params) as run:
        history = train(params, x_train, y_train, x_val, y_val, partial, on_epoch=tracking.log_epoch)
        model, ckpt = load_checkpoint(partial)
        model_uri = tracking.log_model(model, x_val.shape[1:])
        save_checkpoint(model, partial, epoch=ckpt["epoch"], val_kaggle_f1=ckpt["val_kaggle_f1"],
                        mlflow_run_id=run.info.run_id, mlflow_model_uri=model_uri)
        history_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = history_path.with_name(f".{history_path.name}.tmp")
        history.to_csv(tmp, index=False)
        tmp.replace(history_path)
        partial.replace(model_path)
        mlflow.log_artifact(str(history_path))
        mlflow.set_tag("best_epoch", ckpt["epoch"])
    print(f"best epoch {ckpt['epoch']}: val_kaggle_f1 {ckpt['val_kaggle_f1']:.4f} -> {model_path} "
          f"(MLflow run {run.info.run_id})")


def _load_model(spec: str, params: dict):
    """A checkpoint path, or an MLflow model URI (models:/covseg-unet@champion, runs:/...)."""
    from covseg import tracking
    from covseg.model import load_checkpoint, pick_device

    device = pick_device(params["train"]["device"])
    if ":/" in spec:
        return tracking.load_model(spec, device), {}, device
    model, ckpt = load_checkpoint(spec, device)
    return model, ckpt, device


def _scores(model, images, labels, params, device):
    from covseg.evaluation import confusion_matrix
    from covseg.model import predict_labels

    preds = predict_labels(model, images, params["evaluate"]["batch_size"], device)
    return preds, confusion_matrix(labels, preds)


def cmd_evaluate(args, params) -> None:
    import mlflow
    import numpy as np
    import pandas as pd

    from covseg import plots, registry, tracking
    from covseg.data import data_version, replace_dir
    from covseg.evaluation import SHORT, per_slice_table, summary_metrics, trivial_kaggle_f1
    from covseg.preprocessing import load_processed

    model, ckpt, device = _load_model(args.model, params)
    images, labels = load_processed(args.data, "val")
    preds, cm = _scores(model, images, labels, params, device)
    split = json.loads((Path(args.data) / "split.json").read_text())
    metrics = {**summary_metrics(cm), "trivial_kaggle_f1": trivial_kaggle_f1(labels),
               "best_epoch": int(ckpt.get("epoch", 0)), "val_slices": len(labels)}

    out = Path(args.out)
    staging = out.with_name(f".{out.name}.staging")
    staging.mkdir(parents=True, exist_ok=True)
    table = per_slice_table(labels, preds, split["val_slice_ids"])
    table.to_csv(staging / "per_slice.csv", index=False)
    pd.DataFrame(cm, index=SHORT, columns=SHORT).rename_axis("label").to_csv(staging / "confusion_matrix.csv")
    plots.loss_curves(pd.read_csv(args.history), staging / "loss_curves.png")
    plots.confusion(cm, staging / "confusion_matrix.png")
    burden = (labels <= 1).reshape(len(labels), -1).mean(1)
    for rank, i in enumerate(np.argsort(-burden)[: params["evaluate"]["overlays"]]):
        sid = split["val_slice_ids"][i]
        plots.overlay(images[i], labels[i], preds[i], f"slice {sid}: kaggle_f1 {table.loc[i, 'kaggle_f1']:.3f}",
                      staging / f"overlay_{rank:02d}_slice{sid}.png")
    replace_dir(staging, out)

    run_id = ckpt.get("mlflow_run_id")
    if run_id:
        with tracking.resume(run_id, params["tracking"]["experiment"]):
            mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
            mlflow.log_artifacts(str(out), "evaluation")
            if Path(args.validation).is_file():
                mlflow.log_artifact(args.validation)
            tags = {k: round(metrics[k], 6) for k in ("kaggle_f1", "f1_ggo", "f1_consolidation", "pooled_f1")}
            version = registry.register(ckpt["mlflow_model_uri"], run_id, params["registry"]["model_name"],
                                        {**tags, "data_version": data_version(Path("data.dvc"))})
        metrics.update(mlflow_run_id=run_id, model_version=version)
    write_json(metrics, args.metrics)
    print(f"validation kaggle_f1 {metrics['kaggle_f1']:.4f} (ground glass {metrics['f1_ggo']:.4f}, "
          f"consolidation {metrics['f1_consolidation']:.4f}; pooled {metrics['pooled_f1']:.4f}; "
          f"constant predictor {metrics['trivial_kaggle_f1']:.4f}) -> {args.metrics}, {out}/"
          + (f"; registered {params['registry']['model_name']} v{metrics['model_version']}" if run_id else ""))


def cmd_submit(args, params) -> None:
    import gzip
    import shutil
    import tempfile

    import mlflow
    import numpy as np

    from covseg import tracking
    from covseg.data import index_to_one_hot
    from covseg.model import predict_labels
    from covseg.preprocessing import load_processed
    from covseg.submission import submission_table, write_submission
    from covseg.validation import summary, validate_submission

    model, ckpt, device = _load_model(args.model, params)
    images, _ = load_processed(args.data, "test")
    preds = predict_labels(model, images, params["evaluate"]["batch_size"], device)
    out = Path(args.out)
    csv_path = out / "submission.csv"
    table = submission_table(preds)
    print(summary(validate_submission(table, preds.size * 2, csv_path)))
    write_submission(table, csv_path, preds.shape)
    masks_path = out / "test_masks.npy"
    np.save(masks_path.with_name(".test_masks.tmp.npy"), index_to_one_hot(preds))
    masks_path.with_name(".test_masks.tmp.npy").replace(masks_path)
    print(f"{len(table):,} rows for {len(preds)} test images -> {csv_path}; masks -> {masks_path}")
    if ckpt.get("mlflow_run_id"):  # the CSV compresses ~20x; Kaggle takes it zipped as well
        with tempfile.TemporaryDirectory() as tmp:
            gz = Path(tmp) / "submission.csv.gz"
            with open(csv_path, "rb") as src, gzip.open(gz, "wb", compresslevel=3) as dst:
                shutil.copyfileobj(src, dst)
            with tracking.resume(ckpt["mlflow_run_id"], params["tracking"]["experiment"]):
                mlflow.log_artifact(str(gz), "submission")


def cmd_promote(args, params) -> None:
    from covseg import registry, tracking
    from covseg.evaluation import summary_metrics
    from covseg.preprocessing import load_processed

    tracking.configure(params["tracking"]["experiment"])
    reg = params["registry"]
    name = reg["model_name"]
    if args.version and args.force:
        decision = registry.set_champion(name, args.version)
    else:
        images, labels = load_processed(args.data, "val")

        def score(uri: str) -> float:
            model, _, device = _load_model(uri, params)
            return summary_metrics(_scores(model, images, labels, params, device)[1])[reg["promotion_metric"]]

        decision = registry.promote(name, score, reg["promotion_margin"], reg["promotion_metric"], args.version)
    print(f"{name}: {decision['reason']} (champion: v{decision['champion_after']})")
    if args.output:
        write_json(decision, args.output)


# ----------------------------------------------------------------------------------- parser


def _data_and_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=DEFAULTS["processed"])
    p.add_argument("--model", default=DEFAULTS["model"],
                   help="checkpoint, or an MLflow model URI such as models:/covseg-unet@champion")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="covseg", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="bring data in: import a Kaggle-layout folder, or synthesise one")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    imp = data_sub.add_parser("import", help="validate a Kaggle-layout folder, copy it to data/raw, record with DVC")
    imp.add_argument("source")
    syn = data_sub.add_parser("synth", help="write the embedded synthetic data set to data/raw, record with DVC")
    syn.add_argument("--n-labelled", type=int)
    syn.add_argument("--n-test", type=int)
    syn.add_argument("--size", type=int)
    syn.add_argument("--seed", type=int)
    for p, fn in ((imp, cmd_data_import), (syn, cmd_data_synth)):
        p.add_argument("--raw", default=DEFAULTS["raw"])
        p.add_argument("--dvc-file", default="data.dvc")
        p.add_argument("--no-record", action="store_true", help="do not record the new version with DVC")
        p.set_defaults(func=fn)

    p = sub.add_parser("validate", help="stage: the raw-data contract (Great Expectations)")
    p.add_argument("--raw", default=DEFAULTS["raw"])
    p.add_argument("--report", default=DEFAULTS["validation"])
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("preprocess", help="stage: HU window, class indices, stratified split")
    p.add_argument("--raw", default=DEFAULTS["raw"])
    p.add_argument("--out", default=DEFAULTS["processed"])
    p.set_defaults(func=cmd_preprocess)

    p = sub.add_parser("train", help="stage: train the U-Net, keep the best checkpoint")
    p.add_argument("--data", default=DEFAULTS["processed"])
    p.add_argument("--model", default=DEFAULTS["model"])
    p.add_argument("--history", default=DEFAULTS["history"])
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="stage: validation metrics, per-slice table, plots")
    _data_and_model(p)
    p.add_argument("--history", default=DEFAULTS["history"])
    p.add_argument("--metrics", default=DEFAULTS["metrics"])
    p.add_argument("--validation", default=DEFAULTS["validation"], help="the validation report, logged with the run")
    p.add_argument("--out", default=DEFAULTS["evaluation"])
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("submit", help="stage: predict the test images, write the competition CSV and masks")
    _data_and_model(p)
    p.add_argument("--out", default=DEFAULTS["submission"])
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("promote", help="registry: challenger vs champion on the validation data, by a metric gate")
    p.add_argument("--data", default=DEFAULTS["processed"])
    p.add_argument("--version", type=int, help="the version to consider (default: the newest)")
    p.add_argument("--force", action="store_true", help="with --version: make it champion by hand (roll back)")
    p.add_argument("--output", help="write the decision as JSON here")
    p.set_defaults(func=cmd_promote)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        params = load_params(args.params)
        start = time.perf_counter()
        args.func(args, params)
        print(f"[covseg {args.command}] done in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    except (DataError, FileNotFoundError) as exc:
        print(f"covseg {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
