"""Emulate a CPU without native bfloat16 (benchmarks/avx2/run): torch.cpu says there is no AVX512-BF16 or AMX,
so covseg trains in float32 (covseg.model.bf16_autocast). Imported by Python at start-up (PYTHONPATH)."""
import importlib.abc
import importlib.machinery
import sys


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "torch.cpu":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        exec_module = spec.loader.exec_module

        def patched(module):
            exec_module(module)
            module._is_avx512_bf16_supported = lambda: False
            module._is_amx_tile_supported = lambda: False
        spec.loader.exec_module = patched
        return spec


sys.meta_path.insert(0, _Finder())
