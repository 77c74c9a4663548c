"""Run a command (never through a shell) with this environment's tools first on PATH."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


class CommandError(RuntimeError):
    """A command failed; the message holds the end of its output."""


def run(cmd: list[str], cwd: str | Path, env: dict | None = None, check: bool = True,
        timeout: float | None = None) -> subprocess.CompletedProcess:
    """Run `cmd` in `cwd` with this environment updated by `env` (a None value removes the variable);
    raise CommandError with the end of its output if it fails and `check`."""
    bindir = str(Path(sys.executable).parent)
    full_env = {**os.environ, **(env or {}), "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}
    full_env = {k: v for k, v in full_env.items() if v is not None}
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise CommandError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}) in {cwd}:\n"
                           f"{(proc.stdout + proc.stderr)[-4000:]}")
    return proc
