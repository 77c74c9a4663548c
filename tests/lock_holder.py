"""A promotion-lock holder for tests/test_locks.py, one process each:

    python lock_holder.py MODEL WAIT_S LEASE_S HOLD_S LOG GO

Imports what taking the lock needs, appends `ready` to LOG, waits for the file GO to exist, takes the lock,
appends `start <time>`, holds it HOLD_S seconds (until killed when negative) and appends `end <time>`; or,
when the lock is not taken within WAIT_S, appends `error <time> <message>` and exits 3.
"""
import sys
import time
from pathlib import Path

from covseg import locks
from covseg.errors import CovsegError


def note(log: str, *words) -> None:
    with open(log, "a") as f:
        f.write(" ".join(map(str, words)) + "\n")


def main(model: str, wait_s: str, lease_s: str, hold_s: str, log: str, go: str) -> int:
    if locks.prefect_api_url():
        import prefect.client.orchestration
        import prefect.concurrency.sync  # noqa: F401
    else:
        locks.lock_dir()
    note(log, "ready", time.time())
    while not Path(go).exists():
        time.sleep(0.01)
    try:
        with locks.promotion_lock(model, float(wait_s), float(lease_s)):
            note(log, "start", time.time())
            time.sleep(float(hold_s) if float(hold_s) >= 0 else 3600)
            note(log, "end", time.time())
    except CovsegError as error:
        note(log, "error", time.time(), error)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
