"""The time planner beside the throughput figures others published (the anchors in ../shared/BENCHMARKS.md):

    python -m harness.plan.time_vs_published                       # the markdown table on stdout
    python -m harness.plan.time_vs_published --output results/time_vs_published.md [--overwrite]

Each figure is data (PUBLISHED_SPEEDS): who published it, the GPU, the stack it ran on, the settings it states as
planner flags, the steps it covers, and what was assumed where the source is silent (its note). Each row is
predicted the planner's way: the work of one optimizer step counted on the meta model (harness.plan.work.step_work)
at the row's settings, turned into seconds by harness.plan.timing.step_seconds with the GPU's data sheet
(harness.plan.gpus) times the achievable fractions (harness.plan.timing), then into the source's unit.

The matmul fraction (timing.MATMUL_FRACTION) is FITTED here, on the transformers + PEFT rows only, less those whose
source leaves unstated what their speed hangs on (PublishedSpeed.not_fitted: held to the target all the same): each
row implies the fraction that would make its prediction exact (its compute time at the data sheet's peak over the
published step time less the predicted memory and overhead time); the fit is the median of those (fit()).
Rows on other stacks (Unsloth's kernels, torchtune) are predicted and shown, never fitted: where their own
kernels beat the model, the table says so. Each fitted row is also predicted with the fraction fitted on the
others (leave one out), so that its error is not the fit's own echo.
"""
from __future__ import annotations

import math
import statistics
import sys
from dataclasses import dataclass

from harness.errors import OneLineArgumentParser, reported_as_one_line
from harness.files import output_file, write_or_print

WITHIN = 0.25  # the target: predicted within +-25 % of published, for the transformers + PEFT rows
COMMAND = "python -m harness.plan.time_vs_published --output results/time_vs_published.md --overwrite"

TRANSFORMERS_PEFT = "transformers + PEFT"
UNSLOTH = "Unsloth (its own Triton kernels)"
TORCHTUNE = "torchtune (compiled)"
TORCHTUNE_EAGER = "torchtune (eager)"
FITTED_STACKS = (TRANSFORMERS_PEFT,)

TOKENS_PER_SECOND = "tokens/s"  # training tokens per second per GPU
SECONDS = "s"  # the whole run's training time, over `steps` optimizer steps
MINUTES_PER_EPOCH = "min/epoch"  # over `steps` optimizer steps


@dataclass(frozen=True)
class PublishedSpeed:
    source: str
    what: str  # the run, as the source names it
    gpu: str  # a listed GPU's name (harness.plan.gpus)
    stack: str  # TRANSFORMERS_PEFT, UNSLOTH, TORCHTUNE, TORCHTUNE_EAGER
    figure: float
    unit: str  # TOKENS_PER_SECOND, SECONDS or MINUTES_PER_EPOCH
    settings: tuple[str, ...]  # planner flags for the settings the source states (and those assumed: see note)
    steps: int | None = None  # optimizer steps the figure covers (SECONDS, MINUTES_PER_EPOCH)
    note: str = ""  # settings assumed, and why the error is what it is
    # Why a transformers + PEFT row is held to the target but left out of the fit ("": fitted): its source does not
    # state what its speed hangs on, so that a fit on it would fit the guess.
    not_fitted: str = ""

    @property
    def fitted(self) -> bool:
        return self.stack in FITTED_STACKS and not self.not_fitted


FACTORY = "LLaMA-Factory wiki (2024), Performance Comparison"
TORCHTUNE_README = "torchtune README (memory and training speed table)"
TORCHTUNE_TUTORIAL = "torchtune, Llama-3.2-3B full fine-tuning, each step on top of the last"
PEFT = "PEFT method_comparison (MetaMathQA, July 2026 re-run)"
GUIDES = "the guides (Kaggle T4)"

