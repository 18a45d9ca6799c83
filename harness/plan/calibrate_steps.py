"""The calibration's training-step grid: short runs of real training steps on random-init models of the recipes'
shapes, each measured beside what the memory plan and the time model say of it (harness.plan.calibrate runs it
after its matmul and bandwidth figures; see there for the command and the record's fields).

Why this module is long: the grid is data (the GPU's points and the CPU check's, each with its tip) plus the one
path every point takes (built, trained, timed, planned, put on the page), whose pieces share the point's
settings and the time budget; apart, each would reach into the others.

Every point is built from a transformers config on the device itself, with random-init weights (nothing is
downloaded: the configs are harness.plan.architectures' built-in copies), then trained as a recipe trains it:
the same settings parser (harness.run.command_line.parse_args), the same PEFT config (harness.models.methods),
bitsandbytes 4-bit layers prepared by PEFT's prepare_model_for_kbit_training as harness.models.loading does, the
Trainer settings every objective shares (harness.run.training.trainer_settings: mixed precision from the
model's dtype, non-reentrant checkpointing) and transformers' Trainer with the run's own optimizer (paged 8-bit
AdamW for the 7B points, as the 7B recipes use it), with the loss computed as TRL's SFTTrainer computes it (its
fused LM head, trl.trainer.utils.add_fused_lm_head, with the outputs SFTTrainer asks for); SFTTrainer's logging
of those metrics is not part of these steps.

The model is materialised one module at a time (its parameters made on the device and initialised by the
model's own _init_weights, a 4-bit base's Linear layers quantized as soon as they exist), so a 4-bit 7B point
never holds the 16-bit model whole: it fits where the recipe's 4-bit load fits.

Rows: "full" rows are max_seq_length real tokens each (what the plan assumes: dynamic padding's longest batch);
"padded" rows hold one example of half the length, padding after it (attention mask 0, labels -100);
"packed" lays the same examples end to end in one row with their positions restarting at each example
(padding-free packing, transformers' DataCollatorWithFlattening: no padding computed, each example attends to
itself only). The packing pair trains the same examples, so their step times compare what packing saves.

Each point: WARM_UP_STEPS optimizer steps, then up to TIMED_STEPS timed ones (torch.cuda.synchronize before
every clock read), stopped early at the point's deadline; the peak allocated and reserved memory of the
training (reset after the model is built). A point that runs out of memory or fails is recorded with its reason
and the grid goes on; points the time budget leaves no room for are recorded as skipped ("time budget").
"""
from __future__ import annotations

import dataclasses
import gc
import statistics
import tempfile
import time

from transformers import TrainerCallback

from harness.errors import first_line
from harness.models.loading import quiet_libraries

QWEN2_7B, QWEN2_5_0_5B = "Qwen/Qwen2-7B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct"
SMALL = "small"  # a tiny Qwen2 shape (SMALL_CONFIG) for the CPU check
SMALL_CONFIG = dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024,
                    tie_word_embeddings=True, hidden_act="silu")
# The 7B recipes' training (harness.run.presets.KAGGLE_T4_TRAINING) at one micro-batch a step, 4 rows of 512.
_7B = ["--per_device_train_batch_size", "4", "--max_seq_length", "512", "--activation_checkpointing", "true",
       "--optim", "paged_adamw_8bit", "--target_modules", "all7", "--lora_alpha", "16"]
_4BIT = ["--quantization", "4bit", "--bnb_4bit_quant_type", "nf4", "--bnb_4bit_use_double_quant", "true"]

