"""benchmarks/machine.py: the line every benchmark result names its machine with; benchmarks/epoch.py."""
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import epoch  # noqa: E402  (benchmarks/epoch.py)
import machine  # noqa: E402  (benchmarks/machine.py)


def test_cpu_model_is_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC 9B14\nflags\t\t: fpu avx2\n\n"
                       "processor\t: 1\nmodel name\t: AMD EPYC 9B14\n")
    assert machine.cpu_model(cpuinfo) == "AMD EPYC 9B14"


def test_cpu_model_without_cpuinfo_is_not_empty(tmp_path):
    assert machine.cpu_model(tmp_path / "missing")


def test_machine_names_the_cpu_and_whether_it_trains_in_bfloat16(monkeypatch):
    import covseg.model

    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)  # also under benchmarks/avx2/run
    for native, label in ((True, "(" + machine.cpu_model() + ", native bfloat16)"),
                          (False, "(" + machine.cpu_model() + ", no native bfloat16)")):
        monkeypatch.setattr(covseg.model, "bf16_autocast", lambda device, native=native: native)
        line = machine.machine()
        assert label in line and torch.__version__ in line


def test_machine_says_when_it_emulates_a_cpu_without_native_bfloat16(monkeypatch):
    import covseg.model

    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")  # as benchmarks/avx2/run sets it
    monkeypatch.setattr(covseg.model, "bf16_autocast", lambda device: False)
    assert "(" + machine.cpu_model() + ", no native bfloat16, emulating avx2 only)" in machine.machine()


def test_epoch_benchmark_times_each_epoch_of_the_default_network():
    seconds = epoch.seconds_per_epoch(slices=3, size=32, epochs=2)
    assert len(seconds) == 2 and all(s > 0 for s in seconds)
