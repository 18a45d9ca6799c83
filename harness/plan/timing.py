"""How long one optimizer step takes: the work harness.plan.work counts, divided by how fast the device is.

    compute time  = FLOPs / achievable matmul FLOP/s + skinny FLOPs / achievable skinny-matmul FLOP/s
    memory time   = bytes / achievable memory bandwidth (element-wise ops included)
                    + random-number bytes / the generator's rate (RANDOM_BYTES_PER_SECOND; else the bandwidth)
    overhead      = ops x seconds per op + fixed seconds per step and per micro-batch
    step time     = compute + memory + overhead

Why a sum and not max(compute, memory), as a roofline would take: the bytes counted (harness.plan.work) are
not the matmuls' own operands, which a matmul kernel overlaps with its arithmetic; they are separate phases
that run one after another within a step: the optimizer's update after the backward, the gradients'
accumulation and clipping, each 4/8-bit weight's dequantization before its product, DoRA's norm and AdaLoRA's
scores, and every element-wise op of the activations (norms, activations, residual adds, the loss, dropout's
random numbers). Each waits for the previous kernel (one stream, eager PyTorch), so their times add up.

Skinny matrix products (a dimension under harness.plan.work.SKINNY_DIMENSION: LoRA's A and B at its rank) reach
far less than the square ones: they are bound by their operands' bytes. Their rate is the calibration's own
"skinny" shape (a LoRA-rank matmul it times) where the calibration file has it; otherwise (a data sheet) they
are counted at the matmul rate, an underestimate of their time.

The speeds, in this order of preference:
- a calibration of the device (`python -m harness.plan.calibrate`, harness.plan.speeds.load_calibration):
  the achievable figures it measured are used as they are (they already are what the device reaches);
- else the data sheet's peaks (harness.plan.gpus) times the achievable fractions below.
Overheads are per step and per micro-batch (PER_STEP_OVERHEAD_S, PER_MICRO_BATCH_OVERHEAD_S): see there.

The range (low, high) is the estimate divided and multiplied by RANGE_FACTOR: it stands for the measured
error of the model (`python -m harness.plan.time_check`: predicted vs measured train time per trial), and is
to be set from that table, not chosen to look precise.
"""
from __future__ import annotations

from dataclasses import dataclass

