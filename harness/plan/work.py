"""The work one optimizer step does, counted on the meta-device model the memory plan builds.

Why this module is long: it is one count over one meta run, whose hooks (FLOPs, dequantization, casts, the
element-wise dispatch mode, checkpointing's recompute, the loss's bytes) share its state, plus the layer
extrapolation that keeps it fast; split apart, each piece would reach into the others' internals. What the meta
run stands in for (counted attention, the dispatch modes, TRL's fused head) is harness.plan.meta_ops.

The model is the memory plan's (harness.plan.memory.run_model: built from its config on the meta device, with
the run's real PEFT config; attention here is the flash-attention op, so that it is counted), run forward and
backward on meta tensors: no memory, no arithmetic, the shapes alone. What it does is counted, not assumed
(tests/test_plan_work.py holds the FLOPs equal to the same counter's on a real CPU step, for every method):

- FLOPs by PyTorch's own counter (torch.utils.flop_counter.FlopCounterMode): matrix products and attention.
  Frozen weights get no weight gradient because autograd computes none; DoRA's B @ A, AdaLoRA's orthogonality
  penalty and the virtual tokens of prompt methods are counted because the PEFT model runs them. Attention is
  counted as one fused kernel (the flash-attention op, on meta): the counter's formula takes the whole
  T x T products, though a causal kernel skips about half; `attention_flops` keeps that part apart.
- Gradient checkpointing is turned on as the Trainer turns it on, and its recompute is counted as it runs
  (torch.utils.checkpoint's context_fn): PyTorch stops each layer's recompute once the last tensor its backward
  needs is back, so it is a little less than one forward of the layers (full fine-tuning skips down_proj).
- Bytes where a step is bound by memory traffic, not arithmetic: every use of a 4/8-bit weight dequantizes it
  (read the packed weight and its scales, write it in 16 bits) in the forward, again in the backward where its
  input needs a gradient (bitsandbytes skips it otherwise), and in checkpointing's recompute; fp32 weights
  under 16-bit autocast are cast before each product (full fine-tuning's masters, a k-bit base's fp32 head,
  PEFT's fp32 adapters); DoRA's weight norm and AdaLoRA's importance scores are element-wise passes over
  whole weights, counted by a dispatch mode from the tensors the PEFT code touches; a fused optimizer step
  (bitsandbytes' 8-bit and paged ones, torch's fused AdamW) reads and writes every trainable parameter and its
  states once (the formats are the memory plan's: 32-bit, 8-bit blockwise) and reads its gradient; torch's
  AdamW otherwise goes over them op by op, its bytes per parameter byte counted by running it on meta (~2.7x a
  fused pass); the gradients are accumulated over the micro-batches and clipped.

- Element-wise work: every other op of the forward, backward, recompute and DPO's reference (norms, activations,
  residual adds, RoPE, the loss, dropout's scaling) moves its input and output tensors' bytes, counted by a
  dispatch mode from the shapes and dtypes of the meta run (an embedding reads the rows it looks up, not its
  table); dropout's random numbers (bernoulli_) apart, as random_bytes. The same mode counts the ops dispatched
  (views and allocations not included), the optimizer's ops per trainable tensor (torch's AdamW and the clipping
  run on a meta stand-in), and the FLOPs of skinny matrix products (a dimension under meta_ops.SKINNY_DIMENSION: LoRA's
  rank), which a device runs far below its matmul rate. A 16-bit run trains under autocast, which torch.autocast
  refuses on the meta device: Autocast stands in for it (matrix products with an fp32 operand run in 16 bits,
  so PEFT's fp32 adapters scale and add in 16 bits, as on a GPU); tests/test_plan_speed.py holds the bytes it
  changes equal to what torch.autocast changes in a real bf16 CPU step (LoRA: fewer; DoRA: more).

Not counted here: the Python of modules and the Trainer, GRPO's generation, AdaLoRA's periodic rank
reallocation: the time model (harness.plan.timing) adds or leaves them. Rows shorter than the window: a step is
counted at the window, or, given the data's real lengths (harness.plan.batches), at the average micro-batch they
make, padded, padding-free or packed (step_work's batch).
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from harness.models.methods import UNPACKABLE_METHODS, flattens
from harness.plan.architectures import text_config, with_layers
from harness.plan.memory import (
    layers_alike,
    optimized_tensors,
    optimizer_state_bytes,
    quantized_weight_bytes,
    run_model,
)
from harness.plan.meta_ops import (
    ATTENTION_OPS,
    COUNTED_ATTENTION,
    EXTRA_FLOP_FORMULAS,
    SKINNY_DIMENSION,
    Autocast,
    BytesTouched,
    adalora_score_bytes,
    fused_head_hooks,
    meta_autocast_answered,
    optimizer_ops_per_tensor,
    register_counted_attention,
    unpacked_rows,
)
from harness.plan.speeds import method_kind

_CACHE_SIZE = 100  # counts kept, two a plan (a table of every method x 4 ranks is ~40 plans; a count: ~20 numbers)


@dataclass(frozen=True)
class StepWork:
    """The work of one optimizer step (every micro-batch of the gradient accumulation)."""

    tokens: int  # training tokens: sequences x accumulation x max_seq_length (virtual tokens not included)
    forward_flops: int
    backward_flops: int
    recompute_flops: int  # gradient checkpointing's second forward of the decoder layers
    reference_flops: int  # DPO: the reference model's forward of the same pairs (no backward)
    attention_flops: int  # of the four above, the attention products (these grow with the length squared)
    dequant_bytes: int  # 4/8-bit weights dequantized to 16 bits: packed weight and scales read, 16 bits written
    cast_bytes: int  # fp32 weights cast to 16 bits by autocast before their product (4 read, 2 written)
    weight_norm_bytes: int  # DoRA: its element-wise passes over each adapted weight (the norm of W + BA)
    optimizer_bytes: int  # the update: parameters and states read and written, gradients read
    gradient_bytes: int  # gradients accumulated over the micro-batches and clipped
    score_bytes: int  # AdaLoRA: its importance scores updated from every adapter parameter and gradient
    # Every op but the matrix products, over forward, backward (recompute included) and DPO's reference: the bytes
    # of its input and output tensors (norms, activations, residual adds, the loss, RoPE, dropout's scaling).
    elementwise_bytes: int = 0
    random_bytes: int = 0  # of those ops, the random-number ones (dropout's bernoulli_): their bytes apart
    skinny_flops: int = 0  # of the FLOPs, matrix products with a dimension under meta_ops.SKINNY_DIMENSION (LoRA's rank)
    ops: int = 0  # ops dispatched by the forward, backward and reference (views and allocations not included)
    optimizer_ops: int = 0  # ops of the optimizer step and the clipping, one trainable tensor at a time
    # Of elementwise_bytes, those of the loss over the vocabulary (SFT: TRL's fused LM head, which a CPU runs as torch
    # ops, many passes over each tile of logits; on a GPU its Triton kernels take about LOSS_PASSES_FUSED passes)
    loss_bytes: int = 0
    logits_bytes: int = 0  # one pass over the step's logits (tokens x vocabulary, in the LM head's dtype)
    method_kind: str = ""  # harness.plan.speeds.method_kind: which of a calibration grid's ratios applies

    @property
    def flops(self) -> int:
        return self.forward_flops + self.backward_flops + self.recompute_flops + self.reference_flops

    @property
    def bytes(self) -> int:
        return (self.dequant_bytes + self.cast_bytes + self.weight_norm_bytes + self.optimizer_bytes
                + self.gradient_bytes + self.score_bytes + self.elementwise_bytes + self.random_bytes)

    def to_dict(self) -> dict:
        return {"step_tokens": self.tokens, "step_flops": self.flops, "step_bytes": self.bytes,
                "step_work": dataclasses.asdict(self)}


@dataclass(frozen=True)
class _MicroBatch:
    """What one micro-batch's forward and backward do (recompute included), and what the optimizer holds."""

    forward: int
    backward: int
    recompute: int
    reference: int
    attention: int
    dequant_bytes: int
    cast_bytes: int
    weight_norm_bytes: int
    score_bytes: int  # AdaLoRA's update of one step
    trainable_bytes: int  # the trainable parameters as the optimizer holds them (and so their gradients)
    state_bytes: int  # the optimizer's states
    elementwise_bytes: int
    random_bytes: int
    skinny_flops: int
    ops: int
    optimizer_ops: int  # of one step, not of a micro-batch
    attention_forward: int = 0  # of `attention`, the forward's
    loss_bytes: int = 0
    logits_bytes: int = 0


