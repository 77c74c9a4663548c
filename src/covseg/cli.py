"""The `covseg` command line: parse arguments, load and check params.yaml, call one library function.

The pipeline stages (`dvc.yaml` runs them) are in covseg.stages; the defaults below are the paths
dvc.yaml passes.
"""
from __future__ import annotations

import argparse
import sys
import time

from covseg.errors import CovsegError
from covseg.names import INTENSITIES, PATHS
from covseg.params import Params, compose, load_params


def cmd_data_import(args, params: Params) -> None:
    from covseg.ingest import import_folder
    from covseg.validation import summary

    result = import_folder(args.source, args.raw, params.validate_, None if args.no_record else args.dvc_file)
    print(summary(result["report"]))
    print(f"imported {args.source} -> {args.raw}"
          + (f"; recorded with DVC in {args.dvc_file}: md5 {result['data_version']}" if not args.no_record else ""))
    if not args.no_record:
        _folds(args.raw, args.folds, params)


def cmd_data_import_unlabelled(args, params: Params) -> None:
    from covseg.ingest import import_unlabelled_scans
    from covseg.validation import summary

    result = import_unlabelled_scans(args.sources, args.out, args.raw, params.predict, params.validate_,
                                     args.weak_labels, args.rotate, args.intensity, not args.no_record)
    print(summary(result["report"]))
    print(f"imported {result['slices']} unlabelled slices of {result['groups']} volumes -> {args.out}"
          + (f" (with weak labels from {args.weak_labels})" if args.weak_labels else "")
          + (f"; recorded with DVC in {args.out}.dvc: md5 {result['data_version']}" if not args.no_record else ""))


def _folds(raw: str, path: str, params: Params, force: bool = False) -> None:
    from covseg.preprocessing import write_folds

    if write_folds(raw, path, params.split.folds, params.seed, force):
        print(f"dealt the labelled slices of {raw} into {params.split.folds} folds -> {path} (commit it)")
    else:
        print(f"{path} already fits the labelled slices of {raw}: kept")


def cmd_folds(args, params: Params) -> None:
    _folds(args.raw, args.out, params, args.force)


def cmd_data_synth(args, params: Params) -> None:
    from covseg.ingest import write_synthetic

    given = {f"synth.{k}": getattr(args, k) for k in ("n_labelled", "n_test", "size", "seed")
             if getattr(args, k) is not None}
    s = params.override(given, "covseg data synth options").synth
    result = write_synthetic(args.raw, s, None if args.no_record else args.dvc_file)
    print(f"wrote {s.n_labelled} labelled and {s.n_test} test synthetic {s.size}x{s.size} slices (seed {s.seed}) "
          f"to {args.raw}" + (f"; recorded with DVC in {args.dvc_file}: md5 {result['data_version']}"
                              if not args.no_record else ""))
    if not args.no_record:
        _folds(args.raw, args.folds, params)


def cmd_validate(args, params: Params) -> None:
    from covseg.stages import validate
    from covseg.validation import ContractError, summary

    try:
        report = validate.run(args.raw, args.report, params.validate_)
    except ContractError:
        print(f"validation report: {args.report}", file=sys.stderr)
        raise
    print(summary(report))


def cmd_preprocess(args, params: Params) -> None:
    from covseg.stages import preprocess
    from covseg.validation import summary

    result = preprocess.run(args.raw, args.out, params.window, params.split, args.folds, args.report)
    split = result["split"]
    print(summary(result["contract"]))
    print(f"{len(split['train_index'])} train / {len(split['val_index'])} validation slices "
          f"({split['train_with_consolidation']} / {split['val_with_consolidation']} with consolidation), "
          f"{len(split['test_slice_ids'])} test -> {args.out}")


def cmd_train(args, params: Params) -> None:
    from covseg.stages import train

    result = train.run(args.data, args.model, args.history, params.seed, params.model, params.train,
                       params.tracking, params.flat(), args.state or None)
    scored = "" if result["val_kaggle_f1"] is None else f": val_kaggle_f1 {result['val_kaggle_f1']:.4f}"
    print(f"epoch {result['best_epoch']}{scored} -> {args.model} (MLflow run {result['mlflow_run_id']})")