_FACTORY = ("--model", "meta-llama/Llama-2-7b-hf", "--dtype", "bfloat16", "--per_device_train_batch_size", "4",
            "--gradient_accumulation_steps", "2", "--max_seq_length", "1024", "--r", "8", "--lora_dropout", "0",
            "--target_modules", "q_proj,v_proj", "--optim", "adamw_torch", "--activation_checkpointing", "true")
_FACTORY_NOTE = ("GPU 'NVIDIA A100 * 1' as the wiki states it; its memory size is not, the 40 GB card's bandwidth "
                 "(the lower) assumed. LLaMA-Factory's defaults of the time assumed: LoRA on q,v, dropout 0, "
                 "checkpointing on. Every sequence counted at the full 1024 tokens (the data and whether TGS counts "
                 "padding are not stated). ")
_FACTORY_HF = ("The model counts attention as one fused kernel, so HF with and without FlashAttention-2 are "
               "predicted alike: without it, the eager attention's mask and softmax passes over T x T scores are "
               "element-wise work the model does not count")
_UNSLOTH_NOTE = ("Unsloth's hand-written backward and fused Triton kernels (RoPE, RMSNorm, SwiGLU, cross-entropy) "
                 "do less element-wise work than transformers + PEFT, which the model counts")
_TT_8B = ("--model", "meta-llama/Llama-3.1-8B", "--dtype", "bfloat16", "--per_device_train_batch_size", "2",
          "--max_seq_length", "2048", "--activation_checkpointing", "true")
_TT_3B = ("--model", "meta-llama/Llama-3.2-3B", "--dtype", "bfloat16", "--per_device_train_batch_size", "2",
          "--max_seq_length", "4096")
_TT_LORA = ("--target_modules", "q_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", "--r", "8", "--lora_dropout",
            "0", "--optim", "adamw_torch", "--activation_checkpointing", "true")
_TT_NOTE = ("torchtune's shipped single-device configs assumed (LoRA r 8 on q,v,output and the MLP, dropout 0, "
            "checkpointing; gradient accumulation 1); packed, so every position is a real token. torch.compile "
            "fuses the element-wise work the model counts op by op")
_TT_FULL = ("--method", "full", "--optim", "paged_adamw_8bit")
_TT_FULL_NOTE = "torchtune's single-device full config assumed (paged 8-bit AdamW); "
_TT_A100 = "A100 memory size not stated: 80 GB assumed. "
# PEFT's stated token count over its stated sequences: the mean training sequence, at which its rows are predicted
PEFT_TOKENS, PEFT_STEPS, PEFT_BATCH = 4_198_051, 5000, 4
PEFT_MEAN_LENGTH = round(PEFT_TOKENS / (PEFT_STEPS * PEFT_BATCH))
_PEFT = ("--model", "meta-llama/Llama-3.2-3B", "--dtype", "bfloat16", "--per_device_train_batch_size", str(PEFT_BATCH),
         "--max_seq_length", str(PEFT_MEAN_LENGTH), "--optim", "adamw_torch", "--activation_checkpointing", "false",
         "--target_modules", "q_proj,v_proj")
_PEFT_NOTE = (f"predicted at the mean training sequence ({PEFT_TOKENS:,} tokens / {PEFT_STEPS * PEFT_BATCH:,} "
              f"sequences = {PEFT_MEAN_LENGTH} tokens); the published time also covers the padding of each batch to "
              "its longest sequence and the evaluation passes, which the model does not")
GUIDE_RECORDS = 100
_GUIDES = ("--model", "meta-llama/Llama-2-7b-hf", "--dtype", "float16", "--quantization", "4bit",
           "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "4", "--max_seq_length", "512",
           "--optim", "paged_adamw_8bit", "--activation_checkpointing", "true",
           "--target_modules", "q_proj,k_proj,v_proj,o_proj")