def step_work(cfg, config, compute_dtype: torch.dtype = torch.bfloat16, batch=None) -> StepWork:
    """The work of one optimizer step of the run `cfg` (a RunConfig) on a model with this transformers config:
    every row at its max_seq_length (dynamic padding makes that the most a batch holds), or, given `batch` (an SFT
    run's harness.plan.batches.MeanBatch: its data's real lengths, batched as the run batches them), its average
    micro-batch."""
    targs = cfg.train
    sequences = targs.per_device_train_batch_size * (2 if cfg.run.objective == "dpo" else 1)  # DPO: both answers
    reference = cfg.run.objective == "dpo" and not getattr(targs, "precompute_ref_log_probs", False)
    optim = str(getattr(targs.optim, "value", targs.optim))
    shape = (sequences, cfg.data.max_seq_length, bool(targs.activation_checkpointing), reference, optim)
    n = targs.gradient_accumulation_steps
    if batch is not None:
        micro = _micro_batch_of(cfg, config, compute_dtype, shape, batch)
        return _step(cfg, micro, n, optim, round(batch.tokens * n), extra_attention=0)
    # A flattened batch (SFT's padding-free or BFD packing) is one row of every sequence: transformers' sdpa masks
    # it block-diagonally but computes the whole (sequences x length)^2 of it (profiled on CPU: one [1, 9, 512, 64]
    # attention per layer for 4 x 128 tokens), `sequences` times a padded batch's attention. FlashAttention-2
    # takes each example's own length (varlen) and does not.
    extra = (sequences - 1) if _flattened_attention(cfg) else 0
    return _step(cfg, _cached_micro_batch(cfg, config, compute_dtype, shape), n, optim,
                 sequences * n * cfg.data.max_seq_length, extra)


