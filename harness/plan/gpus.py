"""GPUs by name: the memory each has (`--gpu T4`; a number is GiB: `--gpu 16`) and the speeds its data sheet
promises (peak dense tensor FLOP/s per dtype, memory bandwidth), which the time planner scales by the
fractions a calibration measures (harness.plan.speeds, harness.plan.calibrate)."""
from __future__ import annotations

import re
from dataclasses import dataclass

from harness.errors import UserError

T = 1e12  # FLOP/s in a TFLOP/s
GB_S = 1e9  # bytes/s in the data sheets' GB/s (decimal)


@dataclass(frozen=True)
class PeakSpeed:
    """A data sheet's peaks. FLOP/s are DENSE: NVIDIA's headline tensor figures since Ampere assume 2:4
    structured sparsity, which training never uses, so those are halved here. 16-bit figures are with fp32
    accumulation (what PyTorch's matmuls do; GeForce cards run fp16-accumulate at twice that rate). None
    where the card has no such unit (bf16 and tf32 before Ampere)."""

    fp16: float  # FLOP/s, tensor cores, fp16 inputs
    bf16: float | None  # FLOP/s, tensor cores, bf16 inputs
    tf32: float | None  # FLOP/s, tensor cores, fp32 inputs as TF32 (PyTorch's matmul default is off)
    fp32: float  # FLOP/s, CUDA cores (no tensor cores)
    bandwidth: float  # bytes/s, device memory
    source: str  # where the figures come from

    def matmul(self, dtype: str) -> float | None:
        """Peak FLOP/s of a matmul in `dtype` ("bfloat16", "float16", "float32"; float32 without TF32)."""
        return {"bfloat16": self.bf16, "float16": self.fp16, "float32": self.fp32}.get(dtype)


@dataclass(frozen=True)
class GPU:
    name: str
    mib: int  # total memory as nvidia-smi lists it
    device_names: str  # regex matched against torch.cuda.get_device_name(), e.g. "NVIDIA A100-SXM4-80GB"
    speed: PeakSpeed | None  # None: memory known, speed not (the time planner refuses; a calibration stands in)


