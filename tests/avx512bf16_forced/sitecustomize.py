"""Run at start-up by any Python that has this folder on PYTHONPATH: bitsandbytes then believes the
CPU has AVX512-BF16, so its import takes the path that logs "Failed to load CPU gemm_4bit_forward
from kernels-community" on any machine (tests/test_bad_input.py runs every refusal this way)."""
import importlib.abc
import importlib.util
import sys


class _ForceAvx512Bf16(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "bitsandbytes.functional":
            return None
        sys.meta_path.remove(self)  # find the real module without finding ourselves again
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            module.has_avx512bf16 = lambda: True

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _ForceAvx512Bf16())
