"""The promotion lock (covseg.locks) between real processes (tests/lock_holder.py): a file lock beside the
embedded store (fast tier), a Prefect global concurrency limit on a real Prefect server (slow tier)."""
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from covseg import locks
from covseg.errors import CovsegError
from covseg.names import ENV_TRACKING_URI

HOLDER = Path(__file__).with_name("lock_holder.py")
MODEL = "team/covseg unet:v1 ü"  # characters no file or limit name should carry as they are


class Holder:
    """A lock_holder.py process; its log is read as {word: (time, rest of the line)}."""

    def __init__(self, root: Path, tag: str, env: dict, wait_s: float, hold_s: float, lease_s: float = 60,
                 model: str = MODEL):
        self.log, self.go, self.err = root / f"{tag}.log", root / f"{tag}.go", root / f"{tag}.err"
        with open(self.err, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(HOLDER), model, str(wait_s), str(lease_s), str(hold_s), str(self.log),
                 str(self.go)], env=env, cwd=root, stdout=err, stderr=subprocess.STDOUT, start_new_session=True)

    def lines(self) -> dict:
        text = self.log.read_text() if self.log.exists() else ""
        return {word: (float(t), rest) for word, t, rest in re.findall(r"^(\w+) (\S+) ?(.*)$", text, re.M)}

    def wait_for(self, word: str, timeout: float = 90) -> float:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if word in self.lines():
                return self.lines()[word][0]
            if self.proc.poll() is not None and word not in self.lines():
                break
            time.sleep(0.05)
        raise AssertionError(f"no `{word}` from the holder (exit {self.proc.poll()}):\n{self.err.read_text()[-3000:]}")

    def start(self) -> float:
        self.go.touch()
        return time.time()

    def exit_code(self, timeout: float = 90) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> float:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        return time.time()


@pytest.fixture
def holders(tmp_path):
    """holders(tag, env, wait_s, hold_s, ...) starts a Holder (ready to go); all are killed by PID afterwards."""
    made = []

    def make(tag, env, wait_s, hold_s, **kw):
        made.append(Holder(tmp_path, tag, env, wait_s, hold_s, **kw))
        return made[-1]

    yield make
    for holder in made:
        if holder.proc.poll() is None:
            holder.kill()