# Memory: total as nvidia-smi lists it (MiB). The CUDA context and the allocator's overhead come out of this, so
# they are part of every plan (harness.plan.memory) rather than subtracted here.
# Speeds: each GPU's own data sheet (or architecture whitepaper where the data sheet gives no per-dtype table),
# the "with sparsity" figures halved to dense; each figure was checked against public copies of those sheets.
_AMPERE_GA100 = "NVIDIA A100 Tensor Core GPU data sheet: 312 TFLOPS bf16/fp16 dense (624 sparse), TF32 156 dense"
_HOPPER_SXM = "H100 SXM5: 989.4 bf16/fp16 dense (1,979 sparse), TF32 494.7 dense (989 sparse), FP32 67"
GPU_TABLE: tuple[GPU, ...] = (
    # Turing: fp16 tensor cores only. NVIDIA T4 data sheet: 65 TFLOPS mixed fp16/fp32, 8.1 FP32, 320 GB/s.
    GPU("T4", 15360, r"\bT4\b", PeakSpeed(65 * T, None, None, 8.1 * T, 320 * GB_S,
                                          "NVIDIA T4 data sheet (Turing: no sparsity, no bf16/tf32)")),  # Kaggle, Colab
    # NVIDIA L4 data sheet: fp16/bf16 242 and TF32 120 TFLOPS are "with sparsity"; FP32 30.3; 300 GB/s.
    GPU("L4", 23034, r"\bL4\b", PeakSpeed(121 * T, 121 * T, 60 * T, 30.3 * T, 300 * GB_S,
                                          "NVIDIA L4 data sheet, sparse figures halved")),  # Colab, GCP
    # AWS's own GA102 variant: no NVIDIA data sheet. AWS and cloud vendors list 70 TFLOPS bf16/fp16 dense,
    # 35 TF32, 35 FP32 (the A10G trades tensor rate for CUDA-core rate against the A10), 600 GB/s.
    GPU("A10G", 23028, r"\bA10G\b", PeakSpeed(70 * T, 70 * T, 35 * T, 35 * T, 600 * GB_S,
                                              "AWS g5 A10G figures as cloud vendors list them (no NVIDIA sheet)")),
    # NVIDIA A10 data sheet: bf16/fp16 125 dense (250 sparse), TF32 62.5 dense, FP32 31.2, 600 GB/s.
    GPU("A10", 23028, r"\bA10\b", PeakSpeed(125 * T, 125 * T, 62.5 * T, 31.2 * T, 600 * GB_S,
                                            "NVIDIA A10 data sheet, sparse figures halved")),
    # NVIDIA Ampere GA102 whitepaper, RTX 3090 column: fp16 with FP32 accumulate 71 dense (142 with fp16
    # accumulate), bf16 71, TF32 35.6, FP32 35.6, 936 GB/s. Not the 3090 Ti (40 TFLOPS FP32, 1008 GB/s).
    GPU("RTX 3090", 24576, r"RTX 3090(?! Ti)", PeakSpeed(71 * T, 71 * T, 35.6 * T, 35.6 * T, 936 * GB_S,
                                                         "NVIDIA Ampere GA102 whitepaper (fp32 accumulate)")),
    # NVIDIA Ada Lovelace architecture whitepaper, RTX 4090 column: fp16/bf16 with FP32 accumulate 165.2 dense
    # (330.3 sparse), TF32 82.6, FP32 82.6, 1008 GB/s. Not the export 4090 D.
    GPU("RTX 4090", 24564, r"RTX 4090(?! D)", PeakSpeed(165.2 * T, 165.2 * T, 82.6 * T, 82.6 * T, 1008 * GB_S,
                                                        "NVIDIA Ada Lovelace whitepaper (fp32 accumulate)")),
    # NVIDIA RTX A6000 data sheet: 309.7 tensor TFLOPS with sparsity, FP32 38.7, 768 GB/s; GA102 whitepaper:
    # bf16/fp16 154.8 dense, TF32 77.4 dense (professional cards accumulate in fp32 at full rate).
    GPU("A6000", 49140, r"RTX A6000", PeakSpeed(154.8 * T, 154.8 * T, 77.4 * T, 38.7 * T, 768 * GB_S,
                                                "NVIDIA RTX A6000 data sheet and GA102 whitepaper")),
    # NVIDIA L40S data sheet: bf16/fp16 362.05 dense (733 sparse), TF32 183 dense (366 sparse), FP32 91.6,
    # 864 GB/s.
    GPU("L40S", 46068, r"\bL40S\b", PeakSpeed(362.05 * T, 362.05 * T, 183 * T, 91.6 * T, 864 * GB_S,
                                              "NVIDIA L40S data sheet")),
    # Volta: fp16 tensor cores only. NVIDIA V100 data sheet, SXM2: 125 tensor TFLOPS (PCIe: 112), FP32 15.7,
    # 900 GB/s. Only the SXM2 boards are matched by name; a V100 PCIe is not the same speed.
    GPU("V100", 16160, r"V100-SXM2-16GB", PeakSpeed(125 * T, None, None, 15.7 * T, 900 * GB_S,
                                                    "NVIDIA V100 data sheet, SXM2 (Volta: no bf16/tf32)")),
    GPU("V100-32", 32768, r"V100-SXM2-32GB", PeakSpeed(125 * T, None, None, 15.7 * T, 900 * GB_S,
                                                       "NVIDIA V100 data sheet, SXM2 (Volta: no bf16/tf32)")),
    # A100 data sheet: 40GB (SXM4 and PCIe) 1,555 GB/s; 80GB SXM4 2,039 GB/s (the 80GB PCIe has 1,935: not
    # matched by name). FP32 19.5.
    GPU("A100-40", 40960, r"A100-(SXM4|PCIE)-40GB", PeakSpeed(312 * T, 312 * T, 156 * T, 19.5 * T, 1555 * GB_S,
                                                              _AMPERE_GA100)),
    GPU("A100-80", 81920, r"A100-SXM4-80GB", PeakSpeed(312 * T, 312 * T, 156 * T, 19.5 * T, 2039 * GB_S,
                                                       _AMPERE_GA100 + "; 80GB SXM4")),
    # NVIDIA H100 Tensor Core GPU data sheet, SXM5 80GB HBM3: 3.35 TB/s.
    GPU("H100", 81559, r"H100 80GB HBM3", PeakSpeed(989.4 * T, 989.4 * T, 494.7 * T, 67 * T, 3350 * GB_S,
                                                    "NVIDIA H100 data sheet, " + _HOPPER_SXM)),
    # Same data sheet, H100 PCIe 80GB: bf16/fp16 756 dense (1,513 sparse), TF32 378 dense, FP32 51, 2 TB/s.
    GPU("H100 PCIe", 81559, r"H100 PCIe", PeakSpeed(756 * T, 756 * T, 378 * T, 51 * T, 2000 * GB_S,
                                                    "NVIDIA H100 data sheet, PCIe, sparse figures halved")),
    # NVIDIA H200 Tensor Core GPU data sheet, SXM: the H100 SXM's compute, 141 GB HBM3e at 4.8 TB/s. Not the
    # H200 NVL (lower clocks).
    GPU("H200", 143771, r"\bH200\b(?! NVL)", PeakSpeed(989.4 * T, 989.4 * T, 494.7 * T, 67 * T, 4800 * GB_S,
                                                       "NVIDIA H200 data sheet, SXM: " + _HOPPER_SXM)),
)
GPUS: dict[str, GPU] = {gpu.name: gpu for gpu in GPU_TABLE}
GPUS_MIB: dict[str, int] = {gpu.name: gpu.mib for gpu in GPU_TABLE}


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


