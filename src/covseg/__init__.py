"""covseg: segment COVID-19 findings in chest CT slices, as a reproducible, tracked pipeline."""
import os

# Telemetry off for every tool we drive (set before any of them is imported).
for _var, _value in {"DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1",
                     "GX_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}.items():
    os.environ.setdefault(_var, _value)
# MLflow's download progress bars would stand between a command and its one line of error.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

__version__ = "0.1.0"