_GUIDE_NOTE = ("the recipe llama2_7b_lora's settings assumed (every record at 512 tokens, an upper bound for "
               "Alpaca's records; paged 8-bit AdamW; checkpointing; fp16 compute). The model's time barely moves with "
               "the rank, the guide's grows 1.7x from r 4 to r 32; a 4-bit compute dtype left at bitsandbytes' "
               "default float32 (T4: 8.1 TFLOP/s without tensor cores) or evaluation inside the epoch would explain "
               "a slower run; the guide states neither")
_GUIDE_NOT_FITTED = ("the guide states neither its records' lengths nor the 4-bit compute dtype (fp16 or bitsandbytes' "
                     "default fp32: an 8x slower T4), nor whether its minutes include evaluation")

PUBLISHED_SPEEDS: list[PublishedSpeed] = [
    PublishedSpeed(FACTORY, "Llama-2-7B LoRA r 8, HF 16-bit", "A100-40", TRANSFORMERS_PEFT, 2392, TOKENS_PER_SECOND,
                   _FACTORY, note=_FACTORY_NOTE + _FACTORY_HF),
    PublishedSpeed(FACTORY, "Llama-2-7B LoRA r 8, HF + FlashAttention-2, 16-bit", "A100-40", TRANSFORMERS_PEFT, 2954,
                   TOKENS_PER_SECOND, _FACTORY, note=_FACTORY_NOTE + _FACTORY_HF),
    PublishedSpeed(FACTORY, "Llama-2-7B QLoRA r 8, HF 4-bit", "A100-40", TRANSFORMERS_PEFT, 2415, TOKENS_PER_SECOND,
                   (*_FACTORY, "--quantization", "4bit"), note=_FACTORY_NOTE + "bf16 compute"),
    PublishedSpeed(FACTORY, "Llama-2-7B LoRA r 8, Unsloth + FlashAttention-2, 16-bit", "A100-40", UNSLOTH, 4007,
                   TOKENS_PER_SECOND, _FACTORY, note=_FACTORY_NOTE + _UNSLOTH_NOTE),
    PublishedSpeed(FACTORY, "Llama-2-7B QLoRA r 8, Unsloth + FlashAttention-2, 4-bit", "A100-40", UNSLOTH, 3726,
                   TOKENS_PER_SECOND, (*_FACTORY, "--quantization", "4bit"),
                   note=_FACTORY_NOTE + _UNSLOTH_NOTE + "; and its own 4-bit dequantization kernel"),
    PublishedSpeed(PEFT, "Llama-3.2-3B LoRA r 32 (q,v), 5000 steps", "L40S", TRANSFORMERS_PEFT, 942, SECONDS,
                   (*_PEFT, "--r", "32"), PEFT_STEPS, _PEFT_NOTE),
    PublishedSpeed(PEFT, "Llama-3.2-3B DoRA r 32 (q,v), 5000 steps", "L40S", TRANSFORMERS_PEFT, 1191, SECONDS,
                   (*_PEFT, "--method", "dora", "--r", "32"), PEFT_STEPS, _PEFT_NOTE),
    PublishedSpeed(PEFT, "Llama-3.2-3B AdaLoRA 64 -> 32 (q,v), 5000 steps", "L40S", TRANSFORMERS_PEFT, 1169, SECONDS,
                   (*_PEFT, "--method", "adalora", "--init_r", "64", "--target_r", "32"), PEFT_STEPS,
                   _PEFT_NOTE + "; AdaLoRA's periodic rank reallocation is not counted"),
    PublishedSpeed(PEFT, "Llama-3.2-3B full fine-tuning, 5000 steps", "L40S", TRANSFORMERS_PEFT, 2147, SECONDS,
                   (*_PEFT, "--method", "full"), PEFT_STEPS,
                   _PEFT_NOTE + "; bf16 weights and AdamW states (no fp32 master copy). The optimizer's update of "
                                "3.2 B parameters each step is counted as one fused pass over its bytes; torch's AdamW "
                                "on a GPU defaults to foreach, not fused, which passes over parameters, gradients and "
                                "both states several times: the likely part of the step the model misses"),
    *(PublishedSpeed(GUIDES, f"Llama-2-7B QLoRA r {r} (q,k,v,o), batch 1 x 4, {GUIDE_RECORDS} Alpaca records", "T4",
                     TRANSFORMERS_PEFT, minutes, MINUTES_PER_EPOCH, (*_GUIDES, "--r", str(r)), GUIDE_RECORDS // 4,
                     _GUIDE_NOTE, _GUIDE_NOT_FITTED)
      for r, minutes in ((4, 6), (8, 7), (16, 8), (32, 10))),
    PublishedSpeed(TORCHTUNE_README, "Llama-3.1-8B full, batch 2, packed 2048", "RTX 4090", TORCHTUNE, 1650,
                   TOKENS_PER_SECOND, (*_TT_8B, *_TT_FULL),
                   note=_TT_FULL_NOTE + "compiled; it steps the optimizer inside the backward pass"),
    PublishedSpeed(TORCHTUNE_README, "Llama-3.1-8B LoRA, batch 2, packed 2048", "RTX 4090", TORCHTUNE, 3083,
                   TOKENS_PER_SECOND, (*_TT_8B, *_TT_LORA), note=_TT_NOTE),
    PublishedSpeed(TORCHTUNE_README, "Llama-3.1-8B QLoRA, batch 2, packed 2048", "RTX 4090", TORCHTUNE, 2413,
                   TOKENS_PER_SECOND, (*_TT_8B, *_TT_LORA, "--quantization", "4bit"),
                   note=_TT_NOTE + "; its own NF4 dequantization (torchao), not bitsandbytes'"),
    PublishedSpeed(TORCHTUNE_README, "Llama-3.2-3B LoRA, batch 2 x 4096", "A100-80", TORCHTUNE, 8210,
                   TOKENS_PER_SECOND, (*_TT_3B, *_TT_LORA), note=_TT_A100 + _TT_NOTE),
    PublishedSpeed(TORCHTUNE_README, "Llama-3.2-3B QLoRA, batch 2 x 4096", "A100-80", TORCHTUNE, 8035,
                   TOKENS_PER_SECOND, (*_TT_3B, *_TT_LORA, "--quantization", "4bit"), note=_TT_A100 + _TT_NOTE),
    PublishedSpeed(TORCHTUNE_TUTORIAL, "full, baseline (not packed)", "A100-80", TORCHTUNE_EAGER, 2091,
                   TOKENS_PER_SECOND, (*_TT_3B, *_TT_FULL, "--activation_checkpointing", "false"),
                   note=_TT_A100 + _TT_FULL_NOTE + "not packed: its tokens/s counts the real tokens of padded "
                   "batches, whose lengths are not stated; predicted at full 4096-token sequences"),
    PublishedSpeed(TORCHTUNE_TUTORIAL, "full, + packing", "A100-80", TORCHTUNE_EAGER, 7075, TOKENS_PER_SECOND,
                   (*_TT_3B, *_TT_FULL, "--activation_checkpointing", "false"),
                   note=_TT_A100 + _TT_FULL_NOTE + "eager"),
    PublishedSpeed(TORCHTUNE_TUTORIAL, "full, + packing + compile", "A100-80", TORCHTUNE, 8998, TOKENS_PER_SECOND,
                   (*_TT_3B, *_TT_FULL, "--activation_checkpointing", "false"), note=_TT_A100 + _TT_FULL_NOTE),
    PublishedSpeed(TORCHTUNE_TUTORIAL, "full, + packing + compile + chunked cross-entropy", "A100-80", TORCHTUNE,
                   9174, TOKENS_PER_SECOND, (*_TT_3B, *_TT_FULL, "--activation_checkpointing", "false"),
                   note=_TT_A100 + _TT_FULL_NOTE + "the chunked loss never holds the full fp32 logits"),
    PublishedSpeed(TORCHTUNE_TUTORIAL, "full, + packing + compile + chunked CE + checkpointing", "A100-80", TORCHTUNE,
                   7210, TOKENS_PER_SECOND, (*_TT_3B, *_TT_FULL, "--activation_checkpointing", "true"),
                   note=_TT_A100 + _TT_FULL_NOTE + "the chunked loss never holds the full fp32 logits"),
]