_BY_KEY = {_key(name): name for name in GPUS}
_BY_KEY.update({"3090": "RTX 3090", "4090": "RTX 4090", "a10040gb": "A100-40", "a10080gb": "A100-80",
                "a100": "A100-80", "h10080gb": "H100", "h100sxm": "H100", "rtxa6000": "A6000",
                "v10016gb": "V100", "v10032gb": "V100-32", "h200141gb": "H200"})


def gpu_named(spec: str) -> GPU | None:
    """The listed GPU a name or alias means ("T4", "rtx-4090", "A100-80"), or None."""
    name = _BY_KEY.get(_key(spec))
    return GPUS[name] if name else None


def gpu_size(spec: str) -> re.Match | None:
    """A size in GiB ("16", "24GB") rather than a name; group 1 is the number."""
    return re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:gib|gb|g)?\s*", spec.lower())


def gpu_memory(spec: str) -> tuple[str, float]:
    """(label, GiB) for a GPU name ("T4", "rtx-4090", "A100-80") or a size in GiB ("16", "24GB")."""
    size = gpu_size(spec)
    if size:
        gib = float(size.group(1))
        if gib <= 0:
            raise UserError(f"--gpu {spec}: a GPU needs some memory; give a size above 0 GiB or a name")
        return f"{gib:g} GiB", gib
    gpu = gpu_named(spec)
    if gpu is None:
        raise UserError(f"--gpu: unknown GPU {spec!r}; use a size in GiB (--gpu 16) or one of: {', '.join(GPUS)}")
    return gpu.name, gpu.mib / 1024


def gpu_from_device_name(device_name: str) -> GPU | None:
    """The listed GPU torch names "NVIDIA A100-SXM4-80GB", or None: an unlisted card, a variant of different
    speed (A100 80GB PCIe, V100 PCIe, RTX 3090 Ti), or a MIG slice (a fraction of the card)."""
    if "MIG" in device_name:
        return None
    for gpu in GPU_TABLE:
        if re.search(gpu.device_names, device_name, flags=re.IGNORECASE):
            return gpu
    return None
