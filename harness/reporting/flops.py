"""Model FLOPs utilisation (MFU): how much of the GPU's 16-bit matrix peak training really used.

MFU = tokens/s x FLOPs per token / the GPU's peak FLOP/s. FLOPs per token follow the usual
estimate for an N-parameter decoder (see ../shared/BENCHMARKS.md):
  - adapters (LoRA, AdaLoRA, IA3, prompt tuning ...): forward 2N + backward through the
    activations 2N = 4N (no weight gradients for the frozen base); 6N with activation
    checkpointing, which runs the forward a second time in backward;
  - full fine-tuning: forward 2N + backward 4N = 6N; 8N with activation checkpointing.
Attention's sequence-length term is left out (small at the lengths these recipes use), and N is
the total parameter count, embeddings included, so MFU is a slight overestimate for small models.

Where the GPU is not in the table below (or there is no GPU) MFU is None: blank, never 0.
"""
from __future__ import annotations

import re

# Dense (no structured sparsity) bf16/fp16 tensor-core peaks with fp32 accumulation, TFLOP/s, from
# NVIDIA's data sheets / architecture whitepapers. More specific patterns come first (L40S before L4,
# H100 PCIe/NVL before H100 SXM). Matched against torch.cuda.get_device_name().
GPU_PEAK_TFLOPS: tuple[tuple[str, str, float], ...] = (
    (r"H200", "H200", 989.4),
    (r"H100.*PCIe", "H100 PCIe", 756.0),
    (r"H100.*NVL", "H100 NVL", 835.0),
    (r"H100", "H100 SXM", 989.4),
    (r"A100", "A100", 312.0),
    (r"L40S", "L40S", 362.1),
    (r"\bL4\b", "L4", 121.0),
    (r"\bT4\b", "T4", 65.0),  # fp16 only: Turing has no bf16
    (r"RTX 4090", "RTX 4090", 165.2),
    (r"RTX 3090(?! Ti)", "RTX 3090", 71.0),
    (r"V100.*PCIE", "V100 PCIe", 112.0),
    (r"V100", "V100 SXM2", 125.0),
)


def gpu_peak_tflops(device: str | None) -> float | None:
    """Peak dense 16-bit TFLOP/s of the GPU named in a result's `device` ("cuda:0 NVIDIA H100 80GB HBM3")."""
    if not device or not device.startswith("cuda"):
        return None
    for pattern, _label, peak in GPU_PEAK_TFLOPS:
        if re.search(pattern, device, flags=re.IGNORECASE):
            return peak
    return None


def flops_per_token(total_params: int, full_finetuning: bool, activation_checkpointing: bool) -> float:
    passes = (6 if full_finetuning else 4) + (2 if activation_checkpointing else 0)
    return passes * total_params


def mfu_percent(result: dict) -> float | None:
    """MFU of a recipe's result.json record in percent, or None where it cannot be known."""
    peak = gpu_peak_tflops(result.get("device"))
    tokens_per_second = result.get("tokens_per_second")
    total_params = result.get("total_params")
    if peak is None or not tokens_per_second or not total_params:
        return None
    config = result.get("config") or {}
    checkpointing = bool(config.get("activation_checkpointing", config.get("gradient_checkpointing")))
    per_token = flops_per_token(total_params, result.get("method") == "full", checkpointing)
    return 100 * tokens_per_second * per_token / (peak * 1e12)
