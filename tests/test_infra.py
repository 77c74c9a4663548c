"""infra/: the servers listen where they are told, ask for credentials when exposed, and keep secrets out of git."""
import base64
import os
import re
import shutil
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from servers import free_port

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "infra" / "compose.yaml"
SECRETS = "infra/.env"
# what infra/secrets.sh writes; clients need the last three
SECRET_NAMES = ("MLFLOW_DB_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_TRACKING_USERNAME",
                "MLFLOW_TRACKING_PASSWORD", "PREFECT_API_AUTH_STRING")
CLIENT_NAMES = SECRET_NAMES[2:]


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _default(value: str) -> str:
    """`value` as compose interpolates it with none of its variables set (only ${VAR:-default} survives)."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


def _required_var(value: str) -> str | None:
    """The variable of `value` when it is exactly `${VAR:?message}` (compose refuses to start without it)."""
    found = re.fullmatch(r"\$\{(\w+):\?[^}]+\}", value)
    return found and found.group(1)


def _read_env(path: Path) -> dict:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#"))


def _bash(cmd: str, cwd: Path, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", cmd], cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True,
                          text=True, timeout=timeout)


def _secrets_repo(tmp_path: Path, name: str) -> Path:
    """A git repository with the project's .gitignore and infra/secrets.sh alone."""
    repo = tmp_path / name
    (repo / "infra").mkdir(parents=True)
    shutil.copy(ROOT / "infra" / "secrets.sh", repo / "infra" / "secrets.sh")
    shutil.copy(ROOT / ".gitignore", repo / ".gitignore")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    return repo


# ----------------------------------------------------------------------------- compose.yaml


def test_compose_publishes_ports_on_loopback_only_by_default():
    published = [(name, port) for name, svc in _compose()["services"].items() for port in svc.get("ports", [])]
    assert published, "compose publishes MLflow and Prefect"
    for name, port in published:
        assert isinstance(port, str) and _default(port).startswith("127.0.0.1:"), (name, port)
        assert port.startswith("${COVSEG_HOST:-127.0.0.1}:"), (name, port)


def test_compose_holds_no_password_and_takes_secrets_from_the_environment():
    text = COMPOSE.read_text()
    # no secret variable has a default value in the file
    assert not re.findall(r"\$\{\w*(?:PASSWORD|AUTH_STRING|SECRET)\w*:?-", text)
    services = _compose()["services"]
    assert _required_var(services["db"]["environment"]["POSTGRES_PASSWORD"]) == "MLFLOW_DB_PASSWORD"
    assert "mlflow:mlflow@" not in text


def test_compose_turns_authentication_on():
    services = _compose()["services"]
    mlflow_env, prefect_env, worker_env = (services[s]["environment"] for s in ("mlflow", "prefect", "worker"))
    assert "--app-name basic-auth" in " ".join(services["mlflow"]["command"].split())
    assert _required_var(mlflow_env["MLFLOW_AUTH_ADMIN_USERNAME"]) == "MLFLOW_TRACKING_USERNAME"
    assert _required_var(mlflow_env["MLFLOW_AUTH_ADMIN_PASSWORD"]) == "MLFLOW_TRACKING_PASSWORD"
    assert _required_var(mlflow_env["MLFLOW_FLASK_SERVER_SECRET_KEY"]) == "MLFLOW_FLASK_SERVER_SECRET_KEY"
    assert _required_var(prefect_env["PREFECT_SERVER_API_AUTH_STRING"]) == "PREFECT_API_AUTH_STRING"
    for name in CLIENT_NAMES:  # the GPU worker is a client of both
        assert _required_var(worker_env[name]) == name


# ----------------------------------------------------------------------------- torch >= 2.6 wherever weights load
# torch.load(weights_only=True), which covseg loads every checkpoint and training state with, can be made to run
# code by a crafted file in torch < 2.6 (CVE-2025-32434).

SAFE_TORCH = (2, 6)


def _major_minor(version: str) -> tuple[int, int]:
    found = re.match(r"(\d+)\.(\d+)", version)
    assert found, version
    return int(found.group(1)), int(found.group(2))


def test_every_torch_the_project_installs_has_the_weights_only_fix():
    import tomllib

    worker = _compose()["services"]["worker"]["image"]
    image = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda[\d.]+-cudnn\d+-runtime", worker)
    assert image and _major_minor(image.group(1)) >= SAFE_TORCH, worker
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (torch,) = [d for d in deps if re.match(r"torch\b", d)]
    assert re.fullmatch(r"torch>=[\d.]+", torch) and _major_minor(torch.split(">=")[1]) >= SAFE_TORCH, torch
    pinned = re.search(r"^TORCH_VERSION=\$\{TORCH_VERSION:-([\d.]+)\}$", (ROOT / "infra/setup.sh").read_text(), re.M)
    assert pinned and _major_minor(pinned.group(1)) >= SAFE_TORCH


