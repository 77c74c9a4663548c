"""The code MLflow logs with the registry model and runs to load it (MLflow "models from code").

It holds no model logic: it hands MLflow covseg's `SegmenterModel` (src/covseg/serving.py), so the
network is rebuilt by the installed covseg from the weights-only checkpoint; no Python object is
pickled. Loading the model therefore needs covseg installed (`mlflow models serve --env-manager local`
in covseg's environment).
"""
import mlflow

from covseg.serving import SegmenterModel

mlflow.models.set_model(SegmenterModel())
