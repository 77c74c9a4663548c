"""What a registered version was trained on: tags with the data version and the ids of its training slices
(inline when short, else the run artifact `training_slices.json`; their sha256 and count always). The gate
reads the data version."""
from __future__ import annotations

import hashlib
import json

from mlflow import MlflowClient

from covseg.names import (
    TAG_DATA_VERSION,
    TAG_TRAIN_SLICES,
    TAG_TRAIN_SLICES_COUNT,
    TAG_TRAIN_SLICES_SHA256,
    TRAINING_SLICES_FILE,
)

INLINE_IDS_MAX_CHARS = 1000  # longer lists of training slice ids go to the run artifact


def slices_digest(ids) -> str:
    """sha256 of the sorted slice ids (as the JSON list `[1,2,3]`)."""
    return hashlib.sha256(json.dumps(sorted(int(i) for i in ids), separators=(",", ":")).encode()).hexdigest()


def record_provenance(name: str, version: int, run_id: str, data_version: str, train_slice_ids) -> dict:
    """Tag `version` with what it was trained on: the data version, the training slice ids (inline when
    short, else the run artifact TRAINING_SLICES_FILE), their sha256 and count. Returns the tags."""
    client = MlflowClient()
    ids = sorted(int(i) for i in train_slice_ids)
    text = ",".join(map(str, ids))
    tags = {TAG_DATA_VERSION: data_version, TAG_TRAIN_SLICES_SHA256: slices_digest(ids),
            TAG_TRAIN_SLICES_COUNT: str(len(ids))}
    if len(text) <= INLINE_IDS_MAX_CHARS:
        tags[TAG_TRAIN_SLICES] = text
    else:
        client.log_dict(run_id, {"data_version": data_version, "train_slice_ids": ids}, TRAINING_SLICES_FILE)
        if TAG_TRAIN_SLICES in client.get_model_version(name, str(version)).tags:
            client.delete_model_version_tag(name, str(version), TAG_TRAIN_SLICES)
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, value)
    return tags