FAKE_PYTHON = """#!/usr/bin/env bash
# python, pip and uv of a fake .venv: log each call; torch is $FAKE_TORCH (none when empty), inside .venv when
# $FAKE_TORCH_IN_VENV is set (else the machine's own); uv exits with $FAKE_UV_RC
echo "$(basename "$0") $*" >> "$CALLS"
[ "$(basename "$0")" = uv ] && exit "${FAKE_UV_RC:-0}"
case "$*" in
  *"torch.__file__"*) [ -n "$FAKE_TORCH_IN_VENV" ] && echo True ;;
  *"print(torch.__version__)"*) [ -n "$FAKE_TORCH" ] && echo "$FAKE_TORCH" || exit 1 ;;
  *"import torch"*) [ -n "$FAKE_TORCH" ] || exit 1 ;;
esac
"""


def _setup_repo(repo: Path) -> Path:
    """A folder with infra/setup.sh and data in data/raw (setup pulls nothing), no .venv yet."""
    (repo / "infra").mkdir(parents=True)
    shutil.copy(ROOT / "infra" / "setup.sh", repo / "infra" / "setup.sh")
    (repo / "data" / "raw").mkdir(parents=True)
    (repo / "data" / "raw" / "images_medseg.npy").touch()
    return repo


def _setup(tmp_path: Path, installed: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, str]:
    """infra/setup.sh in a copy of the project whose .venv is fakes (python, pip) with torch `installed`
    ('' for none); returns its result and the calls the fakes got."""
    repo = _setup_repo(tmp_path / f"repo-{installed or 'none'}")
    bin_ = repo / ".venv" / "bin"
    bin_.mkdir(parents=True)
    for name in ("python", "pip", "uv"):
        (bin_ / name).write_text(FAKE_PYTHON)
        (bin_ / name).chmod(0o755)
    (bin_ / "activate").write_text(f'export PATH="{bin_}:$PATH"\n')
    calls = tmp_path / f"calls-{installed or 'none'}"
    calls.touch()
    out = _bash("bash infra/setup.sh", repo, {"FAKE_TORCH": installed, "CALLS": str(calls), **(env or {})})
    return out, calls.read_text()


@pytest.mark.parametrize("installed", ["2.5.1+cu124", "2.3.0", "1.13.1+cpu"])
def test_setup_refuses_to_keep_an_installed_torch_older_than_2_6(tmp_path, installed):
    out, calls = _setup(tmp_path, installed)
    assert out.returncode != 0
    assert (f"setup: torch {installed} is older than 2.6, which fixed CVE-2025-32434 (weights_only bypass); "
            f"install torch>=2.6") in out.stderr, out.stderr
    assert "-e .[test]" not in calls and "using the installed torch" not in out.stdout, "stopped before covseg"


def test_setup_refuses_to_install_a_torch_older_than_2_6(tmp_path):
    out, calls = _setup(tmp_path, "", {"TORCH_VERSION": "2.5.1"})
    assert out.returncode != 0 and "setup: torch 2.5.1 is older than 2.6" in out.stderr, out.stderr
    assert "torch==" not in calls


@pytest.mark.parametrize("installed", ["2.6.0+cu124", "2.13.0+cpu", ""])
def test_setup_keeps_or_installs_a_torch_with_the_fix(tmp_path, installed):
    out, calls = _setup(tmp_path, installed)
    assert out.returncode == 0, out.stderr
    assert ("pip install -q -c requirements.lock -e .[test]") in calls
    if installed:
        assert f"setup: using the installed torch {installed}" in out.stdout and "torch==" not in calls
    else:
        assert "pip install -q torch==2.13.0" in calls


@pytest.mark.parametrize(("in_venv", "uv_rc", "installer"), [("1", "0", "uv pip"), ("1", "1", "pip"), ("", "0", "pip")])
def test_setup_installs_the_lock_with_uv_only_beside_its_own_torch(tmp_path, in_venv, uv_rc, installer):
    """uv where torch sits in .venv; pip where uv fails, or where torch is the machine's own (uv would not see it
    and would fetch another build)."""
    out, calls = _setup(tmp_path, "2.13.0+cpu", {"FAKE_TORCH_IN_VENV": in_venv, "FAKE_UV_RC": uv_rc})
    assert out.returncode == 0, out.stderr
    by_uv = "uv pip install -q --compile-bytecode -c requirements.lock -e .[test]"  # .pyc now, not in every process
    by_pip = "pip install -q -c requirements.lock -e .[test]"
    installs = [line for line in calls.splitlines() if line in (by_uv, by_pip)]
    assert installs[-1] == (by_uv if installer == "uv pip" else by_pip), calls
    assert (by_uv in calls) == bool(in_venv), calls