# The grid on a GPU: name, model (a built-in config), recipe settings, rows ("full", "padded", "packed"), tip.
GPU_GRID = [
    dict(name="LoRA r8, 16-bit", model=QWEN2_7B, flags=[*_7B, "--method", "lora", "--r", "8"], rows="full",
         tip="the base case: 16-bit 7B, LoRA on all seven projections, 4 x 512 tokens"),
    dict(name="LoRA r64, 16-bit", model=QWEN2_7B, flags=[*_7B, "--method", "lora", "--r", "64"], rows="full",
         tip="rank 64 beside rank 8: what a rank costs (skinny products, optimizer states)"),
    dict(name="QLoRA r16, 4-bit", model=QWEN2_7B, flags=[*_7B, *_4BIT, "--method", "lora", "--r", "16"],
         rows="full", tip="4-bit NF4 base: every weight dequantized in forward, recompute and backward"),
    dict(name="DoRA r16, 16-bit", model=QWEN2_7B, flags=[*_7B, "--method", "dora", "--r", "16"], rows="full",
         tip="DoRA: the weight norm of W + BA in every forward"),
    dict(name="AdaLoRA 12->4, 4-bit", model=QWEN2_7B,
         flags=[*_7B, *_4BIT, "--method", "adalora", "--init_r", "12", "--target_r", "4"], rows="full",
         tip="the flagship recipe's AdaLoRA: importance scores and orthogonality penalty every step"),
    dict(name="IA3, 16-bit", model=QWEN2_7B, flags=[*_7B, "--method", "ia3"], rows="full",
         tip="IA3: scaling vectors only, a step close to the frozen model's forward and backward"),
    dict(name="prompt tuning, 16-bit", model=QWEN2_7B, flags=[*_7B, "--method", "prompt_tuning"], rows="full",
         tip="virtual tokens: longer sequences, gradients back through the whole model to the input"),
    dict(name="full fine-tuning, 0.5B", model=QWEN2_5_0_5B,
         flags=["--per_device_train_batch_size", "4", "--max_seq_length", "512", "--activation_checkpointing",
                "false", "--optim", "adamw_torch", "--method", "full"], rows="full",
         tip="every weight trained (fp32 masters under bf16 autocast), AdamW states, no checkpointing"),
    dict(name="LoRA r8, 16-bit, 2048 tokens", model=QWEN2_7B,
         flags=[*_7B, "--method", "lora", "--r", "8", "--max_seq_length", "2048"], rows="full",
         tip="the second length: attention's share grows with the length"),
    dict(name="LoRA r8, 16-bit, padded", model=QWEN2_7B,
         flags=[*_7B, "--method", "lora", "--r", "8", "--per_device_train_batch_size", "8"], rows="padded",
         tip="packing off: 8 examples of 256 tokens, each padded to 512"),
    dict(name="LoRA r8, 16-bit, packed", model=QWEN2_7B,
         flags=[*_7B, "--method", "lora", "--r", "8", "--per_device_train_batch_size", "8"], rows="packed",
         tip="packing on: the same 8 examples end to end in one row of 2048, positions restarting"),
]
_SMALL = ["--per_device_train_batch_size", "2", "--max_seq_length", "32", "--activation_checkpointing", "true",
          "--optim", "adamw_torch", "--target_modules", "all7"]
SMALL_GRID = [  # the CPU check (--small): the same code path on SMALL_CONFIG, seconds
    dict(name="LoRA r8", model=SMALL, flags=[*_SMALL, "--method", "lora", "--r", "8"], rows="full",
         tip="the base case"),
    dict(name="full fine-tuning, padded", model=SMALL,
         flags=[*_SMALL, "--method", "full", "--activation_checkpointing", "false"], rows="padded",
         tip="every weight trained; rows half padding"),
    dict(name="QLoRA r8, 4-bit, packed", model=SMALL, flags=[*_SMALL, *_4BIT, "--method", "lora", "--r", "8"],
         rows="packed", tip="a 4-bit base (bitsandbytes on the CPU), the examples packed end to end"),
]
# The grid on a CPU (full mode): the 135M shape this project trains there (smollm2-135m's config, random-init
# weights), in float32 as a CPU run trains, one micro-batch of 4 x 128 tokens; each step takes seconds.
_135M, SMOLLM2 = ["--per_device_train_batch_size", "4", "--max_seq_length", "128", "--activation_checkpointing",
                  "false", "--optim", "adamw_torch", "--target_modules", "all7"], "smollm2-135m"