# Figures in BENCHMARKS.md the table cannot predict, and why (said in the markdown, not dropped silently).
NOT_PREDICTED: list[tuple[str, str]] = [
    ("ms-swift tuner tables (A100, Qwen-7B-Chat): LoRA 0.95, DoRA 0.51, AdaLoRA 0.92, full 1.43 samples/s",
     "neither the batch nor the samples' lengths are stated, so samples/s cannot be turned into tokens; full "
     "fine-tuning ran on several GPUs"),
    ("ms-swift, length 2048, batch 1: bf16 4.31, bitsandbytes 4-bit 2.41, GPTQ int4 2.05 samples/s",
     "2048 is the longest a sample may be, not its length (at 2048 tokens a sample, 4.31 samples/s of LoRA with "
     "checkpointing on a 7B model, ~6 x 7.7 G FLOPs a token, would be beyond an A100's peak); the mean length is not "
     "stated"),
    ("Unsloth: 2x faster than HF + FlashAttention-2 (Llama-3.1-8B QLoRA); HF x Unsloth blog: 1.87x, 1.88x, 3.87x",
     "ratios between two stacks; the model predicts transformers + PEFT and does not model Unsloth's kernels"),
    ("padding-free training: 2x (FLAN) and 1.4x (OrcaMath) throughput; Unsloth packing: up to 5x, typically 3x",
     "ratios that depend on the spread of the data's lengths, which none of them states"),
    ("Liger kernels: +20 % throughput (Llama-3-8B, 8x A100, FSDP)",
     "a ratio on eight GPUs with FSDP; the model predicts one GPU"),
]