def _cached_micro_batch(cfg, config, compute_dtype, shape: tuple) -> _MicroBatch:
    key = (_model_key(cfg, config, compute_dtype), *shape)
    micro = _COUNTS.get(key)
    if micro is None:
        micro = _micro_batch(cfg, config, compute_dtype, *shape)
        if len(_COUNTS) >= _CACHE_SIZE:
            _COUNTS.pop(next(iter(_COUNTS)))  # the oldest
        _COUNTS[key] = micro
    return micro


def fit_lengths(window: int) -> tuple[int, int, int]:
    """Three distinct row lengths a micro-batch is counted at to fit its work to any length (_micro_batch_of): the
    window and two shorter ones, none under SKINNY_DIMENSION + 1, where products over the tokens stop counting as
    skinny (meta_ops: below it the skinny FLOPs jump; over it they are linear); a shorter window is counted just
    above itself."""
    shortest = max((window + 3) // 4, SKINNY_DIMENSION + 1)
    if window - shortest >= 2:
        return window, (window + shortest) // 2, shortest
    return window, window + 1, window + 2


def _micro_batch_of(cfg, config, compute_dtype, shape: tuple, batch) -> _MicroBatch:
    """The average micro-batch `batch` (harness.plan.batches.MeanBatch), from counts of padded micro-batches of
    the run's rows at three lengths. Every counted quantity of a micro-batch of b rows of length L is a polynomial
    of degree 2 in L (attention's products and whatever it touches per pair of positions grow with L^2, all else
    with L or not at all: tests/test_plan_batches.py holds a fourth length's count equal to the fit), so three
    counts give it exactly: q(L) = c + p L + a L^2. Written per micro-batch as c + (p / b) positions + (a / b) area,
    with positions = b L and area = b L^2, it prices any micro-batch from its positions and attention area (a
    flattened row of S positions under sdpa: S and S^2)."""
    from fractions import Fraction

    sequences, window = shape[0], shape[1]
    lengths = fit_lengths(window)
    counts = [_cached_micro_batch(cfg, config, compute_dtype, (sequences, length, *shape[2:])) for length in lengths]
    values = {}
    for field in dataclasses.fields(_MicroBatch):
        c, p, a = _quadratic(lengths, [getattr(count, field.name) for count in counts])
        value = c + p / sequences * Fraction(batch.positions) + a / sequences * Fraction(batch.area)
        values[field.name] = max(0, round(value))
    return _MicroBatch(**values)


def _quadratic(xs, ys):
    """(c, p, a) of the polynomial c + p x + a x^2 through three points, exactly (fractions)."""
    from fractions import Fraction

    (x0, x1, x2), (y0, y1, y2) = [Fraction(x) for x in xs], [Fraction(y) for y in ys]
    a = ((y2 - y0) / (x2 - x0) - (y1 - y0) / (x1 - x0)) / (x2 - x1)
    p = (y1 - y0) / (x1 - x0) - a * (x0 + x1)
    return y0 - p * x0 - a * x0 * x0, p, a


def _step(cfg, micro: _MicroBatch, n: int, optim: str, tokens: int, extra_attention: int) -> StepWork:
    """The step of n micro-batches like `micro`, a flattened one's attention extra_attention times more."""
    targs = cfg.train
    extra = extra_attention
    forward_attention, rest_attention = micro.attention_forward, micro.attention - micro.attention_forward
    weights = micro.trainable_bytes
    # Each micro-batch after the first adds its gradients into .grad (two reads, one write); clipping reads them
    # for the norm, then scales them in place (the Trainer clips whenever max_grad_norm > 0).
    gradients = 3 * weights * (n - 1) + (3 * weights if targs.max_grad_norm and targs.max_grad_norm > 0 else 0)
    return StepWork(
        tokens=tokens,
        forward_flops=(micro.forward + extra * forward_attention) * n,
        backward_flops=(micro.backward + extra * rest_attention) * n,  # checkpointing's recompute of it included
        recompute_flops=micro.recompute * n, reference_flops=micro.reference * n,
        attention_flops=micro.attention * (1 + extra) * n,
        dequant_bytes=micro.dequant_bytes * n, cast_bytes=micro.cast_bytes * n,
        weight_norm_bytes=micro.weight_norm_bytes * n,
        optimizer_bytes=_optimizer_bytes(optim, weights, micro.state_bytes, targs.weight_decay),
        gradient_bytes=gradients,
        score_bytes=micro.score_bytes, elementwise_bytes=micro.elementwise_bytes * n,
        random_bytes=micro.random_bytes * n, skinny_flops=micro.skinny_flops * n, ops=micro.ops * n,
        optimizer_ops=micro.optimizer_ops, loss_bytes=micro.loss_bytes * n, logits_bytes=micro.logits_bytes * n,
        method_kind=method_kind(cfg.method.method, cfg.model.quantization),
    )


# Optimizers whose step is one fused kernel: each parameter and state read and written once, its gradient read
# (bitsandbytes' 8-bit and paged optimizers, torch's fused AdamW). Every other AdamW is torch's, one element-wise
# op after another (foreach on a GPU, one tensor at a time on a CPU): its passes are counted on meta.
_FUSED_OPTIMIZERS = ("8bit", "fused", "bnb")


def _optimizer_bytes(optim: str, weights: int, states: int, weight_decay: float) -> int:
    """The bytes the optimizer's step moves: a fused kernel's one pass (parameters and states read and written,
    gradients read), or torch's unfused AdamW's passes as a meta run of it counts them, per byte of its
    parameters (the same at any size: every op goes over whole tensors)."""
    fused = 2 * weights + weights + 2 * states
    name = optim.lower()
    if "adam" not in name or any(word in name for word in _FUSED_OPTIMIZERS):
        return fused
    return int(weights * _adamw_bytes_per_parameter_byte(weight_decay > 0))


_ADAMW_BYTES: dict[bool, float] = {}


def _adamw_bytes_per_parameter_byte(decay: bool) -> float:
    """Bytes torch's AdamW (not fused) moves in a step per byte of its fp32 parameters, with or without weight
    decay, counted on a meta stand-in (its states are as large as the parameter: 2 of them)."""
    if decay not in _ADAMW_BYTES:
        weight = torch.nn.Parameter(torch.empty(64, 64, device="meta"))
        weight.grad = torch.empty(64, 64, device="meta")
        optimizer = torch.optim.AdamW([weight], foreach=False, weight_decay=0.01 if decay else 0.0)
        optimizer.step()  # the first step makes the states
        touched = BytesTouched()
        with touched:
            optimizer.step()
        _ADAMW_BYTES[decay] = touched.bytes / (weight.numel() * weight.element_size())
    return _ADAMW_BYTES[decay]


def _flattened_attention(cfg) -> bool:
    """Whether the run's attention covers a whole flattened batch (see step_work): SFT laying a batch end to end,
    as harness.objectives.sft_trainer does (prompt methods are never flattened), with an attention that masks
    rather than splits it."""
    return (cfg.run.objective == "sft" and flattens(cfg.train) and cfg.method.method not in UNPACKABLE_METHODS
            and not str(cfg.model.attn_implementation or "").startswith("flash_attention"))


# by step_work's key and by what the count depends on (_micro_batch's, starting "same work")
_COUNTS: dict[tuple, _MicroBatch] = {}
_MODELS: dict[tuple, tuple] = {}
_layers_alike = layers_alike  # a module global, so that a test can count a model whole


def _model_key(cfg, config, compute_dtype) -> tuple:
    return config.to_json_string(use_diff=False), repr(cfg.method), repr(cfg.model), str(compute_dtype), cfg.run.objective


def _micro_batch(cfg, config, compute_dtype, sequences: int, seq_length: int, checkpointing: bool, reference: bool,
                 optim: str) -> _MicroBatch:
    """The count, on the whole model or, when its decoder layers are all alike, on the model with one and with
    two of them: everything counted is then the part outside the layers plus the layers' count times one layer's
    (a 7B or 70B model counts as fast as a 2-layer one; tests/test_plan_work.py holds it equal to the whole)."""
    layers = text_config(config).num_hidden_layers
    alike = layers >= 3 and _layers_alike(config, compute_dtype, cfg.model.trust_remote_code)
    first = with_layers(config, 1) if alike else config
    same_work = ("same work", alike, cfg.run.objective, _adapter_key(cfg, _model(cfg, first, compute_dtype)[0]),
                 config.to_json_string(use_diff=False), repr(cfg.model), str(compute_dtype), sequences, seq_length,
                 checkpointing, reference, optim)
    if same_work in _COUNTS:
        return _COUNTS[same_work]
    if not alike:
        micro = _count(cfg, config, compute_dtype, sequences, seq_length, checkpointing, reference, optim)
    else:
        one, two = (_count(cfg, with_layers(config, n), compute_dtype, sequences, seq_length, checkpointing, reference,
                           optim) for n in (1, 2))
        micro = _MicroBatch(**{field.name: getattr(one, field.name) + (layers - 1) * (
            getattr(two, field.name) - getattr(one, field.name)) for field in dataclasses.fields(_MicroBatch)})
    if len(_COUNTS) >= _CACHE_SIZE:
        _COUNTS.pop(next(iter(_COUNTS)))  # the oldest
    _COUNTS[same_work] = micro
    return micro


# A multiplier's value is not work: rsLoRA's scaling and lora_alpha change what LoRA's output is multiplied by.
_VALUE_ONLY = ("use_rslora", "lora_alpha")


def _adapter_key(cfg, model) -> str:
    """The adapter as PEFT built it, less what changes values but not work: LoRA, rsLoRA and LoftQ (whose start
    values harness.plan.memory.run_model skips) on the same base and rank count once in a table."""
    import json

    peft = getattr(model, "peft_config", {}).get("default")
    if peft is None:  # full fine-tuning, or nothing trained
        return cfg.method.method
    fields = {name: value for name, value in peft.to_dict().items() if name not in _VALUE_ONLY}
    return json.dumps(fields, sort_keys=True, default=str)


def _model(cfg, config, compute_dtype):
    """The run's meta model with attention as a counted fused kernel, built once per model, method and dtype."""
    key = _model_key(cfg, config, compute_dtype)
    if key not in _MODELS:
        register_counted_attention()
        if len(_MODELS) >= 8:  # a meta model holds no memory, but its modules do
            _MODELS.pop(next(iter(_MODELS)))
        _MODELS[key] = run_model(cfg, config, compute_dtype, COUNTED_ATTENTION)
    return _MODELS[key]


# ---------------------------------------------------------------------------- the count

def _count(cfg, config, compute_dtype, sequences: int, seq_length: int, checkpointing: bool, reference: bool,
           optim: str) -> _MicroBatch:
    """One micro-batch, forward and backward, on the meta model with the Trainer's checkpointing when the run
    has it: what the recompute does is then counted as it happens (PyTorch stops each layer's recompute once
    the last tensor its backward needs is back, so the tail of a layer, e.g. full fine-tuning's down_proj, is
    not rerun)."""
    model, quantized, master_fp32 = _model(cfg, config, compute_dtype)
    quantization, autocast = cfg.model.quantization, compute_dtype != torch.float32
    counter, touched = FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS), BytesTouched()
    phase = ["forward"]  # then "backward", within which "recompute", then "reference"
    recompute = [0]
    moved = {kind: dict.fromkeys(("forward", "backward", "recompute", "reference"), 0)
             for kind in ("dequant", "cast", "norm")}
    dequant_backward = [0]
    cast_once: set[tuple[str, int]] = set()
    dora_start = [0]

    def attention_flops() -> int:
        counts = counter.flop_counts["Global"]
        return sum(counts.get(op, 0) for op in ATTENTION_OPS)

    @contextlib.contextmanager
    def recomputing():
        start, phase[0] = counter.get_total_flops(), "recompute"
        try:
            yield
        finally:  # also when PyTorch ends a recompute early, which it does with an exception
            recompute[0] += counter.get_total_flops() - start
            phase[0] = "backward"

    def linear_called(module, args):
        weight = module.weight
        if id(weight) in quantized:
            nbytes = weight.numel() * compute_dtype.itemsize + quantized_weight_bytes(
                weight.numel(), module.out_features, quantization, cfg.model.bnb_4bit_use_double_quant)
            moved["dequant"][phase[0]] += nbytes
            # bitsandbytes dequantizes it again in the backward, but only for the gradient of its input
            if phase[0] == "forward" and args[0].requires_grad:
                dequant_backward[0] += nbytes
        elif autocast and (weight.dtype == torch.float32 or master_fp32 or quantized) and (
                (phase[0], id(weight)) not in cast_once):  # autocast caches a weight's copy for its region
            cast_once.add((phase[0], id(weight)))  # (a forward; a layer's recompute): DoRA's second call reuses it
            moved["cast"][phase[0]] += weight.numel() * (4 + compute_dtype.itemsize)  # the backward reuses it

    def dora_enter(module, args, kwargs):
        base = kwargs.get("base_layer")
        if base is not None and id(base.weight) in quantized:  # DoRA dequantizes the base once more for its norm
            moved["dequant"][phase[0]] += base.weight.numel() * compute_dtype.itemsize
        dora_start[0] = touched.bytes

    def dora_leave(module, args, kwargs, output):
        moved["norm"][phase[0]] += touched.bytes - dora_start[0]

    handles = []
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            handles.append(module.register_forward_pre_hook(linear_called))
        elif type(module).__name__ == "DoraLinearLayer":
            handles += [module.register_forward_pre_hook(dora_enter, with_kwargs=True),
                        module.register_forward_hook(dora_leave, with_kwargs=True, always_call=True)]
    if checkpointing:  # the Trainer's call (non-reentrant: harness.run.training), which also makes the inputs
        # need gradients; torch.utils.checkpoint runs each recompute under the second context context_fn returns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={
            "use_reentrant": False, "context_fn": lambda: (contextlib.nullcontext(), recomputing())})
    fused = cfg.run.objective == "sft"  # SFTTrainer scores tokens with TRL's fused LM head, DPO's trainer does not
    loss_start, loss_bytes = [0], [0]
    if fused:
        handles += fused_head_hooks(model, touched, loss_start, loss_bytes)
        if autocast and quantized:  # a k-bit base's head is fp32 (prepare_model_for_kbit_training): the fused
            # head casts it to 16 bits tile by tile in its forward and again in its backward
            head = model.get_output_embeddings().weight
            moved["cast"]["forward"] += 2 * head.numel() * (4 + compute_dtype.itemsize)
    ids = torch.zeros(sequences, seq_length, dtype=torch.long, device="meta")
    model.train()
    try:
        cast = Autocast(compute_dtype, model) if autocast else contextlib.nullcontext()
        with counter, touched, cast, unpacked_rows(), meta_autocast_answered(compute_dtype):
            # no mask: see harness.plan.memory.saved_for_backward
            loss = model(input_ids=ids, labels=ids, **({"fused_lm_head": True} if fused else {})).loss
            loss_bytes[0] += touched.bytes - loss_start[0] if fused else 0
            forward, attention_forward = counter.get_total_flops(), attention_flops()
            phase[0] = "backward"
            loss_start[0] = touched.bytes  # the backward starts with the loss's: until the backbone's output's hook
            if loss.requires_grad:  # method "none" trains nothing
                loss.backward()
            backward = counter.get_total_flops() - forward - recompute[0]
            phase[0] = "reference"
            reference_flops = _reference_forward(model, ids, counter) if reference else 0
            attention = attention_flops()
        scores = adalora_score_bytes(model) if cfg.method.method == "adalora" else 0
    finally:
        for handle in handles:
            handle.remove()
        if checkpointing:
            model.activation_checkpointing_disable()
            model.disable_input_require_grads()
        for p in model.parameters():
            p.grad = None
    trainable = optimized_tensors(model, master_fp32)
    norm = sum(moved["norm"].values())
    return _MicroBatch(
        forward=forward, backward=backward, recompute=recompute[0], reference=reference_flops, attention=attention,
        dequant_bytes=sum(moved["dequant"].values()) + dequant_backward[0],
        cast_bytes=sum(moved["cast"].values()), weight_norm_bytes=norm, score_bytes=scores,
        trainable_bytes=sum(p.numel() * p.element_size() for p in trainable),
        state_bytes=optimizer_state_bytes(optim, trainable)[0],
        elementwise_bytes=touched.bytes - norm, random_bytes=touched.random_bytes, skinny_flops=touched.skinny_flops,
        ops=touched.ops, optimizer_ops=len(trainable) * optimizer_ops_per_tensor(),
        attention_forward=attention_forward, loss_bytes=loss_bytes[0],
        logits_bytes=sequences * seq_length * text_config(config).vocab_size * compute_dtype.itemsize if fused else 0,
    )


def _reference_forward(model, ids, counter: FlopCounterMode) -> int:
    """DPO's reference forward of the same sequences: the base with the adapter off, or full fine-tuning's
    frozen copy (the same model); no gradient."""
    before = counter.get_total_flops()
    off = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    with off, torch.no_grad():
        model(input_ids=ids)
    return counter.get_total_flops() - before