# Achievable share of a GPU's data-sheet dense matmul peak. NOT FITTED YET: 0.4 is a typical model FLOP
# utilisation of single-GPU transformer fine-tuning in eager PyTorch (published large-scale training reaches
# more, e.g. PaLM's 46 %; small batches, LoRA's skinny products and unfused element-wise work reach less).
# To be replaced by the figure fitted to the published GPU throughputs (issue 28) or a calibration file.
MATMUL_FRACTION = 0.4
# Achievable share of a GPU's data-sheet memory bandwidth. NOT FITTED YET: 0.8 is what streaming copy/add
# kernels (BabelStream-like, the calibration's own bandwidth test) typically reach on HBM and GDDR cards.
BANDWIDTH_FRACTION = 0.8
# Seconds per optimizer step outside the counted work: the Trainer's step bookkeeping (callbacks, scheduler,
# zeroing gradients) and the optimizer's kernel launches. A GPU: launches of a few microseconds per tensor and
# the Trainer's Python, of the order of 10 ms per step; a CPU: the same Python, no launches. Estimates, not fits.
PER_STEP_OVERHEAD_S = {"cuda": 0.01, "cpu": 0.02}
# Seconds per micro-batch (forward and backward) outside the counted work: the Python of the model's modules,
# PEFT's wrappers and the Trainer's batch handling (the ops themselves are PER_OP_S x harness.plan.work's count).
# An estimate, not fitted.
PER_MICRO_BATCH_OVERHEAD_S = {"cuda": 0.01, "cpu": 0.02}
# Seconds per dispatched op (harness.plan.work counts them: every non-view aten op of the forward, backward and
# recompute). CPU: measured 2026-12-03 on this project's 2-vCPU machine, 1 thread, torch 2.x eager: a chain of
# tiny (8x8) products, dropout, silu, multiply and add over 20 parameters, forward and backward with autograd,
# 261 ops a step, 2.73-2.97 us an op (median 2.76 us over 15 repeats of 50 steps; ops counted by the same
# dispatch mode as harness.plan.work). GPU: PyTorch eager's dispatch and a kernel launch, ~5-10 us an op (NVIDIA's
# "Getting Started with CUDA Graphs" post: kernel launch overheads of a few microseconds each, before
# PyTorch's own dispatch); 7 us taken. Neither is fitted to the trials.
PER_OP_S = {"cuda": 7e-6, "cpu": 2.8e-6}
# The optimizer's ops per trainable tensor are paid on a CPU (torch's AdamW goes one tensor at a time there);
# on a GPU its foreach kernels take a few launches per step, inside PER_STEP_OVERHEAD_S.
OPTIMIZER_OPS_PAID = {"cuda": False, "cpu": True}
# Bytes per second of random-number generation (dropout's bernoulli_, its mask read and written), where it is
# bound by the generator rather than by memory. CPU: measured 2026-12-03 on this project's 2-vCPU machine,
# 1 thread: bernoulli_(0.9) of a 512 x 576 float32 tensor (a smollm2 batch's activation), median of 9 x 50
# calls: 1.66 GB/s, 8x under the calibrated bandwidth (torch's CPU generator draws each number in turn). GPU:
# None, counted at the bandwidth (Philox generates in registers faster than the mask is written).
RANDOM_BYTES_PER_SECOND = {"cuda": None, "cpu": 1.66e9}
# The estimate's range: [seconds / RANGE_FACTOR, seconds * RANGE_FACTOR]. To be set from the predicted-vs-
# measured table of `python -m harness.plan.time_check` (the target is within +-25 %).
RANGE_FACTOR = 1.25
# Said beside every estimate until the model meets the target (within +-25% on 80% of measured trials):
# the first comparison (python -m harness.plan.time_check on results/runs.jsonl, a busy 2-core CPU) predicted every
# smollm2-135m trial too fast, median 2.9x. With element-wise bytes, dropout's random numbers, dispatched ops and
# skinny products counted (harness.plan.work; 2026-12-03, calibration of that CPU in full mode) still too fast,
# median measured/predicted 1.47x, 8 of 53 within +-25%: its products ran at ~0.65 of the calibrated matmul rate.
TIME_MODEL_CHECKED = "no: an estimate not yet checked against measured runs (CPU: about 1.5x too fast so far)"


@dataclass(frozen=True)
class Speed:
    """What the time model takes of a device: achievable rates and fixed costs, and where they come from."""

    matmul_flops_per_second: float
    bandwidth_bytes_per_second: float
    step_overhead_seconds: float
    micro_batch_overhead_seconds: float
    source: str  # "calibration <file>" or "data sheet (<source>) x fractions"
    skinny_flops_per_second: float | None = None  # LoRA-rank products; None: at matmul_flops_per_second
    op_seconds: float = 0.0  # per dispatched op of the forward and backward
    optimizer_op_seconds: float = 0.0  # per op of the optimizer step taken one tensor at a time
    random_bytes_per_second: float | None = None  # random-number generation; None: at the bandwidth

    def to_dict(self) -> dict:
        return {"matmul_flops_per_second": self.matmul_flops_per_second,
                "skinny_flops_per_second": self.skinny_flops_per_second,
                "bandwidth_bytes_per_second": self.bandwidth_bytes_per_second,
                "step_overhead_seconds": self.step_overhead_seconds,
                "micro_batch_overhead_seconds": self.micro_batch_overhead_seconds, "op_seconds": self.op_seconds,
                "random_bytes_per_second": self.random_bytes_per_second,
                "speed_source": self.source}


@dataclass(frozen=True)
class Estimate:
    seconds: float  # one optimizer step
    low: float
    high: float
    compute_seconds: float
    memory_seconds: float
    overhead_seconds: float
    tokens_per_second: float  # training tokens of the step (at its max_seq_length) per second
    speed: Speed

    def to_dict(self) -> dict:
        return {"step_seconds": self.seconds, "step_seconds_low": self.low, "step_seconds_high": self.high,
                "tokens_per_second": self.tokens_per_second, "compute_seconds": self.compute_seconds,
                "memory_seconds": self.memory_seconds, "overhead_seconds": self.overhead_seconds,
                "time_model_checked": TIME_MODEL_CHECKED, **self.speed.to_dict()}