@dataclass(frozen=True)
class Prediction:
    entry: PublishedSpeed
    tokens_per_step: int
    published_step_seconds: float  # the published figure as seconds per optimizer step
    peak_compute_seconds: float  # the step's FLOPs at the data sheet's full matmul peak
    other_seconds: float  # the step's memory and overhead time (timing.BANDWIDTH_FRACTION, overheads)
    speed_source: str

    def step_seconds(self, fraction: float) -> float:
        return self.peak_compute_seconds / fraction + self.other_seconds

    def figure(self, fraction: float) -> float:
        """The prediction in the published figure's unit, at this matmul fraction."""
        seconds = self.step_seconds(fraction)
        if self.entry.unit == TOKENS_PER_SECOND:
            return self.tokens_per_step / seconds
        return seconds * self.entry.steps / (60 if self.entry.unit == MINUTES_PER_EPOCH else 1)

    def error(self, fraction: float) -> float:
        return self.figure(fraction) / self.entry.figure - 1

    @property
    def implied_fraction(self) -> float:
        """The matmul fraction that makes this row exact; inf where memory and overhead alone take longer than the
        published step (no matmul rate could make the model that fast)."""
        left = self.published_step_seconds - self.other_seconds
        return self.peak_compute_seconds / left if left > 0 else math.inf


def predict(entry: PublishedSpeed) -> Prediction:
    """The row's step, counted on its settings and timed on its GPU's data sheet."""
    import torch

    from harness.plan.architectures import model_config
    from harness.plan.gpus import GPUS
    from harness.plan.timing import MATMUL_FRACTION, speed_from, step_seconds
    from harness.plan.work import step_work
    from harness.run.command_line import parse_args

    cfg = parse_args({"output_dir": "outputs/plan"}, list(entry.settings))
    dtype = cfg.model.dtype if cfg.model.dtype in ("bfloat16", "float16") else "bfloat16"
    work = step_work(cfg, model_config(cfg.model.model), compute_dtype=getattr(torch, dtype))
    speed = speed_from(GPUS[entry.gpu].speed, None, dtype, "cuda")
    estimate = step_seconds(work, speed, micro_batches=cfg.train.gradient_accumulation_steps)
    tokens = work.tokens
    published = (tokens / entry.figure if entry.unit == TOKENS_PER_SECOND
                 else entry.figure * (60 if entry.unit == MINUTES_PER_EPOCH else 1) / entry.steps)
    # compute_seconds is FLOPs / (peak x MATMUL_FRACTION) (a data sheet's speed has no separate skinny rate)
    return Prediction(entry, tokens, published, estimate.compute_seconds * MATMUL_FRACTION,
                      estimate.memory_seconds + estimate.overhead_seconds, speed.source)


