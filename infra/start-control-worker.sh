#!/usr/bin/env bash
# Start the worker of the work pool `control` on this machine (infra/start-servers.sh runs it): it runs
# the fan-out flows (sweep/control, cross_validate/control, predict/control), which launch runs on the
# `gpu` pool, wait for them and then, for cross-validation, download the folds' logits and run
# `covseg calibrate` on the CPU (seconds), so it needs no GPU. Needs PREFECT_API_URL and MLFLOW_TRACKING_URI and,
# when the servers ask for them, the credentials (from the environment or infra/.env, as start-gpu-worker.sh).
#   CONTROL_RUNS   how many fan-out flow runs at once (default 4)
set -euo pipefail
cd "$(dirname "$0")/.."
: "${PREFECT_API_URL:?set PREFECT_API_URL, e.g. http://127.0.0.1:4200/api}"
: "${MLFLOW_TRACKING_URI:?set MLFLOW_TRACKING_URI, e.g. http://127.0.0.1:5000}"
. infra/secrets.sh
secrets_export MLFLOW_TRACKING_USERNAME MLFLOW_TRACKING_PASSWORD PREFECT_API_AUTH_STRING
if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
export COVSEG_REPO=${COVSEG_REPO:-$PWD} CUDA_VISIBLE_DEVICES="" DO_NOT_TRACK=true MLFLOW_DISABLE_TELEMETRY=true \
    DVC_NO_ANALYTICS=1
mkdir -p .servers
setsid prefect worker start --pool control --limit "${CONTROL_RUNS:-4}" --name "$(hostname)-control" \
    >.servers/worker-control.log 2>&1 &
echo $! >.servers/worker-control.pid
echo "worker $(hostname)-control started (pid $!, log .servers/worker-control.log)"