def step_seconds(work, speed: Speed, micro_batches: int = 1) -> Estimate:
    """The time of one optimizer step doing `work` (a harness.plan.work.StepWork, every micro-batch of its
    gradient accumulation) at `speed`; micro_batches is the run's gradient_accumulation_steps."""
    if micro_batches < 1:
        raise ValueError(f"micro_batches must be at least 1, got {micro_batches}")
    skinny = work.skinny_flops if speed.skinny_flops_per_second else 0
    compute = (work.flops - skinny) / speed.matmul_flops_per_second + (
        skinny / speed.skinny_flops_per_second if skinny else 0.0)
    random = work.random_bytes if speed.random_bytes_per_second else 0
    memory = (work.bytes - random) / speed.bandwidth_bytes_per_second + (
        random / speed.random_bytes_per_second if random else 0.0)
    overhead = (speed.step_overhead_seconds + micro_batches * speed.micro_batch_overhead_seconds
                + work.ops * speed.op_seconds + work.optimizer_ops * speed.optimizer_op_seconds)
    seconds = compute + memory + overhead
    return Estimate(seconds, seconds / RANGE_FACTOR, seconds * RANGE_FACTOR, compute, memory, overhead,
                    work.tokens / seconds if seconds > 0 else 0.0, speed)


def speed_from(peak, calibration, dtype: str, kind: str, threads: int | None = None) -> Speed:
    """The Speed of a device from its data sheet (a harness.plan.gpus.PeakSpeed or None) and its calibration
    (a harness.plan.speeds.Calibration or None; preferred), for matmuls in `dtype` ("bfloat16", "float16",
    "float32") on a device of `kind` ("cuda" or "cpu"). threads: the CPU threads the run uses, where known;
    a calibration measured with another number is noted in the source, not scaled (see below)."""
    overheads = PER_STEP_OVERHEAD_S[kind], PER_MICRO_BATCH_OVERHEAD_S[kind]
    per_op = {"op_seconds": PER_OP_S[kind],
              "optimizer_op_seconds": PER_OP_S[kind] if OPTIMIZER_OPS_PAID[kind] else 0.0,
              "random_bytes_per_second": RANDOM_BYTES_PER_SECOND[kind]}
    if calibration is not None:
        flops, skinny = calibration.matmul_flops_per_second, _skinny_rate(calibration.path)
        note = ""
        if calibration.dtype != dtype and peak is not None and peak.matmul(dtype) and peak.matmul(calibration.dtype):
            ratio = peak.matmul(dtype) / peak.matmul(calibration.dtype)  # the data sheet's ratio of the dtypes
            flops, skinny = flops * ratio, skinny * ratio if skinny else None
            note = f", scaled from {calibration.dtype} to {dtype} by the data sheet"
        if kind == "cpu" and threads and calibration.threads and threads != calibration.threads:
            # Not scaled, and said: on this project's 2-vCPU machine a matmul with 2 threads ran no faster than with
            # 1 while the machine was busy (75-186 vs 126-187 GFLOP/s) and 1.9x faster while it was quiet (343 vs 183
            # GFLOP/s, 2026-12-03): how threads scale depends on what else runs, which a plan cannot know.
            note += f", calibrated with {calibration.threads} threads, the run used {threads} (not scaled)"
        return Speed(flops, calibration.bandwidth_bytes_per_second, *overheads,
                     f"calibration {calibration.path.name}{note}", skinny, **per_op)
    if peak is None:
        raise ValueError("no speed: neither a data sheet nor a calibration")  # require_speed refuses first
    # A card without bf16 units (T4, V100) trains 16-bit in fp16: its fp16 rate is what a 16-bit step gets.
    matmul = peak.matmul(dtype) or (peak.fp16 if dtype == "bfloat16" else None) or peak.fp32
    return Speed(matmul * MATMUL_FRACTION, peak.bandwidth * BANDWIDTH_FRACTION, *overheads,
                 f"data sheet ({peak.source}) x {MATMUL_FRACTION} matmul, x {BANDWIDTH_FRACTION} bandwidth",
                 **per_op)


def _skinny_rate(path) -> float | None:
    """The median FLOP/s of the calibration's skinny (LoRA-rank) matmuls, where its file has them (calibrate
    records them beside the training shapes and leaves them out of the achievable figure); None otherwise."""
    import json
    import statistics

    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        rates = [row["flops_per_second"]["median"] for row in record.get("matmul") or []
                 if row.get("role") == "skinny"]
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None  # the achievable figures were read already (load_calibration); this one is optional
    rates = [r for r in rates if isinstance(r, (int, float)) and r > 0]
    return statistics.median(rates) if rates else None