def cmd_evaluate(args, params: Params) -> None:
    from covseg.stages import evaluate

    m = evaluate.run(args.data, args.model, args.history, args.validation, args.calibration, args.metrics, args.out,
                     params.evaluate, params.tracking, params.train.device)
    if m["calibrated"]:
        print(f"out-of-fold (nested, {m['oof_folds']} folds, {m['oof_slices']} slices): kaggle_f1 {m['kaggle_f1']:.4f} "
              f"+- {m['kaggle_f1_std']:.4f}, Dice ground glass {m['dice_ggo']:.4f}, consolidation "
              f"{m['dice_consolidation']:.4f} (constant predictor {m['trivial_kaggle_f1']:.4f})")
    if "val_kaggle_f1" in m:
        print(f"held-out fold ({m['val_slices']} slices): kaggle_f1 {m['val_kaggle_f1']:.4f}")
    print(f"-> {args.metrics}, {args.out}/")


def cmd_register(args, params: Params) -> None:
    from covseg.atomic import write_json
    from covseg.stages import register

    r = register.run(args.model, args.metrics, args.calibration, args.data, params.registry, params.tracking)
    print(f"{params.registry.model_name} v{r['model_version']} ({'new' if r['new'] else 'already registered'}, "
          f"{'calibrated' if r['calibrated'] else 'not calibrated'}) from MLflow run {r['mlflow_run_id']}")
    if args.output:
        write_json(r, args.output)


def cmd_submit(args, params: Params) -> None:
    from covseg.stages import submit
    from covseg.validation import summary

    result = submit.run(args.data, args.model, args.calibration, args.out, params.evaluate.batch_size,
                        params.tracking, params.train.device)
    print(summary(result["report"]))
    print(f"{result['rows']:,} rows -> {result['csv']}; masks -> {result['masks']}")


def cmd_promote(args, params: Params) -> None:
    from covseg.atomic import write_json
    from covseg.promotion import run_promotion

    decision = run_promotion(params.registry, params.tracking, args.version, args.force, args.allow_data_change)
    champion = "none" if decision["champion_after"] is None else f"v{decision['champion_after']}"
    scores = ""
    if "challenger_score" in decision:
        scores = (f"; out-of-fold {decision['metric']}: v{decision['challenger']} {decision['challenger_score']:.4f} "
                  f"({decision['challenger_oof_slices']} slices)")
        if "champion_score" in decision:
            scores += (f", champion v{decision['champion_before']} {decision['champion_score']:.4f} "
                       f"({decision['champion_oof_slices']} slices)")
    print(f"{params.registry.model_name}: {decision['reason']} (champion: {champion}){scores}")
    if args.output:
        write_json(decision, args.output)


def cmd_cv(args, params: Params) -> None:
    from covseg.crossval import cross_validate, describe

    folds = [int(f) for f in args.folds.split(",")] if args.folds else None
    _, composed = compose(args.override, args.conf)  # what `dvc exp run` with the same -S would run
    out = args.out or f"{PATHS.cv}/{composed.recipe}"
    summary = cross_validate(args.raw, composed, out, folds, args.folds_file)
    print(describe(summary))
    print(f"-> {out}/; then: covseg calibrate --cv {out}" + "".join(f" -S {o}" for o in args.override))


def cmd_calibrate(args, params: Params) -> None:
    from covseg.calibration import calibrate, describe

    _, composed = compose(args.override, args.conf)
    entry = calibrate(args.cv, composed.calibrate, args.out, composed.recipe)
    print(describe(entry))
    print(f"-> {args.out} (commit it: evaluate, submit, predict and the promotion gate read it)")


def cmd_serve(args, params: Params) -> None:
    from covseg import modelstore, serving
    from covseg.model import pick_device
    from covseg.names import CHAMPION

    spec = args.model or f"models:/{params.registry.model_name}@{CHAMPION}"
    device = pick_device(args.device)
    model, _ = modelstore.load(spec, device)
    print(f"serving {spec} on http://{args.host}:{args.port}/invocations ({device})", file=sys.stderr, flush=True)
    serving.serve(model, device, args.host, args.port)