CPU_GRID = [
    dict(name="LoRA r8", model=SMOLLM2, flags=[*_135M, "--method", "lora", "--r", "8"], rows="full",
         tip="the base case: LoRA on all seven projections, 4 x 128 tokens"),
    dict(name="LoRA r8, packed", model=SMOLLM2, flags=[*_135M, "--method", "lora", "--r", "8"], rows="packed",
         tip="the recipes' padding-free default: examples end to end in one row (attention over all of it, masked)"),
    dict(name="full fine-tuning", model=SMOLLM2, flags=[*_135M, "--method", "full"], rows="full",
         tip="every weight trained: weight gradients and AdamW over 135M parameters"),
    dict(name="QLoRA r8, 4-bit", model=SMOLLM2, flags=[*_135M, *_4BIT, "--method", "lora", "--r", "8"],
         rows="full", tip="a 4-bit base (bitsandbytes on the CPU): dequantized in every product"),
    dict(name="IA3", model=SMOLLM2, flags=[*_135M, "--method", "ia3"], rows="full",
         tip="learned scalings only: no adapter products"),
    dict(name="prompt tuning", model=SMOLLM2, flags=[*_135M, "--method", "prompt_tuning"], rows="full",
         tip="virtual tokens in front of each row"),
]
WARM_UP_STEPS = {"full": 2, "small": 1}
TIMED_STEPS = {"full": 5, "small": 2}
# Seconds. The whole command must end within 8 minutes on a GPU: the matmuls and bandwidth take ~30 s, each
# point's plan and work count a few seconds after the grid; the grid itself stops starting points after
# GRID_BUDGET_S, and no point runs past POINT_S (its timed steps stop there) or starts with less than
# MIN_POINT_S left.
GRID_BUDGET_S = {"full": 300.0, "small": 120.0}
POINT_S = {"full": 45.0, "small": 30.0}
MIN_POINT_S = {"full": 15.0, "small": 1.0}


def grid(mode: str, kind: str = "cuda") -> list[dict]:
    """The points of a calibration in `mode` ("full" or "small") on a device of `kind` ("cuda" or "cpu")."""
    if mode != "full":
        return SMALL_GRID
    return GPU_GRID if kind == "cuda" else CPU_GRID


def run_grid(torch, where, points: list[dict], mode: str, speeds: dict, sync) -> tuple[list[dict], dict]:
    """Measure every point in turn (within the time budget), then plan and predict each: (the record's "steps",
    its "step_grid": how the grid ran and the memory outside torch's allocator)."""
    cuda = where.type == "cuda"
    memory = _context(torch, where) if cuda else {"context_bytes": None, "context_how": "not measured on a CPU"}
    started = time.perf_counter()
    deadline = started + GRID_BUDGET_S[mode]
    rows = []
    for point in points:
        left = deadline - time.perf_counter()
        row = {"name": point["name"], "tip": point["tip"], "model": point["model"], "weights": "random-init",
               "rows": point["rows"], "flags": list(point["flags"])}
        if cuda and (where.index or 0) != 0:  # the Trainer trains on cuda:0 of the GPUs this process sees
            row.update(status="skipped", reason=f"the Trainer trains on cuda:0; run with CUDA_VISIBLE_DEVICES="
                                                f"{where.index} and --device cuda to measure the steps of {where}")
        elif left < MIN_POINT_S[mode]:
            row.update(status="skipped", reason=f"time budget: {max(left, 0):.0f} s of the grid's "
                                                f"{GRID_BUDGET_S[mode]:.0f} s left")
        else:
            row.update(_measure_point(torch, where, point, mode, sync, min(left, POINT_S[mode])))
        print(f"step grid: {row['name']}: {_said(row)}")
        rows.append(row)
        _free(torch, cuda)
    for row, point in zip(rows, points):
        row.update(_planned(torch, point, row, speeds, memory["context_bytes"], cuda))
    return rows, {"mode": mode, "weights": "random-init", "dtype": _dtype_name(torch, where.type),
                  "trainer": "transformers.Trainer, TRL's fused LM head (as SFTTrainer)", "warm_up_steps": WARM_UP_STEPS[mode],
                  "timed_steps": TIMED_STEPS[mode], "budget_seconds": GRID_BUDGET_S[mode],
                  "seconds": time.perf_counter() - started, **memory}


def _said(row: dict) -> str:
    if row["status"] != "measured":
        return f"{row['status']} ({row['reason']})"
    return f"{row['step_seconds']['median']:.3f} s a step"


