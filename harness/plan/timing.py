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

Skinny matrix products (a dimension under harness.plan.meta_ops.SKINNY_DIMENSION: LoRA's A and B at its rank) reach
far less than the square ones: they are bound by their operands' bytes. Their rate is the calibration's own
"skinny" shape (a LoRA-rank matmul it times) where the calibration file has it; otherwise (a data sheet) they
are counted at the matmul rate, an underestimate of their time.

The speeds, in this order of preference:
- a calibration of the device (`python -m harness.plan.calibrate`, harness.plan.speeds.load_calibration):
  the achievable figures it measured are used as they are (they already are what the device reaches);
- else the data sheet's peaks (harness.plan.gpus) times the achievable fractions below: MATMUL_FRACTION fitted
  to the published transformers + PEFT throughputs (`python -m harness.plan.time_vs_published`, which shows every
  published figure beside its prediction, vendor kernels' included), BANDWIDTH_FRACTION a streaming kernel's
  typical share.
Overheads are per step and per micro-batch (PER_STEP_OVERHEAD_S, PER_MICRO_BATCH_OVERHEAD_S): see there.

The range (low, high) is the estimate divided and multiplied by RANGE_FACTOR: it stands for the measured
error of the model (`python -m harness.plan.time_check`: predicted vs measured train time per trial), and is
to be set from that table, not chosen to look precise.
"""
from __future__ import annotations

from dataclasses import dataclass

from harness.plan.speeds import ALL_KINDS

# Achievable share of a GPU's data-sheet dense matmul peak: FITTED to published throughputs by
# `python -m harness.plan.time_vs_published` (results/time_vs_published.md; tests/test_time_vs_published.py holds
# this figure equal to the fit). Fitted rows: the transformers + PEFT figures whose settings are stated, 7 of them:
# LLaMA-Factory wiki (Llama-2-7B LoRA r 8, A100, batch 4 x 2, length 1024: HF 16-bit 2392, HF + FlashAttention-2
# 2954, HF 4-bit 2415 tokens/s) and PEFT's method_comparison (Llama-3.2-3B on an L40S, 5000 steps: LoRA r 32 942 s,
# DoRA 1191 s, AdaLoRA 1169 s, full fine-tuning 2147 s). Method: each row's implied fraction (its FLOPs' time at
# the data sheet's peak over the published step time less the predicted memory and overhead time, at the
# BANDWIDTH_FRACTION and overheads below), then the median of the seven, rounded to two places. Not fitted: the
# guides' T4 minutes per epoch (transformers + PEFT, but their lengths and 4-bit compute dtype are not stated; they
# imply 0.06-0.10, and the table counts them as misses), and every Unsloth and torchtune row (their own kernels:
# shown beside the model, never fitted). The fit absorbs what the count leaves out or overcounts in those runs
# (padding, evaluation passes in PEFT's times, the count's element-wise bytes): refit when harness.plan.work changes.
MATMUL_FRACTION = 0.40
# Achievable share of a GPU's data-sheet memory bandwidth. NOT FITTED: the published figures mix compute, memory and
# overhead in every row and state too little (lengths, data) to separate a second constant. 0.8 is what streaming
# copy/add kernels (BabelStream-like, the calibration's own bandwidth test) typically reach on HBM and GDDR cards.
BANDWIDTH_FRACTION = 0.8
# Seconds per optimizer step outside the counted work: the Trainer's step bookkeeping (callbacks, scheduler,
# zeroing gradients) and the optimizer's kernel launches. A GPU: launches of a few microseconds per tensor and
# the Trainer's Python, of the order of 10 ms per step; a CPU: the same Python, no launches. Estimates, not fits
# (the MATMUL_FRACTION fit above takes them as they are).
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
# SFT's loss (TRL's fused LM head) on a GPU: its Triton kernels read each tile of logits once in the forward and
# read and write it once in the backward (trl/kernels/chunked_logprob.py; the tile's products are matmuls, counted
# as FLOPs): 3 passes over the logits, where the torch ops a CPU runs (harness.plan.work counts them as loss_bytes)
# take many more. None on a CPU: counted as they run.
LOSS_PASSES_FUSED = {"cuda": 3.0, "cpu": None}
# The estimate's range: [seconds / RANGE_FACTOR, seconds * RANGE_FACTOR]. To be set from the predicted-vs-
# measured table of `python -m harness.plan.time_check` (the target is within +-25 %).
RANGE_FACTOR = 1.25
# Said beside every estimate (the JSON's time_model_checked): how far the model is checked, and where. History:
# the first comparison (a busy 2-core CPU, 2026-12-03) predicted every trial too fast, median 2.9x; then with
# element-wise bytes, random numbers, ops and skinny products counted, 1.47x; re-measured alone at 1 thread, 1.57x,
# every trial too fast. A real step's own counters then showed what the count missed (TRL's fused LM head, its
# in-place gradient GEMMs, padding-free attention over the whole flattened row), and the remaining ~1.2x (products
# and copies on operands not hot in cache, fresh pages) is taken from the device's own calibration grid.
TIME_MODEL_CHECKED = ("partly: against this project's CPU runs, with the CPU's calibration (results/time_check.md), "
                      "and against published GPU figures, from data sheets (results/time_vs_published.md); not yet "
                      "against a GPU run of this project")


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
    # The loss over the vocabulary in passes over the logits (TRL's Triton kernels: LOSS_PASSES_FUSED); None: its
    # element-wise bytes as counted (the torch ops a CPU runs)
    loss_passes: float | None = None
    # Measured over predicted step time on the device's own calibration grid (harness.plan.calibrate_steps), by
    # method kind (harness.plan.speeds.method_kind; "all": every point's): what the counted work at the calibrated
    # rates leaves out on this device (see step_seconds). None: no grid measured.
    step_ratios: dict | None = None

    def to_dict(self) -> dict:
        return {"matmul_flops_per_second": self.matmul_flops_per_second,
                "skinny_flops_per_second": self.skinny_flops_per_second,
                "bandwidth_bytes_per_second": self.bandwidth_bytes_per_second,
                "step_overhead_seconds": self.step_overhead_seconds,
                "micro_batch_overhead_seconds": self.micro_batch_overhead_seconds, "op_seconds": self.op_seconds,
                "random_bytes_per_second": self.random_bytes_per_second, "loss_passes": self.loss_passes,
                "step_ratios": self.step_ratios, "speed_source": self.source}


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
    loss = work.loss_bytes - speed.loss_passes * work.logits_bytes if speed.loss_passes is not None else 0
    memory = (work.bytes - random - loss) / speed.bandwidth_bytes_per_second + (
        random / speed.random_bytes_per_second if random else 0.0)
    overhead = (speed.step_overhead_seconds + micro_batches * speed.micro_batch_overhead_seconds
                + work.ops * speed.op_seconds + work.optimizer_ops * speed.optimizer_op_seconds)
    ratio = _step_ratio(work, speed)
    compute, memory, overhead = compute * ratio, memory * ratio, overhead * ratio
    seconds = compute + memory + overhead
    return Estimate(seconds, seconds / RANGE_FACTOR, seconds * RANGE_FACTOR, compute, memory, overhead,
                    work.tokens / seconds if seconds > 0 else 0.0, speed)


def _step_ratio(work, speed: Speed) -> float:
    """The calibration grid's measured / predicted for this step's method kind (else every point's), 1 without
    a grid. Why a ratio: on this project's CPU the counts are exact (a real step's own FlopCounterMode and
    element-wise bytes equal the meta count, 2026-12-03) yet the step runs ~1.4x longer than the counts at the
    calibrated rates say: the calibration's products and copies repeat on operands hot in cache, a training step
    streams its weights and activations, and a fresh large tensor's pages are faulted in on first touch. The grid
    measures that on real training steps of the device itself, so it is taken from there, not assumed."""
    ratios = speed.step_ratios or {}
    ratio = ratios.get(getattr(work, "method_kind", "")) or ratios.get(ALL_KINDS)
    return ratio if ratio and ratio > 0 else 1.0


def speed_from(peak, calibration, dtype: str, kind: str, threads: int | None = None) -> Speed:
    """The Speed of a device from its data sheet (a harness.plan.gpus.PeakSpeed or None) and its calibration
    (a harness.plan.speeds.Calibration or None; preferred), for matmuls in `dtype` ("bfloat16", "float16",
    "float32") on a device of `kind` ("cuda" or "cpu"). threads: the CPU threads the run uses, where known;
    a calibration measured with another number is noted in the source, not scaled (see below)."""
    overheads = PER_STEP_OVERHEAD_S[kind], PER_MICRO_BATCH_OVERHEAD_S[kind]
    per_op = {"op_seconds": PER_OP_S[kind], "loss_passes": LOSS_PASSES_FUSED[kind],
              "optimizer_op_seconds": PER_OP_S[kind] if OPTIMIZER_OPS_PAID[kind] else 0.0,
              "random_bytes_per_second": RANDOM_BYTES_PER_SECOND[kind]}
    if calibration is not None:
        flops, skinny = calibration.matmul_flops_per_second, calibration.skinny_flops_per_second
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
        ratios = getattr(calibration, "time_ratios", None)
        note += ", x its step grid's measured/predicted" if ratios else ""
        return Speed(flops, calibration.bandwidth_bytes_per_second, *overheads,
                     f"calibration {calibration.path.name}{note}", skinny, **per_op, step_ratios=ratios)
    if peak is None:
        raise ValueError("no speed: neither a data sheet nor a calibration")  # require_speed refuses first
    # A card without bf16 units (T4, V100) trains 16-bit in fp16: its fp16 rate is what a 16-bit step gets.
    matmul = peak.matmul(dtype) or (peak.fp16 if dtype == "bfloat16" else None) or peak.fp32
    return Speed(matmul * MATMUL_FRACTION, peak.bandwidth * BANDWIDTH_FRACTION, *overheads,
                 f"data sheet ({peak.source}) x {MATMUL_FRACTION} matmul, x {BANDWIDTH_FRACTION} bandwidth",
                 **per_op)
