#!/usr/bin/env bash
# Start the team's MLflow tracking server and Prefect server on this host, create the work pools, deploy
# the flows from infra/prefect.yaml and start the worker of pool `control` (infra/start-control-worker.sh).
# Stop them all with infra/stop.sh.
#
#   COVSEG_HOST      address to listen on (default 127.0.0.1; 0.0.0.0 to serve other machines)
#   COVSEG_AUTH      auto (default): authentication on unless COVSEG_HOST is a loopback address;
#                    1: on; 0: off, refused unless COVSEG_HOST is a loopback address
#   MLFLOW_PORT      default 5000        PREFECT_PORT   default 4200
#   MLFLOW_BACKEND   default sqlite:///$PWD/.servers/mlflow.db (e.g. postgresql://mlflow:pw@db/mlflow)
#   MLFLOW_ARTIFACTS default $PWD/.servers/mlartifacts (or s3://bucket/path)
#   MLFLOW_SERVER_ALLOWED_HOSTS  Host headers MLflow accepts besides loopback and private addresses,
#                    e.g. "mlflow.example.org:*" when clients reach this host by a public name or address
# With authentication on, MLflow runs its basic-auth app (users in .servers/basic_auth.db; the admin is
# created on first start) and Prefect asks every client for PREFECT_API_AUTH_STRING. The credentials
# (MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD, PREFECT_API_AUTH_STRING, MLFLOW_FLASK_SERVER_SECRET_KEY)
# come from the environment or from infra/.env, which infra/secrets.sh writes with random values once.
set -euo pipefail
cd "$(dirname "$0")/.."
HOST=${COVSEG_HOST:-127.0.0.1}
case $HOST in 127.*|::1|localhost) loopback=1 ;; *) loopback=0 ;; esac
case ${COVSEG_AUTH:-auto} in
    auto) AUTH=$((1 - loopback)) ;;
    1) AUTH=1 ;;
    0) if [ "$loopback" = 0 ]; then
           echo "start-servers: COVSEG_HOST=$HOST serves other machines; refusing to start them without" \
                "authentication (COVSEG_AUTH=0). Use COVSEG_AUTH=auto or 1, or a loopback address." >&2
           exit 2
       fi
       AUTH=0 ;;
    *) echo "start-servers: COVSEG_AUTH must be auto, 1 or 0, not '$COVSEG_AUTH'" >&2; exit 2 ;;
esac
# where this host reaches the servers (the health checks, pools, deployments and the control worker)
case $HOST in 0.0.0.0) LOCAL=127.0.0.1 ;; ::) LOCAL="[::1]" ;; *:*) LOCAL="[$HOST]" ;; *) LOCAL=$HOST ;; esac
MLFLOW_PORT=${MLFLOW_PORT:-5000}
PREFECT_PORT=${PREFECT_PORT:-4200}
STATE=$PWD/.servers
for name in mlflow prefect; do
    if [ -f "$STATE/$name.pid" ] && kill -0 "$(cat "$STATE/$name.pid")" 2>/dev/null; then
        echo "start-servers: $name is already running (pid $(cat "$STATE/$name.pid")); stop it with infra/stop.sh" >&2
        exit 1
    fi
done
. .venv/bin/activate
. infra/secrets.sh
mkdir -p "$STATE"
export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true PREFECT_SERVER_ANALYTICS_ENABLED=false

if [ "$AUTH" = 1 ]; then
    secrets_ensure
    secrets_export MLFLOW_TRACKING_USERNAME MLFLOW_TRACKING_PASSWORD PREFECT_API_AUTH_STRING
    for name in MLFLOW_TRACKING_USERNAME MLFLOW_TRACKING_PASSWORD PREFECT_API_AUTH_STRING; do
        [ -n "${!name:-}" ] || { echo "start-servers: $name is neither set nor in $SECRETS_FILE" >&2; exit 1; }
    done
    printf '[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///%s/basic_auth.db\n' "$STATE" \
        >"$STATE/basic_auth.ini"
fi