def _context(torch, where) -> dict:
    """The process's memory outside torch's allocator: the device's used memory less what torch has reserved,
    after emptying its cache (so other processes on the same GPU would count in: calibrate on an idle one)."""
    torch.cuda.synchronize(where)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(where)
    return {"context_bytes": int(total - free - torch.cuda.memory_reserved(where)),
            "context_how": "device memory in use (torch.cuda.mem_get_info) less torch's reserved, cache emptied"}


def _free(torch, cuda: bool) -> None:
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def point_cfg(point: dict, output_dir: str, computed: bool = False):
    """The point's RunConfig as a recipe parses it. computed=True: the batch as the step computes it (a packed
    batch is one row of every example end to end), which is what the plan and the work count are given."""
    from harness.run.command_line import parse_args

    cfg = parse_args({}, ["--model", point["model"], "--output_dir", output_dir, "--gradient_accumulation_steps",
                          "1", *point["flags"]])
    if computed and point["rows"] == "packed":
        cfg = parse_args({}, ["--model", point["model"], "--output_dir", output_dir,
                              "--gradient_accumulation_steps", "1", *point["flags"],
                              "--per_device_train_batch_size", "1",
                              "--max_seq_length", str(_examples(cfg)[0] * _examples(cfg)[1])])
    return cfg


def _examples(cfg) -> tuple[int, int]:
    """(examples, tokens each) of a padded or packed point: the batch's rows, each half real tokens."""
    return cfg.train.per_device_train_batch_size, cfg.data.max_seq_length // 2


def point_config(point: dict):
    """The point's transformers config: a built-in one, or SMALL_CONFIG with the point's own "config" fields."""
    from transformers import AutoConfig

    from harness.plan.architectures import model_config

    if point["model"] == SMALL:
        fields = {**SMALL_CONFIG, **point.get("config", {})}
        return AutoConfig.for_model(fields.pop("model_type"), **fields)
    return model_config(point["model"])


def _measure_point(torch, where, point: dict, mode: str, sync, seconds: float) -> dict:
    start = time.perf_counter()
    deadline = start + seconds
    try:
        with tempfile.TemporaryDirectory(prefix="calibrate-") as out:
            cfg = point_cfg(point, out)
            config = point_config(point)
            with quiet_libraries():  # PEFT's and transformers' notes and deprecations: not the user's concern here
                model = _random_init_model(torch, cfg, config, where)
                built = time.perf_counter() - start
                if where.type == "cuda":
                    torch.cuda.synchronize(where)
                    torch.cuda.reset_peak_memory_stats(where)
                clock = _StepClock(sync, deadline)
                trainer = _trainer(torch, cfg, model, point["rows"], config.vocab_size, mode, clock)
                trainer.train()
            peaks = ({"peak_allocated_bytes": int(torch.cuda.max_memory_allocated(where)),
                      "peak_reserved_bytes": int(torch.cuda.max_memory_reserved(where))}
                     if where.type == "cuda" else {"peak_allocated_bytes": None, "peak_reserved_bytes": None})
    except Exception as exc:  # any fault of one point is its result; the grid goes on
        oom = type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()
        return {"status": "out of memory" if oom else "failed", "reason": f"{type(exc).__name__}: {first_line(exc)}"}
    warm = WARM_UP_STEPS[mode]
    timed = clock.seconds[warm:]
    if not timed:
        return {"status": "failed", "reason": f"no timed step within the point's {seconds:.0f} s "
                                              f"({len(clock.seconds)} warm-up step(s) ran)"}
    tokens = _tokens(cfg, point["rows"])
    median = statistics.median(timed)
    return {"status": "measured", "build_seconds": built, "warm_up_seconds": clock.seconds[:warm],
            "step_seconds": {"median": median, "min": min(timed), "max": max(timed), "all": timed},
            **tokens, "tokens_per_second": tokens["real_tokens"] / median, **peaks}


def _tokens(cfg, rows: str) -> dict:
    batch, length = cfg.train.per_device_train_batch_size, cfg.data.max_seq_length
    if rows == "full":
        return {"real_tokens": batch * length, "computed_tokens": batch * length}
    examples, each = _examples(cfg)
    return {"real_tokens": examples * each, "computed_tokens": examples * (each if rows == "packed" else length)}