def cmd_predict(args, params: Params) -> None:
    from covseg.names import CHAMPION
    from covseg.predict import predict_scans

    model = args.model or f"models:/{params.registry.model_name}@{CHAMPION}"
    result = predict_scans(args.inputs, args.out, model, params.predict, params.window, progress=not args.quiet)
    ok = [r for r in result["scans"] if r["status"] == "ok"]
    for row in ok:
        grade = "-" if row["severity_grade"] is None else row["severity_grade"]
        print(f"{row['scan']}: {row['slices']} slice(s), involvement "
              + ("-" if row["involvement_percent"] is None else f"{row['involvement_percent']:.1f} %")
              + f", severity grade {grade} -> {args.out}/{row['labels']}")
    print(f"{len(ok)} scan(s) predicted with {model}; report: {result['report']}")
    if result["failed"]:
        raise CovsegError(f"{len(result['failed'])} input(s) failed (listed above and in {result['report']})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="covseg", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=PATHS.params, help=f"params file (default: {PATHS.params})")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="bring data in: import a Kaggle-layout folder, or synthesise one")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    imp = data_sub.add_parser("import", help="validate a Kaggle-layout folder, copy it to data/raw, record with DVC")
    imp.add_argument("source")
    syn = data_sub.add_parser("synth", help="write the embedded synthetic data set to data/raw, record with DVC")
    for flag in ("--n-labelled", "--n-test", "--size", "--seed"):
        syn.add_argument(flag, type=int)
    for p, fn in ((imp, cmd_data_import), (syn, cmd_data_synth)):
        p.add_argument("--raw", default=PATHS.raw)
        p.add_argument("--dvc-file", default=PATHS.dvc_file)
        p.add_argument("--folds", default=PATHS.folds, help=f"the folds file (default: {PATHS.folds})")
        p.add_argument("--no-record", action="store_true",
                       help="do not record the new version with DVC, nor write its folds file")
        p.set_defaults(func=fn)
    unl = data_sub.add_parser(
        "import-unlabelled", help="validate unlabelled scans (NIfTI, DICOM, PNG/JPG, .npy; files or folders), "
                                  f"optionally with weak labels, fit them to {PATHS.raw}'s slices, write them to "
                                  f"{PATHS.unlabelled}, record with DVC")
    unl.add_argument("sources", nargs="+", help="files, folders (searched) or glob patterns")
    unl.add_argument("--weak-labels", metavar="DIR",
                     help="weak labels: one 8-bit grey image a slice in this folder, named as its slice (vol_3.png "
                          "for vol_3.jpg; 0 = none .. 255 = infection); slices must then be images with unique names")
    unl.add_argument("--rotate", type=int, choices=range(4), default=0,
                     help="quarter turns counter-clockwise that bring each slice to the usual axial view "
                          "(front up, patient's right on the left); weak labels turn with it (default 0)")
    unl.add_argument("--intensity", choices=INTENSITIES, default="hu",
                     help="hu: values as read (NIfTI, DICOM; PNG/JPG by predict.png_hu_*); match: 8-bit exports of "
                          "unknown windows, mapped per volume onto the labelled slices' HU inside their lungs' "
                          "bounding box (default hu)")
    unl.add_argument("--raw", default=PATHS.raw, help=f"the labelled data (default: {PATHS.raw})")
    unl.add_argument("--out", default=PATHS.unlabelled,
                     help=f"the folder written, replacing an earlier import there (default: {PATHS.unlabelled})")
    unl.add_argument("--no-record", action="store_true", help="do not record the new version with DVC (in OUT.dvc)")
    unl.set_defaults(func=cmd_data_import_unlabelled)
    p = sub.add_parser("folds", help="deal the labelled slices into split.folds burden-stratified folds, once: "
                       f"{PATHS.folds}, which the pipeline and cross-validation read (commit it)")
    p.add_argument("--raw", default=PATHS.raw)
    p.add_argument("--out", default=PATHS.folds)
    p.add_argument("--force", action="store_true", help="deal them again even if the file fits the data")
    p.set_defaults(func=cmd_folds)

    def stage(name: str, help: str, func, **paths: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        for flag, default in paths.items():
            p.add_argument(f"--{flag}", default=default)
        p.set_defaults(func=func)
        return p

    model_help = "a checkpoint, or an MLflow model URI such as models:/covseg-unet@champion"
    stage("validate", "stage: the raw-data contract (Great Expectations)", cmd_validate,
          raw=PATHS.raw, report=PATHS.validation)
    stage("preprocess", "stage: HU window, class indices, the validation fold of the folds file (of data that "
          "passed validate)", cmd_preprocess, raw=PATHS.raw, report=PATHS.validation, folds=PATHS.folds,
          out=PATHS.processed)
    p = stage("train", "stage: train the U-Net, keep the last (or best) checkpoint", cmd_train,
              data=PATHS.processed, model=PATHS.model, history=PATHS.history)
    p.add_argument("--state", default=PATHS.train_state,
                   help="state saved after every epoch; a killed run resumes from it ('' for none)")
    p = stage("evaluate", "stage: the recipe's out-of-fold metrics (calibration file), plots", cmd_evaluate,
              data=PATHS.processed, model=PATHS.model,
              history=PATHS.history, calibration=PATHS.calibration, metrics=PATHS.metrics,
              validation=PATHS.validation, out=PATHS.evaluation)
    p = stage("submit", "stage: predict the test images, write the competition CSV and masks", cmd_submit,
              data=PATHS.processed, calibration=PATHS.calibration, out=PATHS.submission)
    p.add_argument("--model", default=PATHS.model, help=model_help)

    def recipe_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("-S", dest="override", action="append", default=[], metavar="KEY=VALUE",
                       help="as dvc exp run -S: a recipe (-S recipe=seed) and keys on top (-S train.lr=0.001); "
                            f"composed from {PATHS.conf}/")
        p.add_argument("--conf", default=PATHS.conf, help=f"the recipes' folder (default: {PATHS.conf})")

    p = sub.add_parser("cv", help="k-fold cross-validation of a recipe by the stages, on the labelled slices "
                                  "(never the test slices): out-of-fold logits for `covseg calibrate`")
    p.add_argument("--raw", default=PATHS.raw)
    recipe_args(p)
    p.add_argument("--folds", help="only these folds, comma-separated (default: all split.folds)")
    p.add_argument("--folds-file", default=PATHS.folds, help=f"the folds (default: {PATHS.folds})")
    p.add_argument("--out", help=f"the run's folder (default: {PATHS.cv}/<recipe>)")
    p.set_defaults(func=cmd_cv)

    p = sub.add_parser("calibrate", help="choose the inference-time choices on the out-of-fold logits of "
                                         "`covseg cv` (nested), write them to the calibration file")
    p.add_argument("--cv", required=True, help="the folder `covseg cv --out` wrote")
    recipe_args(p)
    p.add_argument("--out", default=PATHS.calibration, help=f"the calibration file (default: {PATHS.calibration})")
    p.set_defaults(func=cmd_calibrate)

    p = stage("register", "registry, after dvc repro: log the evaluated model with its calibrated choices and "
              "register it, tagged with its out-of-fold scores and provenance (a new version only for a new model)",
              cmd_register, model=PATHS.model, metrics=PATHS.metrics, calibration=PATHS.calibration,
              data=PATHS.processed)
    p.add_argument("--output", help="write the version and run as JSON here")

    p = sub.add_parser("promote", help="registry: challenger vs champion by a metric gate on their out-of-fold "
                                       "scores (tagged by covseg register); no model is scored")
    p.add_argument("--version", type=int, help="the version to consider (default: the newest)")
    p.add_argument("--force", action="store_true", help="with --version: make it champion by hand (roll back)")
    p.add_argument("--allow-data-change", action="store_true",
                   help="compare versions trained on other (or unknown) data versions")
    p.add_argument("--output", help="write the decision as JSON here")
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser("serve", help="REST: MLflow's scoring server (/invocations) for a registry model, its weights "
                                     "read from the registry (no code of the registry entry runs)")
    p.add_argument("--model", help=f"{model_help} (default: models:/<registry.model_name>@champion)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=5001, help="port (default: 5001)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: auto)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("predict", help="segment your own scans (NIfTI, DICOM, PNG/JPG, .npy): labels, overlays, report")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="files, folders (searched recursively) or glob patterns")
    p.add_argument("--out", required=True, help="folder for the label maps, overlays and report")
    p.add_argument("--model", help=f"{model_help} (default: models:/<registry.model_name>@champion)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_predict)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        params = load_params(args.params)
        start = time.perf_counter()
        args.func(args, params)
        print(f"[covseg {args.command}] done in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    except (CovsegError, FileNotFoundError) as exc:
        print(f"covseg {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