# Each server in a process group of its own (stop.sh stops the group); server-side secrets go to it alone.
(
    if [ "$AUTH" = 1 ]; then
        secrets_export MLFLOW_FLASK_SERVER_SECRET_KEY
        export MLFLOW_AUTH_CONFIG_PATH=$STATE/basic_auth.ini MLFLOW_AUTH_ADMIN_USERNAME=$MLFLOW_TRACKING_USERNAME \
            MLFLOW_AUTH_ADMIN_PASSWORD=$MLFLOW_TRACKING_PASSWORD
        set -- --app-name basic-auth
    fi
    exec setsid mlflow server --backend-store-uri "${MLFLOW_BACKEND:-sqlite:///$STATE/mlflow.db}" \
        --artifacts-destination "${MLFLOW_ARTIFACTS:-$STATE/mlartifacts}" \
        --host "$HOST" --port "$MLFLOW_PORT" --workers 2 "$@" >"$STATE/mlflow.log" 2>&1
) &
echo $! >"$STATE/mlflow.pid"
(
    if [ "$AUTH" = 1 ]; then export PREFECT_SERVER_API_AUTH_STRING=$PREFECT_API_AUTH_STRING; fi
    # its SQLite database, under many workers at once, waits this long for its lock (else: 503s)
    export PREFECT_SERVER_DATABASE_TIMEOUT=${PREFECT_SERVER_DATABASE_TIMEOUT:-60}
    exec setsid prefect server start --host "$HOST" --port "$PREFECT_PORT" --analytics-off \
        >"$STATE/prefect.log" 2>&1
) &
echo $! >"$STATE/prefect.pid"

fail() { echo "start-servers: $* (infra/stop.sh stops what started)" >&2; exit 1; }
wait_for() {  # NAME URL: until the server answers URL (its health check, open without credentials)
    for _ in $(seq 120); do
        curl -fs "$2" >/dev/null && return 0
        kill -0 "$(cat "$STATE/$1.pid")" 2>/dev/null || { tail -n 20 "$STATE/$1.log" >&2; fail "$1 exited (log: $STATE/$1.log)"; }
        sleep 1
    done
    fail "no answer from $2 within 120 s (log: $STATE/$1.log)"
}
status() {  # URL USER:PASSWORD|"": the HTTP status of a GET (000: no answer), credentials kept off the command line
    local creds=${2//\\/\\\\}
    [ -z "$creds" ] || creds="user = \"${creds//\"/\\\"}\""
    printf '%s\n' "$creds" | curl -s -o /dev/null -w '%{http_code}' -K - "$1" || true
}
check_login() {  # NAME URL USER:PASSWORD HINT: anonymous requests refused, these credentials accepted
    local anonymous with
    anonymous=$(status "$2" "") with=$(status "$2" "$3")
    [ "$anonymous" = 401 ] && [ "$with" = 200 ] ||
        fail "$1 ($2) answered $anonymous without credentials (expected 401) and $with with them (expected 200). $4"
}

MLFLOW_TRACKING_URI="http://$LOCAL:$MLFLOW_PORT"
PREFECT_API_URL="http://$LOCAL:$PREFECT_PORT/api"
export MLFLOW_TRACKING_URI PREFECT_API_URL
wait_for mlflow "$MLFLOW_TRACKING_URI/health"
wait_for prefect "$PREFECT_API_URL/health"
if [ "$AUTH" = 1 ]; then
    hint="A 401: its admin user (.servers/basic_auth.db) has other credentials than MLFLOW_TRACKING_USERNAME/"
    hint+="PASSWORD. A 403: add the host to MLFLOW_SERVER_ALLOWED_HOSTS."
    check_login MLflow "$MLFLOW_TRACKING_URI/api/2.0/mlflow/experiments/search?max_results=1" \
        "$MLFLOW_TRACKING_USERNAME:$MLFLOW_TRACKING_PASSWORD" "$hint"
    check_login Prefect "$PREFECT_API_URL/admin/version" "$PREFECT_API_AUTH_STRING" ""
fi

for pool in gpu control; do
    prefect work-pool inspect "$pool" >/dev/null 2>&1 || prefect work-pool create "$pool" --type process
done
COVSEG_REPO=${COVSEG_REPO:-$PWD} prefect --no-prompt deploy --all --prefect-file infra/prefect.yaml
if [ -f infra/start-control-worker.sh ]; then bash infra/start-control-worker.sh; fi

SHOWN=$HOST
[ "$HOST" != 0.0.0.0 ] && [ "$HOST" != :: ] || SHOWN="<this host>"
echo "MLflow:  http://$SHOWN:$MLFLOW_PORT    Prefect: http://$SHOWN:$PREFECT_PORT    authentication: $([ "$AUTH" = 1 ] && echo on || echo off)"
echo "On each GPU machine:  PREFECT_API_URL=http://$SHOWN:$PREFECT_PORT/api MLFLOW_TRACKING_URI=http://$SHOWN:$MLFLOW_PORT bash infra/start-gpu-worker.sh"
if [ "$AUTH" = 1 ]; then
    echo "  with the credentials of $SECRETS_FILE (copy the file into that checkout, or export"
    echo "  MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD, PREFECT_API_AUTH_STRING); laptops export the same three."
fi
