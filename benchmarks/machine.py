"""The machine a benchmark ran on, in one line: the CPU model and whether it trains in bfloat16
(training speed differs 2.5-4x between 2-core CPUs with and without native bfloat16)."""
from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The first `model name` of /proc/cpuinfo (Linux); elsewhere what `platform` knows."""
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def machine() -> str:
    import torch

    from covseg.model import bf16_autocast

    cpu_bf16 = "native bfloat16" if bf16_autocast(torch.device("cpu")) else "no native bfloat16"
    if os.environ.get("ATEN_CPU_CAPABILITY"):  # benchmarks/avx2/run
        cpu_bf16 += f", emulating {os.environ['ATEN_CPU_CAPABILITY']} only"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.machine()}, {os.cpu_count()} cores ({cpu_model()}, {cpu_bf16}), {gpu}, "
            f"torch {torch.__version__}")


def commit(repo: Path) -> str:
    """The short hash of `repo`'s HEAD."""
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True,
                          check=True).stdout.strip()


def write_result(name: str, result: dict) -> Path:
    """benchmarks/results/<name>.json: `result`, also printed."""
    out = Path(__file__).resolve().parent / "results" / f"{name}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    print(f"-> {out}")
    return out


if __name__ == "__main__":
    print(machine())
