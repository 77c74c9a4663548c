"""The promotion lock: at most one promotion of a registered model at a time, waited for up to `wait_s`.

With a Prefect API configured (PREFECT_API_URL, or the active Prefect profile), the lock is the Prefect
global concurrency limit `covseg-promotion-<slug>-<hash>` (see lock_name) of one slot, created on first
use; it excludes promotions on every machine that talks to that server. The slot is held under a lease
that Prefect renews while its holder lives (every 3/4 of the lease; if renewal keeps failing, Prefect
cancels the holder). A holder that dies is released once its lease expires: `lease_s`, at least Prefect's
minimum of 60 s, plus up to the server's repossessor loop (PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS,
15 s by default). Waiters poll at the server's Retry-After (about the limit's mean occupancy, at most
30 s): not first come first served.

Otherwise it is an OS file lock (flock) `.covseg-promotion-<slug>-<hash>.lock` in the folder of the embedded
MLflow store (SQLite or file store), released by the OS when its holder dies; `lease_s` is unused. It
excludes processes on the machine that holds that folder (flock over a network file system is not relied
on). With a remote tracking store (an MLflow server) and no Prefect API, the file lives in a per-user
folder (~/.cache/covseg/locks) and excludes promotions on this machine only.

Either way, not getting the lock within `wait_s` raises a CovsegError before anything is changed. The lock
excludes only code that takes it: registry writes made by hand or by other tools are not held off.
"""
from __future__ import annotations

import hashlib
import os
import re
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from urllib.parse import unquote, urlparse

from covseg.errors import CovsegError

PREFECT_MIN_LEASE_S = 60.0  # the Prefect server refuses shorter leases (422)


def lock_name(model_name: str) -> str:
    """`covseg-promotion-<slug>-<sha256 prefix>`: safe as a file name and a Prefect limit name, whatever
    characters the model name has (the hash keeps names that slug alike apart)."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", model_name)[:60].strip("-.") or "model"
    return f"covseg-promotion-{slug}-{hashlib.sha256(model_name.encode()).hexdigest()[:12]}"


def prefect_api_url() -> str | None:
    from prefect.settings import get_current_settings

    return get_current_settings().api.url


def local_locks() -> Path:
    """The per-user folder of locks that exclude promotions on this machine only."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "covseg" / "locks"


def lock_dir(uri: str | None = None) -> Path:
    """The folder of the embedded MLflow store at `uri` (default: covseg's tracking URI), else a per-user one."""
    if uri is None:
        from covseg.tracking import tracking_uri

        uri = tracking_uri()
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite" and uri.startswith("sqlite:///") and len(uri) > len("sqlite:///"):
        # sqlite:////abs/x.db or sqlite:///rel/x.db, perhaps with ?options
        return Path(uri.removeprefix("sqlite:///").partition("?")[0]).resolve().parent
    if parsed.scheme == "file" or (parsed.scheme == "" and uri):
        return Path(unquote(parsed.path) if parsed.scheme else uri).resolve().parent
    return local_locks()


def _busy(model_name: str, where: str, wait_s: float) -> CovsegError:
    return CovsegError(f"{model_name}: could not take the promotion lock {where} within registry.lock_wait_s "
                       f"{wait_s}s: another promotion holds it; nothing changed")


@contextmanager
def promotion_lock(model_name: str, wait_s: float, lease_s: float) -> Iterator[None]:
    """Hold the promotion lock of `model_name` while the body runs (see the module docstring)."""
    name = lock_name(model_name)
    with ExitStack() as held:
        if prefect_api_url():
            from prefect.concurrency.sync import concurrency

            _ensure_limit(name)
            # strict: a limit that vanished is an error, not a free pass; renewal failure cancels the holder
            # (a timeout of 0 would time out before the first try: wait_s 0 waits 1 s)
            from prefect.concurrency._asyncio import ConcurrencySlotAcquisitionError

            taking = concurrency(name, timeout_seconds=max(wait_s, 1.0), strict=True,
                                 lease_duration=max(lease_s, PREFECT_MIN_LEASE_S))
            where = f"(Prefect global concurrency limit {name})"
            gave_up = TimeoutError
            failed = ConcurrencySlotAcquisitionError  # the server went away, or the limit was deleted
        else:
            from filelock import FileLock, Timeout

            folder = lock_dir()
            if folder == local_locks():  # an MLflow server shared with other machines, and no Prefect to lock on
                print(f"covseg: warning: no Prefect API configured: the promotion lock is a file in {folder} and "
                      f"excludes promotions on this machine only; set PREFECT_API_URL to the team's Prefect server",
                      file=sys.stderr)
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f".{name}.lock"
            # never a soft (file exists) lock: a dead holder's would stay
            taking = FileLock(path, timeout=wait_s, fallback_to_soft=False)
            where = f"(file lock {path})"
            gave_up = Timeout
            failed = OSError
        try:
            held.enter_context(taking)
        except gave_up:
            raise _busy(model_name, where, wait_s) from None
        except failed as error:
            raise CovsegError(f"{model_name}: the promotion lock {where} could not be taken ({error}); "
                              f"nothing changed") from None
        yield


def _ensure_limit(name: str) -> None:
    """Create the one-slot limit `name` unless it exists (another promotion may create it at the same time);
    refuse one that was changed to admit more than one holder."""
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            try:
                limit = client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                with suppress(ObjectAlreadyExists):  # created by another promotion since the read
                    client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
                limit = client.read_global_concurrency_limit_by_name(name)
    except httpx.HTTPError as error:
        raise CovsegError(f"the Prefect API at {prefect_api_url()} failed ({error}): the promotion lock {name} "
                          "could not be taken; nothing changed") from None
    if limit.limit != 1 or not limit.active or limit.slot_decay_per_second:
        raise CovsegError(f"Prefect global concurrency limit {name} must be active with limit 1 and no slot decay "
                          f"to serve as the promotion lock (it has limit {limit.limit}, active {limit.active}, "
                          f"slot decay {limit.slot_decay_per_second}); fix or delete it: "
                          f"`prefect gcl delete {name}`")
