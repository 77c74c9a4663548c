#!/usr/bin/env bash
# Stop what infra/start-*.sh started on this machine, by PID: workers first, then the servers.
cd "$(dirname "$0")/.."
for f in .servers/worker-*.pid .servers/prefect.pid .servers/mlflow.pid; do
    [ -f "$f" ] || continue
    pid=$(cat "$f")
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    rm -f "$f"
    echo "stopped $(basename "$f" .pid) ($pid)"
done