FAKE_BASE_PYTHON = """#!/usr/bin/env bash
# the python that makes .venv ($PYTHON): torch imports; from a virtual environment of its own when
# $FAKE_OTHER_VENV is set (an activated venv), else from the machine's site-packages; `-m venv` makes a fake .venv
echo "base $*" >> "$CALLS"
case "$*" in
  *"-m venv"*) mkdir -p .venv/bin && for n in python pip uv; do cp "$FAKE_VENV_PY" .venv/bin/$n; done
               echo 'export PATH="$PWD/.venv/bin:$PATH"' > .venv/bin/activate ;;
  *base_prefix*) [ -z "$FAKE_OTHER_VENV" ] ;;
esac
"""


@pytest.mark.parametrize("other_venv", ["", "1"])
def test_setup_shares_only_the_machines_own_torch(tmp_path, other_venv):
    """A machine whose Python has torch (a GPU image) gets a .venv that sees it; run from another activated
    virtual environment with torch, setup makes a plain .venv: the new one would see the machine's
    site-packages (other packages, and no torch), not that environment's."""
    repo = _setup_repo(tmp_path / "repo")
    fakes = {"base": tmp_path / "base-python", "venv": tmp_path / "venv-python"}
    fakes["base"].write_text(FAKE_BASE_PYTHON)
    fakes["venv"].write_text(FAKE_PYTHON)
    for f in fakes.values():
        f.chmod(0o755)
    calls = tmp_path / "calls"
    calls.touch()
    out = _bash("bash infra/setup.sh", repo, {"PYTHON": str(fakes["base"]), "FAKE_VENV_PY": str(fakes["venv"]),
                                              "FAKE_OTHER_VENV": other_venv, "FAKE_TORCH": "2.13.0+cpu",
                                              "CALLS": str(calls)})
    assert out.returncode == 0, out.stderr
    (made,) = [line for line in calls.read_text().splitlines() if "-m venv" in line]
    assert made == ("base -m venv .venv" if other_venv else "base -m venv --system-site-packages .venv")


# ----------------------------------------------------------------------------- secrets


def test_repository_ignores_the_secrets_file():
    assert subprocess.run(["git", "check-ignore", "-q", SECRETS], cwd=ROOT).returncode == 0


def test_secrets_are_random_private_ignored_and_never_overwritten(tmp_path):
    files = []
    for name in ("a", "b"):
        repo = _secrets_repo(tmp_path, name)
        _bash("bash infra/secrets.sh", repo).check_returncode()
        path = repo / SECRETS
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert subprocess.run(["git", "check-ignore", "-q", SECRETS], cwd=repo).returncode == 0
        assert "infra/.env" not in _bash("git status --porcelain --untracked-files=all", repo).stdout
        files.append(path)
    first, second = (_read_env(path) for path in files)
    assert set(first) == set(SECRET_NAMES)
    for name in SECRET_NAMES:
        if name != "MLFLOW_TRACKING_USERNAME":
            assert len(first[name]) >= 32 and first[name] != second[name], name
    user, _, password = first["PREFECT_API_AUTH_STRING"].partition(":")
    assert user and len(password) >= 32

    files[0].write_text(files[0].read_text() + "# edited\n")
    kept = files[0].read_text()
    _bash("bash infra/secrets.sh", files[0].parents[1]).check_returncode()
    assert files[0].read_text() == kept


def test_secrets_are_read_not_run_and_the_environment_wins(tmp_path):
    repo = _secrets_repo(tmp_path, "r")
    (repo / SECRETS).write_text("MLFLOW_TRACKING_USERNAME=$(touch pwned)\nMLFLOW_TRACKING_PASSWORD=from-file\n")
    out = _bash(". infra/secrets.sh && secrets_export MLFLOW_TRACKING_USERNAME MLFLOW_TRACKING_PASSWORD "
                "PREFECT_API_AUTH_STRING && echo \"$MLFLOW_TRACKING_USERNAME|$MLFLOW_TRACKING_PASSWORD|"
                "${PREFECT_API_AUTH_STRING-unset}\"", repo, {"MLFLOW_TRACKING_PASSWORD": "from-env"})
    out.check_returncode()
    assert out.stdout.strip() == "$(touch pwned)|from-env|unset"
    assert not (repo / "pwned").exists()


