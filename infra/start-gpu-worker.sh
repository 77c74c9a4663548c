#!/usr/bin/env bash
# Start one Prefect worker per GPU of this machine on the work pool `gpu`, each pinned to its GPU
# (CUDA_VISIBLE_DEVICES) and taking one flow run at a time. Needs PREFECT_API_URL and
# MLFLOW_TRACKING_URI pointing at the team's servers (infra/start-servers.sh) and, when those ask for them,
# MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD and PREFECT_API_AUTH_STRING: from the environment, or
# read from infra/.env (a copy of the servers' file).
#   GPUS="0 1"   which GPUs (default: every GPU nvidia-smi lists; "cpu" for a CPU-only worker)
set -euo pipefail
cd "$(dirname "$0")/.."
: "${PREFECT_API_URL:?set PREFECT_API_URL, e.g. http://prefect-host:4200/api}"
: "${MLFLOW_TRACKING_URI:?set MLFLOW_TRACKING_URI, e.g. http://mlflow-host:5000}"
. infra/secrets.sh
secrets_export MLFLOW_TRACKING_USERNAME MLFLOW_TRACKING_PASSWORD PREFECT_API_AUTH_STRING
[ -x .venv/bin/python ] || bash infra/setup.sh
. .venv/bin/activate
export COVSEG_REPO=$PWD DO_NOT_TRACK=true MLFLOW_DISABLE_TELEMETRY=true DVC_NO_ANALYTICS=1
GPUS=${GPUS:-$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | tr '\n' ' ' || true)}
GPUS=${GPUS:-cpu}
mkdir -p .servers
for gpu in $GPUS; do
    if [ "$gpu" = cpu ]; then export CUDA_VISIBLE_DEVICES=""; else export CUDA_VISIBLE_DEVICES=$gpu; fi
    setsid prefect worker start --pool gpu --limit 1 --name "$(hostname)-gpu$gpu" \
        >".servers/worker-$gpu.log" 2>&1 &
    echo $! >".servers/worker-$gpu.pid"
    echo "worker $(hostname)-gpu$gpu started (pid $!, log .servers/worker-$gpu.log)"
done