@pytest.fixture
def file_env(tmp_path):
    """An environment without a Prefect API whose MLflow store is the embedded tmp_path/store/mlflow.db."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({ENV_TRACKING_URI: f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}",
                "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    return env


def test_a_shared_store_without_prefect_warns_that_the_lock_is_this_machines_only(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(ENV_TRACKING_URI, "http://127.0.0.1:5000")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(locks, "prefect_api_url", lambda: None)
    with locks.promotion_lock(MODEL, wait_s=1, lease_s=60):
        assert list((tmp_path / "cache" / "covseg" / "locks").glob(".covseg-promotion-*.lock"))
    assert "excludes promotions on this machine only; set PREFECT_API_URL" in capsys.readouterr().err
    monkeypatch.setenv(ENV_TRACKING_URI, f"sqlite:///{tmp_path}/mlflow.db")  # the embedded store: no warning
    with locks.promotion_lock(MODEL, wait_s=1, lease_s=60):
        pass
    assert capsys.readouterr().err == ""


def _intervals(*holders) -> list[tuple[float, float]]:
    return sorted((h.lines()["start"][0], h.lines()["end"][0]) for h in holders)


def test_lock_names_and_folders_are_safe(tmp_path):
    names = {m: locks.lock_name(m) for m in ["../../etc/passwd", "a/b", "a:b", MODEL, "", "x" * 500]}
    assert all(re.fullmatch(r"covseg-promotion-[A-Za-z0-9_.-]+-[0-9a-f]{12}", n) and len(n) < 100
               for n in names.values()), names
    assert names["a/b"] != names["a:b"]  # same slug, told apart by the hash
    assert locks.lock_dir(f"sqlite:///{tmp_path}/mlflow.db?timeout=5") == tmp_path
    assert locks.lock_dir(f"file://{tmp_path}/mlruns") == tmp_path
    assert locks.lock_dir(str(tmp_path / "mlruns")) == tmp_path
    for remote in ["http://127.0.0.1:5000", "https://mlflow.example", "postgresql://u@h/db"]:
        assert locks.lock_dir(remote).parts[-2:] == ("covseg", "locks")


def test_an_unreachable_prefect_api_is_a_covseg_error(tmp_path, monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    refused = r"Prefect API at http://127.0.0.1:9/api failed .* could not be taken; nothing changed"
    with (temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}), pytest.raises(CovsegError, match=refused),
          locks.promotion_lock(MODEL, 1, 60)):
        pytest.fail("the body ran without the lock")


def test_file_lock_second_process_waits_for_the_first(tmp_path, holders, file_env):
    a, b = holders("a", file_env, wait_s=60, hold_s=1.5), holders("b", file_env, wait_s=60, hold_s=1.5)
    a.wait_for("ready"), b.wait_for("ready")
    go = a.start()
    b.start()
    assert (a.exit_code(), b.exit_code()) == (0, 0)
    (first_start, first_end), (second_start, second_end) = _intervals(a, b)
    assert first_end <= second_start  # the critical sections do not overlap
    assert second_start - go >= 1.4  # the second waited for the first
    assert [p.name for p in (tmp_path / "store").iterdir()] in ([f".{locks.lock_name(MODEL)}.lock"], [])


def test_file_lock_times_out_with_a_covseg_error(holders, file_env):
    a, b = holders("a", file_env, wait_s=60, hold_s=30), holders("b", file_env, wait_s=0.5, hold_s=0)
    b.wait_for("ready")
    a.start()
    a.wait_for("start")
    go = b.start()
    assert b.exit_code() == 3
    when, message = b.lines()["error"]
    assert 0.4 <= when - go < 5
    assert "could not take the promotion lock (file lock " in message
    assert "within registry.lock_wait_s 0.5s" in message and "nothing changed" in message
    assert "start" not in b.lines()


def test_file_lock_of_a_killed_holder_is_released_at_once(holders, file_env):
    a, b = holders("a", file_env, wait_s=60, hold_s=-1), holders("b", file_env, wait_s=60, hold_s=0)
    b.wait_for("ready")
    a.start()
    a.wait_for("start")
    b.start()
    time.sleep(1)
    assert "start" not in b.lines()  # b waits while a lives
    killed = a.kill()
    assert b.exit_code() == 0
    assert b.lines()["start"][0] - killed < 1.0


# ----------------------------------------------------------------------------- Prefect (slow tier)


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """A real Prefect server on 127.0.0.1 (its repossessor of expired leases looks every second); yields
    the environment of processes that use it."""
    from servers import prefect_server

    root = tmp_path_factory.mktemp("prefect")
    env = {"PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS": "1"}
    with prefect_server(root, env):
        yield {**{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}, **env}


def _limit(env: dict, model: str) -> dict:
    url = f"{env['PREFECT_API_URL']}/v2/concurrency_limits/{locks.lock_name(model)}"
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


@pytest.mark.slow
def test_prefect_limit_second_process_waits_for_the_first(holders, prefect_api):
    model = f"{MODEL} waits"
    a, b = (holders(tag, prefect_api, wait_s=60, hold_s=2, model=model) for tag in "ab")
    a.wait_for("ready"), b.wait_for("ready")
    go = a.start()
    b.start()  # both create the limit at once: one creates it, the other finds it
    assert (a.exit_code(), b.exit_code()) == (0, 0)
    (first_start, first_end), (second_start, second_end) = _intervals(a, b)
    assert first_end <= second_start
    assert second_start - go >= 1.9
    limit = _limit(prefect_api, model)
    assert (limit["limit"], limit["active"], limit["active_slots"]) == (1, True, 0)

    # a limit changed to admit two holders is refused, not used
    request = urllib.request.Request(f"{prefect_api['PREFECT_API_URL']}/v2/concurrency_limits/{limit['id']}",
                                     data=json.dumps({"limit": 2}).encode(), method="PATCH",
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=10).close()
    c = holders("c", prefect_api, wait_s=60, hold_s=0, model=model)
    c.wait_for("ready")
    c.start()
    assert c.exit_code() == 3
    assert "must be active with limit 1" in c.lines()["error"][1] and "start" not in c.lines()


@pytest.mark.slow
def test_prefect_limit_of_a_killed_holder_is_released_when_its_lease_expires(holders, prefect_api):
    model = f"{MODEL} dies"
    # lease_s 5 is raised to Prefect's minimum lease, 60 s
    a = holders("a", prefect_api, wait_s=60, hold_s=-1, lease_s=5, model=model)
    impatient = holders("c", prefect_api, wait_s=2, hold_s=0, model=model)
    b = holders("b", prefect_api, wait_s=120, hold_s=0, model=model)
    impatient.wait_for("ready"), b.wait_for("ready")
    a.start()
    taken = a.wait_for("start")
    a.kill()
    impatient.start()
    assert impatient.exit_code() == 3  # the dead holder's lease still holds the limit
    assert "(Prefect global concurrency limit covseg-promotion-" in impatient.lines()["error"][1]
    b.start()
    assert b.exit_code(timeout=150) == 0
    released = b.lines()["start"][0] - taken
    assert locks.PREFECT_MIN_LEASE_S - 5 <= released <= locks.PREFECT_MIN_LEASE_S + 30, released
    print(f"a killed holder's slot was taken again {released:.1f} s after it was acquired")