def _random_init_model(torch, cfg, config, where):
    """The run's trainable model with random-init weights, built on `where` one module at a time: as
    harness.models.loading.load_model loads it (the same dtype rule, 4-bit layers prepared by PEFT's
    prepare_model_for_kbit_training), then the run's PEFT config from harness.models.methods."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from harness.models.loading import compute_dtype
    from harness.models.methods import adalora_schedule, peft_config

    method, four_bit = cfg.method.method, cfg.model.quantization == "4bit"
    if cfg.model.quantization not in ("none", "4bit"):
        raise ValueError(f"the grid builds 16-bit and 4-bit bases, not {cfg.model.quantization}")
    dtype = compute_dtype(cfg.model.dtype) if where.type == "cuda" else torch.float32
    load_dtype = torch.float32 if method == "full" and cfg.model.dtype == "auto" else dtype
    with init_empty_weights():  # parameters on meta, buffers (RoPE's frequencies) real
        model = AutoModelForCausalLM.from_config(config, dtype=load_dtype,
                                                 attn_implementation=cfg.model.attn_implementation or "sdpa")
    head, replaced = model.get_output_embeddings(), set()
    with torch.no_grad():
        for module in list(model.modules()):  # parents before their children
            if id(module) in replaced:
                continue
            if any(p.is_meta for p in module.parameters(recurse=False)):
                module.to_empty(device=where, recurse=False)
                model._init_weights(module)
            for name, child in list(module.named_children()) if four_bit else ():
                if isinstance(child, torch.nn.Linear) and child is not head:
                    child.to_empty(device=where, recurse=False)
                    model._init_weights(child)
                    setattr(module, name, _four_bit(torch, child, cfg.model, dtype, where))
                    child.to("meta")  # its 16-bit weight freed at once: never the whole 16-bit model at a time
                    replaced.add(id(child))
    model.tie_weights()
    model.to(where)  # the buffers
    if four_bit:
        from peft import prepare_model_for_kbit_training

        model.is_loaded_in_4bit = True  # what from_pretrained sets, and prepare_model_for_kbit_training reads
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.train.activation_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    if method == "full":
        return model
    peft = peft_config(cfg.method, model, adalora_schedule(cfg.method, 1000) if method == "adalora" else None)
    from peft import get_peft_model

    return get_peft_model(model, peft)


def _four_bit(torch, linear, model_args, compute_dtype, where):
    """A Linear layer as bitsandbytes' 4-bit one, its random-init weight quantized on the device (Params4bit
    quantizes as it moves there), as from_pretrained's BitsAndBytesConfig would hold it."""
    import bitsandbytes as bnb

    double = bool(model_args.bnb_4bit_use_double_quant)
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=double,
                              quant_type=model_args.bnb_4bit_quant_type, device="meta")
    layer.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, compress_statistics=double,
                                     quant_type=model_args.bnb_4bit_quant_type).to(where)
    if linear.bias is not None:
        layer.bias = linear.bias
    return layer


