#!/usr/bin/env bash
# The servers' secrets live in infra/.env (git-ignored, mode 600), as NAME=value lines that docker compose
# reads too (`--env-file infra/.env`):
#   MLFLOW_DB_PASSWORD               PostgreSQL password (compose only)
#   MLFLOW_FLASK_SERVER_SECRET_KEY   MLflow's basic-auth app (CSRF key)
#   MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD   MLflow's admin user: what clients log in with
#   PREFECT_API_AUTH_STRING          user:password that the Prefect server asks of every client
#
#   bash infra/secrets.sh                        write infra/.env with random values, unless it exists
#   . infra/secrets.sh; secrets_export NAME...   export each NAME that the environment lacks from infra/.env
# Both run from the repository root. The file is read, never run as shell code.
SECRETS_FILE=infra/.env

secrets_random() { od -An -vtx1 -N24 /dev/urandom | tr -d ' \n'; }

secrets_ensure() {
    [ -e "$SECRETS_FILE" ] && return 0
    local tmp
    tmp=$(mktemp "$SECRETS_FILE.XXXXXX")  # mode 600
    cat >"$tmp" <<ENV
# covseg servers' secrets, written by infra/secrets.sh. Never commit this file. Clients (workers,
# laptops) need the last three: MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD, PREFECT_API_AUTH_STRING.
MLFLOW_DB_PASSWORD=$(secrets_random)
MLFLOW_FLASK_SERVER_SECRET_KEY=$(secrets_random)
MLFLOW_TRACKING_USERNAME=admin
MLFLOW_TRACKING_PASSWORD=$(secrets_random)
PREFECT_API_AUTH_STRING=admin:$(secrets_random)
ENV
    ln "$tmp" "$SECRETS_FILE" 2>/dev/null || true  # never replaces a file written meanwhile
    rm -f "$tmp"
    echo "secrets: wrote $SECRETS_FILE (random values, mode 600, ignored by git)" >&2
}

secrets_export() {
    local name value
    [ -f "$SECRETS_FILE" ] || return 0
    for name in "$@"; do
        [ -n "${!name:-}" ] && continue
        value=$(grep -m1 "^$name=" "$SECRETS_FILE" || true)
        [ -n "${value#*=}" ] && export "$name=${value#*=}"
    done
    return 0
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    set -euo pipefail
    cd "$(dirname "$0")/.."
    secrets_ensure
fi
