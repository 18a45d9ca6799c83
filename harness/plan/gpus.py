"""GPUs by name, with the memory each has, for `--gpu T4` (a number is GiB: `--gpu 16`)."""
from __future__ import annotations

import re

from harness.errors import UserError

# Total memory as nvidia-smi lists it (MiB). The CUDA context and the allocator's overhead come out of
# this, so they are part of every plan (harness.plan.memory) rather than subtracted here.
GPUS_MIB: dict[str, int] = {
    "T4": 15360,  # Kaggle, Colab free tier
    "L4": 23034,  # Colab, GCP
    "A10G": 23028,  # AWS g5
    "A10": 23028,
    "RTX 3090": 24576,
    "RTX 4090": 24564,
    "A100-40": 40960,
    "A100-80": 81920,
    "H100": 81559,  # H100 80GB HBM3 (SXM)
    "H200": 143771,
}


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


_BY_KEY = {_key(name): name for name in GPUS_MIB}
_BY_KEY.update({"3090": "RTX 3090", "4090": "RTX 4090", "a10040gb": "A100-40", "a10080gb": "A100-80",
                "a100": "A100-80", "h10080gb": "H100"})


def gpu_memory(spec: str) -> tuple[str, float]:
    """(label, GiB) for a GPU name ("T4", "rtx-4090", "A100-80") or a size in GiB ("16", "24GB")."""
    size = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:gib|gb|g)?\s*", spec.lower())
    if size:
        gib = float(size.group(1))
        if gib <= 0:
            raise UserError(f"--gpu {spec}: a GPU needs some memory; give a size above 0 GiB or a name")
        return f"{gib:g} GiB", gib
    name = _BY_KEY.get(_key(spec))
    if name is None:
        raise UserError(f"--gpu: unknown GPU {spec!r}; use a size in GiB (--gpu 16) or one of: {', '.join(GPUS_MIB)}")
    return name, GPUS_MIB[name] / 1024