def predictions(entries: list[PublishedSpeed] | None = None) -> list[Prediction]:
    from harness.models.loading import quiet_libraries

    with quiet_libraries():
        return [predict(entry) for entry in (PUBLISHED_SPEEDS if entries is None else entries)]


def fit(rows: list[Prediction]) -> float:
    """The matmul fraction: the median of the fitted rows' implied fractions (a median, so that one row's
    unstated settings move it no more than one place)."""
    implied = [row.implied_fraction for row in rows if row.entry.fitted]
    if not implied:
        raise ValueError("no transformers + PEFT row to fit")
    return statistics.median(implied)


def leave_one_out(rows: list[Prediction]) -> dict[int, float]:
    """For each fitted row (by its index), its error with the fraction fitted on the other fitted rows."""
    fitted = [i for i, row in enumerate(rows) if row.entry.fitted]
    return {i: rows[i].error(fit([rows[j] for j in fitted if j != i])) for i in fitted if len(fitted) > 1}


def markdown(rows: list[Prediction]) -> str:
    from harness.plan.gpus import GPUS
    from harness.plan.timing import BANDWIDTH_FRACTION, MATMUL_FRACTION
    from harness.run.measure import git_state, versions

    fitted = fit(rows)
    held_out = leave_one_out(rows)
    ours = [row for row in rows if row.entry.stack in FITTED_STACKS]
    in_fit = [row for row in ours if row.entry.fitted]
    hits = [row for row in ours if abs(row.error(MATMUL_FRACTION)) <= WITHIN]
    held_hits = [i for i, error in held_out.items() if abs(error) <= WITHIN]
    every = statistics.median(row.implied_fraction for row in ours)
    left_out = sorted({row.entry.source + ": " + row.entry.not_fitted for row in ours if not row.entry.fitted})
    found, state = versions(), git_state()
    commit = (state["commit"] or "not a git checkout")[:12] + (" (with uncommitted changes)" if state["dirty"] else "")
    share = f"{len(hits)} of {len(ours)}" + (f" ({len(hits) / len(ours):.0%})" if ours else "")
    lines = [
        "# The time planner beside published throughput figures", "",
        f"Made by `{COMMAND}` (commit {commit}; " + ", ".join(
            f"{p} {found[p]}" for p in ("torch", "transformers", "peft") if p in found)
        + "; arithmetic on the meta device, no GPU and no weights involved). The figures, their sources, the stack "
        "each ran on and the settings each states are data in "
        "[harness/plan/time_vs_published.py](../harness/plan/time_vs_published.py), copied from "
        "../shared/BENCHMARKS.md.", "",
        "*predicted*: the work of one optimizer step counted on the meta model at the row's settings "
        "(harness/plan/work.py), timed on the GPU's data sheet times the achievable fractions "
        f"(harness/plan/timing.py: matmul {MATMUL_FRACTION}, bandwidth {BANDWIDTH_FRACTION}), in the source's unit. "
        "*error*: predicted over published, minus 1 (for tokens/s a negative error is a prediction too slow; for "
        "a time, too fast). *held out*: the error with the matmul fraction fitted on the other fitted rows. "
        "*implied*: the matmul fraction that would make the row exact (inf: memory and overheads alone take "
        "longer than the published step).", "",
        "## The fit", "",
        f"MATMUL_FRACTION = median of the implied fractions of the {len(in_fit)} fitted transformers + PEFT rows = "
        f"{fitted:.3f}; timing.py holds it rounded: {MATMUL_FRACTION}. Fitted: "
        + "; ".join(sorted({f"{row.entry.source} ({row.entry.gpu})" for row in in_fit})) + ". "
        + "".join(f"Held to the target but not fitted, {reason}. " for reason in left_out)
        + f"The median over every transformers + PEFT row would be {every:.3f}. BANDWIDTH_FRACTION and the overheads "
        "are not fitted: every row mixes compute, memory and overhead, and with their lengths and data unstated the "
        "rows cannot separate a second constant.", "",
        f"**Within +-{WITHIN:.0%}, transformers + PEFT rows: {share}** with the fitted fraction; held out, "
        f"{len(held_hits)} of {len(held_out)} fitted rows (each predicted with the fraction fitted on the others). "
        "Rows on other stacks are shown, not fitted.", "",
        "## Data sheets used", "",
        *sorted({f"- {gpu}: {GPUS[gpu].speed.source}; 16-bit dense {GPUS[gpu].speed.fp16 / 1e12:g} TFLOP/s, "
                 f"{GPUS[gpu].speed.bandwidth / 1e9:g} GB/s" for gpu in {row.entry.gpu for row in rows}}), "",
        "## Predicted vs published", "",
        "| source | GPU | run | stack | published | predicted | error | held out | implied | verdict | "
        "planner flags | settings assumed, and why the error |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---|---|---|"]
    for i, row in enumerate(rows):
        entry, error = row.entry, row.error(MATMUL_FRACTION)
        lines.append(
            f"| {entry.source} | {entry.gpu} | {entry.what} | {entry.stack} | {entry.figure:g} {entry.unit} | "
            f"{row.figure(MATMUL_FRACTION):.4g} {entry.unit} | {error:+.0%} | "
            + (f"{held_out[i]:+.0%}" if i in held_out else "not fitted" if entry.stack in FITTED_STACKS
               else "other stack")
            + f" | {row.implied_fraction:.2f} | {verdict(row, MATMUL_FRACTION)} | {' '.join(entry.settings)} | "
            f"{entry.note} |")
    misses = [row for row in ours if abs(row.error(MATMUL_FRACTION)) > WITHIN]
    lines += ["", "## The misses, explained", ""] + [
        f"- {row.entry.source}, {row.entry.what} ({row.entry.gpu}): {verdict(row, MATMUL_FRACTION)}. "
        f"{row.entry.note[:1].upper()}{row.entry.note[1:]}."
        for row in misses]
    lines += ["", "## Not predicted", ""] + [f"- {what}: {why}." for what, why in NOT_PREDICTED]
    return "\n".join(lines) + "\n"


def verdict(row: Prediction, fraction: float) -> str:
    """Within the target, or which way it misses; for another stack, whether its own kernels beat the model."""
    predicted, published = row.step_seconds(fraction), row.published_step_seconds
    if row.entry.stack not in FITTED_STACKS:
        if published < predicted:
            return f"its own kernels beat the model by {predicted / published:.2f}x"
        return f"slower than the model by {published / predicted:.2f}x"
    if abs(row.error(fraction)) <= WITHIN:
        return "within +-25%"
    return (f"miss: the model is {published / predicted:.2f}x too fast" if published > predicted
            else f"miss: the model is {predicted / published:.2f}x too slow")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    with reported_as_one_line("time_vs_published"):
        parser = OneLineArgumentParser(prog="python -m harness.plan.time_vs_published",
                                       description="The time planner beside published throughput figures.")
        parser.add_argument("--output", default=None, metavar="FILE",
                            help="write the markdown here (default: stdout), e.g. results/time_vs_published.md")
        parser.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
        args = parser.parse_args(argv)
        output = output_file(args.output, args.overwrite, "results/time_vs_published.md")
        write_or_print(markdown(predictions()), output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