def _batches(torch, rows: str, cfg, vocab: int, steps: int) -> tuple[list[dict], object]:
    """(examples, collator) for `steps` optimizer steps of one micro-batch: random token ids."""
    from transformers import DataCollatorWithFlattening, default_data_collator

    generator = torch.Generator().manual_seed(0)
    batch, length = cfg.train.per_device_train_batch_size, cfg.data.max_seq_length
    examples = []
    for _ in range(steps * batch):
        if rows == "full":
            ids = torch.randint(0, vocab, (length,), generator=generator)
            examples.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
            continue
        ids = torch.randint(0, vocab, (length // 2,), generator=generator)
        if rows == "packed":
            examples.append({"input_ids": ids.tolist(), "labels": ids.tolist()})
            continue
        pad = torch.zeros(length - ids.numel(), dtype=ids.dtype)
        mask = torch.cat([torch.ones_like(ids), pad])
        examples.append({"input_ids": torch.cat([ids, pad]), "attention_mask": mask,
                         "labels": torch.cat([ids, pad - 100])})
    return examples, DataCollatorWithFlattening() if rows == "packed" else default_data_collator


def _trainer(torch, cfg, model, rows: str, vocab: int, mode: str, clock):
    from transformers import PrinterCallback, Trainer

    from harness.run.training import trainer_settings

    steps = WARM_UP_STEPS[mode] + TIMED_STEPS[mode]
    targs = dataclasses.replace(cfg.train, max_steps=steps, save_strategy="no", eval_strategy="no",
                                logging_strategy="no", report_to=[], disable_tqdm=True, remove_unused_columns=False,
                                include_num_input_tokens_seen="no",
                                dataloader_num_workers=0, lr_scheduler_type="constant", warmup_steps=0)
    targs = trainer_settings(cfg, targs)
    if targs.n_gpu > 1:  # one GPU, as calibrated: not nn.DataParallel over every GPU the machine has
        targs._n_gpu = 1
    examples, collator = _batches(torch, rows, cfg, vocab, steps)
    # As SFTTrainer trains (harness.plan.work counts the same): the loss by TRL's fused LM head, asked per batch
    from trl.trainer.utils import add_fused_lm_head

    from harness.plan.meta_ops import FUSED_HEAD_OUTPUTS

    add_fused_lm_head(model.get_base_model() if hasattr(model, "get_base_model") else model, outputs=FUSED_HEAD_OUTPUTS)
    batches = collator

    def collator(features):
        return {**batches(features), "fused_lm_head": True}

    callbacks = [clock]
    if cfg.method.method == "adalora":  # as the recipes run it: importance scores after every optimizer step
        from harness.objectives.sft_trainer import AdaLoraAllocation

        callbacks.append(AdaLoraAllocation(model))
    trainer = Trainer(model=model, args=targs, train_dataset=examples, data_collator=collator, callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)  # its dict of the run's metrics: the grid prints its own line
    return trainer


class _StepClock(TrainerCallback):
    """Seconds of each optimizer step (the clock read after the device finishes), stopping at a deadline."""

    def __init__(self, sync, deadline: float):
        self.sync, self.deadline = sync, deadline
        self.seconds: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self.sync()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.sync()
        self.seconds.append(time.perf_counter() - self._start)
        if time.perf_counter() >= self.deadline:
            control.should_training_stop = True


def _planned(torch, point: dict, row: dict, speeds: dict, context: int | None, cuda: bool) -> dict:
    """What the planner says of the point: its memory plan (harness.plan.memory.plan_run) and its step time
    (harness.plan.work.step_work, harness.plan.timing.step_seconds) at each speed in `speeds` ({"data sheet":
    Speed or None, "calibration": Speed}), and measured over predicted where both are known."""
    from harness.plan.memory import plan_run
    from harness.plan.speeds import method_kind
    from harness.plan.timing import step_seconds
    from harness.plan.work import step_work

    try:
        cfg = point_cfg(point, "unused", computed=True)
        config = point_config(point)
        dtype = getattr(torch, _dtype_name(torch, "cuda" if cuda else "cpu"))
        # A CPU has no CUDA context: planned without it there; on a GPU the plan's modelled one, as it plans today.
        with quiet_libraries():
            plan = plan_run(cfg, config, compute_dtype=dtype, **({} if cuda else {"context_bytes": 0}))
            work = step_work(cfg, config, compute_dtype=dtype)
    except Exception as exc:  # a point the planner cannot plan is said so, beside whatever was measured
        return {"kind": None, "planned_peak_bytes": None, "predicted_step_seconds": {},
                "plan_problem": f"{type(exc).__name__}: {first_line(exc)}"}
    predicted = {name: (step_seconds(work, speed).seconds if speed else None) for name, speed in speeds.items()}
    measured = row.get("step_seconds", {}).get("median")
    out = {"kind": method_kind(cfg.method.method, cfg.model.quantization),
           "planned_peak_bytes": plan.total_bytes, "planned_context_bytes": plan.bytes_of("CUDA context"),
           "planned_tokens": work.tokens, "predicted_step_seconds": predicted,
           "measured_over_predicted": {name: (measured / value if measured and value else None)
                                       for name, value in predicted.items()}}
    if cuda and row.get("peak_reserved_bytes") is not None and context is not None:
        out["measured_peak_bytes"] = row["peak_reserved_bytes"] + context  # as the plan counts: context included
    return out


def grid_speeds(torch, record: dict, dev, where) -> dict:
    """The speeds each point's time is predicted at: the data sheet's (times the time model's fractions; None
    where the device has none) and this calibration's own matmul and bandwidth figures, as the planner would
    read them from the file being written (its skinny LoRA-rank rate included)."""
    from pathlib import Path

    from harness.plan.speeds import Calibration, skinny_rate
    from harness.plan.timing import speed_from

    kind = where.type
    dtype = _dtype_name(torch, kind)
    achieved = record["achievable"]
    own = Calibration(dev.name, record["dtype"], achieved["matmul_flops_per_second"],
                      achieved["bandwidth_bytes_per_second"], record["provenance"]["threads"] if kind == "cpu"
                      else None, Path(f"calibration-{dev.slug}.json"),  # the file being written: its name only
                      skinny_flops_per_second=skinny_rate(record["matmul"]))
    own_speed = speed_from(None, own, dtype, kind)
    peak = dev.gpu.speed if dev.gpu is not None else None
    return {"data sheet": speed_from(peak, None, dtype, kind) if peak is not None else None,
            "calibration": own_speed}


def _dtype_name(torch, kind: str) -> str:
    """The dtype the grid trains in: the recipes' --dtype auto (bf16 where the GPU has it, else fp16; fp32 on
    a CPU)."""
    from harness.models.loading import compute_dtype

    return str(compute_dtype("auto") if kind == "cuda" else torch.float32).removeprefix("torch.")


def markdown(record: dict) -> list[str]:
    """The grid as a table of planned beside measured, memory and time, for calibrate's page."""
    grid, steps = record["step_grid"], record["steps"]
    context = grid.get("context_bytes")
    lines = [f"## Training steps (random-init weights, {grid['mode']} grid)", "",
             f"Each point: {grid['warm_up_steps']} warm-up step(s), then up to {grid['timed_steps']} timed optimizer "
             f"steps (median; slowest - fastest) in {grid['seconds']:.0f} s of a {grid['budget_seconds']:.0f} s "
             "budget. "
             f"CUDA context and libraries: {_gib(context) if context is not None else 'not known'} "
             f"({grid['context_how']}). Planned peak: harness.plan.memory.plan_run, its modelled context included; "
             "measured: peak reserved + the measured context. Predicted step: harness.plan.work.step_work at "
             "harness.plan.timing's speeds: the data sheet's, and this calibration's own figures.", "",
             "| point | rows | planned peak | measured peak (allocated / reserved) | predicted s, data sheet | "
             "predicted s, this calibration | measured s | measured / predicted (calibration) |",
             "|---|---|---|---|---|---|---|---|"]
    for row in steps:
        predicted = row.get("predicted_step_seconds") or {}
        if row["status"] != "measured":
            measured_memory, measured_s, ratio = "-", f"{row['status']}: {row['reason']}", "-"
        else:
            time_ = row["step_seconds"]
            measured_s = f"{time_['median']:.3f} ({time_['min']:.3f} - {time_['max']:.3f})"
            allocated, reserved = row.get("peak_allocated_bytes"), row.get("peak_reserved_bytes")
            measured_memory = (f"{_gib(row['measured_peak_bytes'])} ({_gib(allocated)} / {_gib(reserved)})"
                               if row.get("measured_peak_bytes") else "not measured on a CPU")
            value = (row.get("measured_over_predicted") or {}).get("calibration")
            ratio = f"{value:.2f}x" if value else "-"
        planned = row.get("planned_peak_bytes")
        planned_text = _gib(planned) if planned else row.get("plan_problem", "-")
        lines.append(f"| {row['name']} | {row['rows']} | {planned_text} | "
                     f"{measured_memory} | {_seconds(predicted.get('data sheet'), 'no data sheet')} | "
                     f"{_seconds(predicted.get('calibration'))} | {measured_s} | {ratio} |")
    return [*lines, ""]


def _gib(value) -> str:
    if value is None:
        return "-"
    return f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / 2**20:.1f} MiB"


def _seconds(value, missing: str = "-") -> str:
    return f"{value:.3f}" if value else missing
