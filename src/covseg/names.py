"""Names shared across covseg: classes, metrics, default paths, MLflow tags, environment variables.

One home for each: every module, the flows, the tests and the benchmarks import them from here
(dvc.yaml, which cannot import, is checked against `PATHS` by a test).
"""
from __future__ import annotations

from types import SimpleNamespace

# Classes, in the order of the Kaggle masks' channels; `SHORT` names columns and metrics.
CLASSES = ("ground_glass", "consolidation", "lungs_other", "background")
SHORT = ("ggo", "consolidation", "lungs_other", "background")
NUM_CLASSES = len(CLASSES)
SCORED = (0, 1)  # the classes the competition scores: ground glass, consolidation
MAX_MEMBERS = 16  # the most networks an ensemble (train.members) may hold

# Metrics: the headline ones, logged as tags on registered versions and shown first.
KAGGLE_F1 = "kaggle_f1"  # mean F1 of the scored classes: the competition's score
DICE = tuple(f"dice_{SHORT[c]}" for c in SCORED)  # per-slice mean Dice: how published results are reported
HEADLINE_METRICS = (KAGGLE_F1, "f1_ggo", "f1_consolidation", "pooled_f1", *DICE)
CV_METRICS = (*DICE, "f1_ggo", "f1_consolidation", KAGGLE_F1, "pooled_f1")  # cross-validation: mean and spread

# The pipeline's stages in dvc.yaml, in order (a test checks dvc.yaml against it).
STAGES = ("validate", "preprocess", "train", "evaluate", "submit")

# Default paths, relative to the project root; dvc.yaml passes the same ones.
PATHS = SimpleNamespace(
    params="params.yaml", conf="conf", dvc_file="data.dvc", folds="folds.json", calibration="calibration.json",
    raw="data/raw", unlabelled="data/unlabelled",
    processed="data/processed",
    model="models/model.pt", train_state="models/train_state.pt",
    history="reports/train_history.csv", validation="reports/validation.json",
    metrics="reports/metrics.json", evaluation="reports/evaluation", submission="submission",
    mlflow_db="mlflow.db", mlflow_artifacts="mlartifacts", cv="reports/cv",
)

# Raw files (the Kaggle layout) and processed files.
RAW_IMAGES, RAW_MASKS, RAW_TEST_IMAGES, SLICE_IDS = (
    "images_medseg.npy", "masks_medseg.npy", "test_images_medseg.npy", "slice_ids.json")
# An unlabelled folder (covseg.unlabelled): slices, optional weak labels, one row a slice.
UNLABELLED_IMAGES, UNLABELLED_WEAK, UNLABELLED_SLICES = "images.npy", "weak.npy", "slices.csv"
INTENSITIES = ("hu", "match")  # how an unlabelled import reads values: as HU, or matched to the labelled slices
SUBMISSION_CSV, TEST_MASKS = "submission.csv", "test_masks.npy"  # in PATHS.submission
PARTS = ("train", "val", "test")
SPLIT_FILE = "split.json"


def processed_file(part: str, kind: str) -> str:
    """'train', 'images' -> 'train_images.npy'."""
    return f"{part}_{kind}.npy"


# MLflow tags and registry aliases.
TAG_GIT_COMMIT, TAG_DATA_VERSION, TAG_DVC_EXP, TAG_DVC_ROOT = "git_commit", "data_version", "dvc_exp_name", "dvc_root"
TAG_FLOW_RUN, TAG_BEST_EPOCH, TAG_PROMOTION = "prefect_flow_run_id", "best_epoch", "promotion"
TAG_RECIPE_KEY, TAG_CV_FOLD = "recipe_key", "cv_fold"  # params.recipe_key of a training run and a version
# A registered version's calibration: its recipe key's entry in calibration.json, and the out-of-fold scores of
# that entry (the headline metrics under OOF_PREFIX, the slices and folds they come from, the constant
# predictor's kaggle_f1 on them); the gate compares these, and refuses a version without them.
TAG_CALIBRATED, TAG_CHOICES, OOF_PREFIX = "calibrated", "inference_choices", "oof_"
TAG_OOF_SLICES, TAG_OOF_FOLDS, TAG_OOF_TRIVIAL = "oof_slices", "oof_folds", "oof_trivial_kaggle_f1"
TAG_CUDA_DEVICES = "cuda_visible_devices"  # the GPUs the run was pinned to ("(unset)": all it could see)
CHALLENGER, CHAMPION = "challenger", "champion"
# What a registered version was trained on (its provenance):
# the ids themselves when short, else the run artifact TRAINING_SLICES_FILE; their sha256 and count always.
TAG_TRAIN_SLICES, TAG_TRAIN_SLICES_SHA256, TAG_TRAIN_SLICES_COUNT = (
    "train_slice_ids", "train_slices_sha256", "train_slices_count")
TRAINING_SLICES_FILE = "training_slices.json"

# The registry model's one data file, a weights-only checkpoint (covseg.model.save_checkpoint; covseg.modelstore).
MODEL_CHECKPOINT_FILE = "checkpoint.pt"

# Environment variables covseg reads.
ENV_TRACKING_URI = "MLFLOW_TRACKING_URI"
ENV_FLOW_RUN = "COVSEG_PREFECT_FLOW_RUN_ID"  # set by the flows, becomes TAG_FLOW_RUN
ENV_REPO = "COVSEG_REPO"                    # the checkout the Prefect workers run in
ENV_DEPLOYMENT = "COVSEG_DEPLOYMENT"        # the deployment sweep / cross_validate fan out to
ENV_REAL_DATA = "COVSEG_REAL_DATA"          # tests: a Kaggle-layout folder of real slices
ENV_DVC_ROOT, ENV_DVC_EXP_NAME = "DVC_ROOT", "DVC_EXP_NAME"  # set by DVC for the stages it runs
ENV_ALLOW_PICKLE = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"  # tests: "false", MLflow refuses to unpickle
ENV_CUDA_DEVICES = "CUDA_VISIBLE_DEVICES"  # a GPU worker's pinning (infra/start-gpu-worker.sh)

# `covseg predict`: files it writes under --out (labels are `<scan name>` + LABELS_SUFFIX + the format's suffix).
PREDICT_REPORT_SLICES, PREDICT_REPORT_SCANS, PREDICT_REPORT_JSON = (
    "report_slices.csv", "report_scans.csv", "report.json")
PREDICT_OVERLAYS = "overlays"           # overlays/<scan name>/<scan name>_slice<k>.png
PREDICT_INDEX = "predict_index.json"    # output name -> the input it belongs to (never given to another)
LABELS_SUFFIX = "_labels"
