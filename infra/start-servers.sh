#!/usr/bin/env bash
# Start the team's MLflow tracking server and Prefect server on this host, create the work pools and
# deploy the flows from infra/prefect.yaml. Stop them with infra/stop.sh.
#
#   COVSEG_HOST      address to listen on (default 127.0.0.1; 0.0.0.0 to serve other machines)
#   MLFLOW_PORT      default 5000        PREFECT_PORT   default 4200
#   MLFLOW_BACKEND   default sqlite:///$PWD/.servers/mlflow.db (e.g. postgresql://mlflow:pw@db/mlflow)
#   MLFLOW_ARTIFACTS default $PWD/.servers/mlartifacts (or s3://bucket/path)
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
HOST=${COVSEG_HOST:-127.0.0.1}
MLFLOW_PORT=${MLFLOW_PORT:-5000}
PREFECT_PORT=${PREFECT_PORT:-4200}
STATE=$PWD/.servers
mkdir -p "$STATE"
export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true PREFECT_SERVER_ANALYTICS_ENABLED=false

setsid mlflow server --backend-store-uri "${MLFLOW_BACKEND:-sqlite:///$STATE/mlflow.db}" \
    --artifacts-destination "${MLFLOW_ARTIFACTS:-$STATE/mlartifacts}" \
    --host "$HOST" --port "$MLFLOW_PORT" --workers 2 >"$STATE/mlflow.log" 2>&1 &
echo $! >"$STATE/mlflow.pid"
setsid prefect server start --host "$HOST" --port "$PREFECT_PORT" --analytics-off >"$STATE/prefect.log" 2>&1 &
echo $! >"$STATE/prefect.pid"

wait_for() { for _ in $(seq 120); do curl -fs "$1" >/dev/null && return 0; sleep 1; done; echo "no answer from $1" >&2; exit 1; }
wait_for "http://127.0.0.1:$MLFLOW_PORT/health"
wait_for "http://127.0.0.1:$PREFECT_PORT/api/health"

export PREFECT_API_URL="http://127.0.0.1:$PREFECT_PORT/api"
for pool in gpu control; do
    prefect work-pool inspect "$pool" >/dev/null 2>&1 || prefect work-pool create "$pool" --type process
done
COVSEG_REPO=${COVSEG_REPO:-$PWD} prefect --no-prompt deploy --all --prefect-file infra/prefect.yaml
cat <<MSG
MLflow:  http://$HOST:$MLFLOW_PORT    Prefect: http://$HOST:$PREFECT_PORT
On each GPU machine:   PREFECT_API_URL=http://<this host>:$PREFECT_PORT/api \\
                       MLFLOW_TRACKING_URI=http://<this host>:$MLFLOW_PORT  bash infra/start-gpu-worker.sh
MSG
