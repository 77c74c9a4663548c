"""Start and stop the servers that tests need, on 127.0.0.1 only, by PID (process group)."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
# The test S3 endpoint's bucket and dummy credentials (moto takes any).
S3_BUCKET = "covseg-test"
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "covseg-test-key", "AWS_SECRET_ACCESS_KEY": "covseg-test-secret"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


def stop(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM the process group, then SIGKILL what is left."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


@contextmanager
def mlflow_server(root: Path, artifacts: str | None = None, env: dict | None = None):
    """`mlflow server` storing artifacts in `artifacts` (default: root/artifacts; s3://... too), run in this
    environment updated by `env` (S3 credentials and MLFLOW_S3_ENDPOINT_URL, say); yields its URI."""
    port = free_port()
    log = open(root / "mlflow-server.log", "w")
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", artifacts or str(root / "artifacts"), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", **(env or {})})
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)
        log.close()


@contextmanager
def prefect_server(root: Path, env: dict):
    """A Prefect server on 127.0.0.1; sets PREFECT_API_URL in `env` for the commands that follow."""
    port = free_port()
    env.update(PREFECT_HOME=str(root / "prefect-home"), PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_WORKER_QUERY_SECONDS="2",
               PREFECT_UI_ENABLED="false",
               # many workers on one SQLite database: wait longer for its lock, and clients retry its 503s
               PREFECT_SERVER_DATABASE_TIMEOUT="60", PREFECT_CLIENT_MAX_RETRIES="10")
    log = open(root / "prefect-server.log", "w")
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port),
                             "--analytics-off"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **env})
    try:
        wait_healthy(f"http://127.0.0.1:{port}/api/health", proc)
        yield env["PREFECT_API_URL"]
    finally:
        stop(proc)
        log.close()


@contextmanager
def prefect_workers(root: Path, env: dict, pool: str, count: int, pins: list[str] | None = None):
    """`count` process workers on `pool`, one flow run at a time each (one per GPU); worker i is started
    with CUDA_VISIBLE_DEVICES=pins[i] when `pins` are given, as infra/start-gpu-worker.sh pins them."""
    procs = []
    try:
        for i in range(count):
            log = open(root / f"worker-{i}.log", "w")
            pin = {"CUDA_VISIBLE_DEVICES": pins[i]} if pins else {}
            procs.append(subprocess.Popen(
                [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--limit", "1", "--name", f"worker-{i}"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **env, **pin}))
        yield procs
    finally:
        for proc in procs:  # workers before the server
            stop(proc)


@contextmanager
def covseg_server(root: Path, model_uri: str | None, env: dict, device: str = "cpu"):
    """`covseg serve` of `model_uri` (None: the champion, models:/<registry.model_name>@champion) on the
    project's params.yaml, in this environment updated by `env` (MLFLOW_TRACKING_URI: the store); its output
    goes to root/covseg-serve.log. Yields its URL (POST {url}/invocations)."""
    port = free_port()
    log = open(root / "covseg-serve.log", "w")
    model = ["--model", model_uri] if model_uri else []
    proc = subprocess.Popen(
        [str(BIN / "covseg"), "--params", str(ROOT / "params.yaml"), "serve", *model, "--host", "127.0.0.1",
         "--port", str(port), "--device", device],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", **env})
    try:
        wait_healthy(f"http://127.0.0.1:{port}/ping", proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)
        log.close()


@contextmanager
def s3_server(root: Path):
    """moto's AWS server (`moto_server`) on 127.0.0.1, an S3 endpoint that takes any credentials;
    yields its endpoint URL (DVC's `endpointurl`, MLflow's MLFLOW_S3_ENDPOINT_URL)."""
    port = free_port()
    log = open(root / "s3-server.log", "w")
    proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}/moto-api/data.json", proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)
        log.close()


def s3_client(url: str):
    """A boto3 S3 client of the endpoint at `url`, with the test credentials."""
    import boto3

    return boto3.client("s3", endpoint_url=url, aws_access_key_id=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"])