# ----------------------------------------------------------------------------- start-servers.sh


@pytest.mark.parametrize("env, message", [
    ({"COVSEG_HOST": "0.0.0.0", "COVSEG_AUTH": "0"}, "without authentication"),
    ({"COVSEG_HOST": "10.1.2.3", "COVSEG_AUTH": "0"}, "without authentication"),
    ({"COVSEG_AUTH": "yes"}, "COVSEG_AUTH must be"),
])
def test_start_servers_refuses_to_serve_other_machines_without_authentication(tmp_path, env, message):
    shutil.copytree(ROOT / "infra", tmp_path / "infra")  # no .venv here: nothing could start
    out = _bash("bash infra/start-servers.sh", tmp_path, env)
    assert out.returncode != 0
    assert message in out.stderr and "COVSEG_AUTH" in out.stderr, out.stderr
    assert not (tmp_path / ".servers").exists()


def _status(url: str, auth: tuple[str, str] | None = None, data: bytes | None = None) -> int:
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def _gone(pid: int) -> bool:
    """No process `pid` and no process left in its group (each server runs in a group of its own)."""
    for probe in (os.kill, os.killpg):
        try:
            probe(pid, 0)
            return False
        except ProcessLookupError:
            pass
    return True


@pytest.mark.slow
def test_start_servers_with_authentication_then_stop(new_project, tmp_path):
    """The real scripts on a loopback address other than 127.0.0.1, authentication forced on: the REST APIs
    answer 401 without credentials and 200 with those of infra/.env; stop.sh leaves no process behind."""
    project = new_project()
    (project / ".venv").symlink_to(Path(sys.executable).parents[1])
    (project / SECRETS).unlink(missing_ok=True)  # the script writes its own
    host, mlflow_port, prefect_port = "127.0.0.2", free_port(), free_port()
    env = {"COVSEG_HOST": host, "COVSEG_AUTH": "1", "MLFLOW_PORT": str(mlflow_port),
           "PREFECT_PORT": str(prefect_port), "MLFLOW_SERVER_ALLOWED_HOSTS": f"{host}:*",
           "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false", "PREFECT_WORKER_QUERY_SECONDS": "2"}
    clean = {k: v for k, v in os.environ.items() if k not in {*CLIENT_NAMES, "PREFECT_API_URL", "MLFLOW_TRACKING_URI"}}
    pids = []
    try:
        started = subprocess.run(["bash", "infra/start-servers.sh"], cwd=project, env={**clean, **env},
                                 capture_output=True, text=True, timeout=400)
        pids = [int(p.read_text()) for p in (project / ".servers").glob("*.pid")]
        assert started.returncode == 0, started.stdout + started.stderr
        assert stat.S_IMODE((project / SECRETS).stat().st_mode) == 0o600
        secrets = _read_env(project / SECRETS)
        for value in secrets.values():
            assert value not in started.stdout + started.stderr, "a secret in the output"

        mlflow_api = f"http://{host}:{mlflow_port}/api/2.0/mlflow/experiments/search?max_results=1"
        mlflow_user = (secrets["MLFLOW_TRACKING_USERNAME"], secrets["MLFLOW_TRACKING_PASSWORD"])
        assert _status(mlflow_api) == 401
        assert _status(mlflow_api, (mlflow_user[0], "wrong-password")) == 401
        assert _status(mlflow_api, mlflow_user) == 200

        prefect_api = f"http://{host}:{prefect_port}/api/deployments/filter"
        prefect_user = tuple(secrets["PREFECT_API_AUTH_STRING"].split(":", 1))
        assert _status(prefect_api, data=b"{}") == 401
        assert _status(prefect_api, (prefect_user[0], "wrong"), data=b"{}") == 401
        assert _status(prefect_api, prefect_user, data=b"{}") == 200

        # listening on the configured address only
        for port in (mlflow_port, prefect_port):
            with pytest.raises(urllib.error.URLError):
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
    finally:
        stopped = _bash("bash infra/stop.sh", project, timeout=120)
    assert stopped.returncode == 0, stopped.stderr
    assert len(pids) >= 2
    deadline = time.time() + 10
    while not all(_gone(pid) for pid in pids) and time.time() < deadline:
        time.sleep(0.5)
    assert all(_gone(pid) for pid in pids), pids
    assert not list((project / ".servers").glob("*.pid"))
