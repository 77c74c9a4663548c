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

from covseg.config import load_params
from covseg.data import DataError

DEFAULTS = {"raw": "data/raw", "processed": "data/processed", "model": "models/model.pt",
            "history": "reports/train_history.csv", "validation": "reports/validation.json",
            "metrics": "reports/metrics.json", "evaluation": "reports/evaluation", "submission": "submission"}


def _write_json(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    tmp.replace(path)


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
    from covseg.validation import ContractError, summary, validate_raw, write_report

    try:
        report = validate_raw(load_raw(args.raw), params)
    except ContractError as exc:
        write_report(exc.report, args.report)
        print(f"validation report: {args.report}", file=sys.stderr)
        raise
    write_report(report, args.report)
    print(summary(report))


def cmd_preprocess(args, params) -> None:
    from covseg.data import load_raw
    from covseg.preprocessing import lesion_burden, preprocess
    from covseg.validation import summary, validate_processed

    raw = load_raw(args.raw)
    out = Path(args.out)
    staging = out.with_name(f".{out.name}.staging")
    split = preprocess(raw, staging, params)
    try:
        from covseg.data import one_hot_to_index

        n_cons = int((lesion_burden(one_hot_to_index(raw.masks))[:, 1] > 0).sum())
        print(summary(validate_processed(staging, params, len(raw.images), n_cons)))
    except Exception:
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
        raise
    from covseg.data import replace_dir

    replace_dir(staging, out)
    print(f"{len(split['train_index'])} train / {len(split['val_index'])} validation slices "
          f"({split['train_with_consolidation']} / {split['val_with_consolidation']} with consolidation), "
          f"{len(split['test_slice_ids'])} test -> {out}")


def cmd_train(args, params) -> None:
    from covseg.preprocessing import load_processed
    from covseg.training import train

    x_train, y_train = load_processed(args.data, "train")
    x_val, y_val = load_processed(args.data, "val")
    model_path, history_path = Path(args.model), Path(args.history)
    partial = model_path.with_name(f".{model_path.name}.partial")
    history = train(params, x_train, y_train, x_val, y_val, partial)
    history_path.parent.mkdir(parents=True, exist_ok=True)
    history.to_csv(history_path.with_name(f".{history_path.name}.tmp"), index=False)
    history_path.with_name(f".{history_path.name}.tmp").replace(history_path)
    partial.replace(model_path)
    best = history.loc[history["val_kaggle_f1"].idxmax()]
    print(f"best epoch {int(best['epoch'])}: val_kaggle_f1 {best['val_kaggle_f1']:.4f} -> {model_path}")


def cmd_evaluate(args, params) -> None:
    import numpy as np
    import pandas as pd

    from covseg import plots
    from covseg.data import replace_dir
    from covseg.evaluation import confusion_matrix, per_slice_table, summary_metrics, trivial_kaggle_f1
    from covseg.model import load_checkpoint, pick_device, predict_labels
    from covseg.preprocessing import load_processed

    device = pick_device(params["train"]["device"])
    model, ckpt = load_checkpoint(args.model, device)
    images, labels = load_processed(args.data, "val")
    preds = predict_labels(model, images, ckpt.get("scale", 1.0), params["evaluate"]["batch_size"], device)
    cm = confusion_matrix(labels, preds)
    split = json.loads((Path(args.data) / "split.json").read_text())
    metrics = {**summary_metrics(cm), "trivial_kaggle_f1": trivial_kaggle_f1(labels),
               "best_epoch": int(ckpt.get("epoch", 0)), "val_slices": len(labels)}

    out = Path(args.out)
    staging = out.with_name(f".{out.name}.staging")
    table = per_slice_table(labels, preds, split["val_slice_ids"])
    staging.mkdir(parents=True, exist_ok=True)
    table.to_csv(staging / "per_slice.csv", index=False)
    from covseg.evaluation import SHORT

    pd.DataFrame(cm, index=SHORT, columns=SHORT).rename_axis("label").to_csv(staging / "confusion_matrix.csv")
    history = pd.read_csv(args.history)
    plots.loss_curves(history, staging / "loss_curves.png")
    plots.confusion(cm, staging / "confusion_matrix.png")
    burden = (labels <= 1).reshape(len(labels), -1).mean(1)
    for rank, i in enumerate(np.argsort(-burden)[: params["evaluate"]["overlays"]]):
        sid = split["val_slice_ids"][i]
        plots.overlay(images[i], labels[i], preds[i], f"slice {sid}: kaggle_f1 {table.loc[i, 'kaggle_f1']:.3f}",
                      staging / f"overlay_{rank:02d}_slice{sid}.png")
    replace_dir(staging, out)
    _write_json(metrics, Path(args.metrics))
    print(f"validation kaggle_f1 {metrics['kaggle_f1']:.4f} (ground glass {metrics['f1_ggo']:.4f}, "
          f"consolidation {metrics['f1_consolidation']:.4f}; pooled {metrics['pooled_f1']:.4f}; "
          f"constant predictor {metrics['trivial_kaggle_f1']:.4f}) -> {args.metrics}, {out}/")


def cmd_submit(args, params) -> None:
    import numpy as np

    from covseg.data import index_to_one_hot
    from covseg.model import load_checkpoint, pick_device, predict_labels
    from covseg.preprocessing import load_processed
    from covseg.submission import submission_table, write_submission
    from covseg.validation import summary, validate_submission

    device = pick_device(params["train"]["device"])
    model, ckpt = load_checkpoint(args.model, device)
    images, _ = load_processed(args.data, "test")
    preds = predict_labels(model, images, ckpt.get("scale", 1.0), params["evaluate"]["batch_size"], device)
    out = Path(args.out)
    csv_path = out / "submission.csv"
    table = submission_table(preds)
    print(summary(validate_submission(table, preds.size * 2, csv_path)))
    write_submission(table, csv_path, preds.shape)
    masks_path = out / "test_masks.npy"
    np.save(masks_path.with_name(".test_masks.tmp.npy"), index_to_one_hot(preds))
    masks_path.with_name(".test_masks.tmp.npy").replace(masks_path)
    print(f"{len(table):,} rows for {len(preds)} test images -> {csv_path}; masks -> {masks_path}")


# ----------------------------------------------------------------------------------- parser


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
    p.add_argument("--data", default=DEFAULTS["processed"])
    p.add_argument("--model", default=DEFAULTS["model"])
    p.add_argument("--history", default=DEFAULTS["history"])
    p.add_argument("--metrics", default=DEFAULTS["metrics"])
    p.add_argument("--out", default=DEFAULTS["evaluation"])
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("submit", help="stage: predict the test images, write the competition CSV and masks")
    p.add_argument("--data", default=DEFAULTS["processed"])
    p.add_argument("--model", default=DEFAULTS["model"])
    p.add_argument("--out", default=DEFAULTS["submission"])
    p.set_defaults(func=cmd_submit)
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
