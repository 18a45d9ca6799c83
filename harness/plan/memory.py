"""Planned peak GPU memory of one training run, and its parts, without loading a weight.

Why this module is long: the plan is one count over one meta model (its parameters, optimizer states and saved
activations share the model and its hooks), plus the extrapolation from two- and three-layer copies that keeps a
70B plan fast, which has to know each of those parts; split apart, each piece would reach into the others'.

The model is built from its config on the meta device (shapes, no memory) and wrapped with the run's
real PEFT config, so every method and architecture is accounted the same way:

- counted from the tensors (exact): parameters by storage format, trainable parameters, gradients,
  optimizer states, AdaLoRA's importance scores, and the activations one forward saves for backward
  (a saved-tensor hook on the meta forward; gradient checkpointing keeps each layer's inputs and
  recomputes one layer at a time).
- formulas (exact for bitsandbytes' formats): 4-bit NF4/FP4 weights and their block scales, 8-bit
  weights and their row scales, 8-bit optimizer states and their block scales.
- modelled (to be checked on a GPU): attention as a fused kernel keeps it (flash / memory-efficient
  SDPA: inputs, output and a log-sum-exp, never the T x T matrix); the logits' transient copies; one
  dequantized weight at a time; 16-bit copies of fp32 weights under autocast; the CUDA context.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import weakref
from dataclasses import dataclass, field

import torch

from harness.models.methods import LORA_FAMILY, adalora_schedule, peft_config
from harness.plan.architectures import text_config, with_layers

GIB = 2**30

# Modelled: what a process holds before its first tensor (CUDA context, cuBLAS workspace). Measured on a
# GPU it ranges ~0.3-0.6 GiB by driver and card; a GPU run of the benchmark replaces this with a figure.
CUDA_CONTEXT_BYTES = int(0.5 * GIB)

# bitsandbytes' formats
NF4_BLOCK = 64  # one absmax per 64 weights
DOUBLE_QUANT_BLOCK = 256  # double quantization: the absmaxes themselves in 8 bits, one fp32 per 256 of them
OPTIMIZER_8BIT_BLOCK = 256  # blockwise 8-bit optimizer states: one fp32 absmax per 256 values
OPTIMIZER_8BIT_MIN_SIZE = 4096  # smaller tensors keep 32-bit states (bnb's min_8bit_size)

PLANNED_ATTENTION = "planned_fused_attention"


@dataclass
class Part:
    name: str
    bytes: int
    how: str  # "counted" (from the meta model's tensors), "formula" or "modelled"
    scales_with_batch: bool = False


@dataclass
class Plan:
    model: str
    method: str
    rank: int | None
    quantization: str
    optim: str
    batch_size: int
    seq_length: int
    checkpointing: bool
    compute_dtype: str
    trainable_params: int
    total_params: int
    parts: list[Part] = field(default_factory=list)
    label: str = ""  # the method as a table row names it

    @property
    def total_bytes(self) -> int:
        return sum(part.bytes for part in self.parts)

    def bytes_of(self, *names: str) -> int:
        """The bytes of the parts with these names, a part's name taken without its detail in brackets
        ("optimizer states" for "optimizer states (paged_adamw_8bit)")."""
        return sum(part.bytes for part in self.parts if part.name.split(" (")[0] in names)

    def fits(self, gpu_bytes: float) -> bool:
        return self.total_bytes <= gpu_bytes

    def max_batch_size(self, gpu_bytes: float) -> int:
        """The largest per-device batch at this sequence length that fits (0: not even one sequence)."""
        per_batch = sum(part.bytes for part in self.parts if part.scales_with_batch)
        fixed = self.total_bytes - per_batch
        if per_batch == 0:
            return self.batch_size if fixed <= gpu_bytes else 0
        return max(0, int((gpu_bytes - fixed) // (per_batch / self.batch_size)))

    def max_seq_length(self, gpu_bytes: float) -> int | None:
        """The longest sequence at this batch that fits (0: none), taking what scales with the batch to grow
        linearly with the sequence too (fused attention keeps no T x T matrix); None if nothing scales."""
        per_batch = sum(part.bytes for part in self.parts if part.scales_with_batch)
        if per_batch == 0:
            return None
        fixed = self.total_bytes - per_batch
        return max(0, int((gpu_bytes - fixed) // (per_batch / self.seq_length)))

    def to_dict(self) -> dict:
        return {
            "model": self.model, "method": self.method, "rank": self.rank, "quantization": self.quantization,
            "optim": self.optim, "per_device_train_batch_size": self.batch_size, "max_seq_length": self.seq_length,
            "activation_checkpointing": self.checkpointing, "compute_dtype": self.compute_dtype,
            "trainable_params": self.trainable_params, "total_params": self.total_params,
            "planned_peak_bytes": self.total_bytes,
            "parts": [{"name": p.name, "bytes": p.bytes, "how": p.how} for p in self.parts],
        }


# ---------------------------------------------------------------------------- the meta model

class _FusedAttention(torch.autograd.Function):
    """What a fused attention kernel keeps for backward: q, k, v, its output and one fp32 log-sum-exp per
    query and head. Runs on meta tensors only (the planner never computes)."""

    @staticmethod
    def forward(ctx, query, key, value):
        out = torch.empty_like(query)
        ctx.save_for_backward(query, key, value, out, query.new_empty(query.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):
        query, key, value, _, _ = ctx.saved_tensors
        return torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value)


def _planned_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    from transformers.integrations.sdpa_attention import repeat_kv

    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:  # with a padding mask, SDPA gets the key/value heads repeated
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    return _FusedAttention.apply(query, key, value).transpose(1, 2).contiguous(), None


def _register_planned_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(PLANNED_ATTENTION, _planned_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PLANNED_ATTENTION, sdpa_mask)


def meta_model(config, dtype: torch.dtype, attention: str = PLANNED_ATTENTION, trust_remote_code: bool = False):
    """The model with every tensor on the meta device: any size builds in seconds and holds no memory."""
    from transformers import AutoModelForCausalLM

    if attention == PLANNED_ATTENTION:
        _register_planned_attention()
    with torch.device("meta"), values_not_drawn():
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attention,
                                                trust_remote_code=trust_remote_code)


@contextlib.contextmanager
def values_not_drawn():
    """A meta tensor has no values, yet every layer's constructor and PEFT's adapters draw them through
    torch.nn.init, at a cost (~0.5 s of a 70B table's 10): while a meta model is built they return at once."""
    import torch.nn.init as init

    names = [name for name in dir(init) if name.endswith("_") and not name.startswith("_")
             and callable(getattr(init, name))]
    drawing = {name: getattr(init, name) for name in names}
    for name in names:
        setattr(init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, function in drawing.items():
            setattr(init, name, function)


def quantized_linears(model) -> dict[int, torch.nn.Linear]:
    """The Linear layers bitsandbytes quantizes, by id of their weight: all but the output head (transformers
    keeps lm_head, and anything tied to it, in 16 bits)."""
    head = model.get_output_embeddings()
    keep = {id(head.weight)} if head is not None else set()
    return {id(m.weight): m for m in model.modules()
            if isinstance(m, torch.nn.Linear) and id(m.weight) not in keep}


def quantized_weight_bytes(numel: int, out_features: int, quantization: str, double_quant: bool) -> int:
    if quantization == "8bit":  # int8 weights, one fp32 scale per output row
        return numel + 4 * out_features
    blocks = math.ceil(numel / NF4_BLOCK)  # 4-bit: two weights per byte, one absmax per block
    scales = blocks + 4 * math.ceil(blocks / DOUBLE_QUANT_BLOCK) if double_quant else 4 * blocks
    return math.ceil(numel / 2) + scales


def optimizer_state_bytes(optim: str, params: list[torch.Tensor]) -> tuple[int, str]:
    """(bytes, how) of the optimizer's state for these trainable parameters, once it has stepped."""
    optim = optim.lower()
    if "8bit" in optim:  # bitsandbytes blockwise: uint8 states, fp32 states for small tensors
        states = 1 if "lion" in optim else 2
        total = 0
        for p in params:
            if p.numel() < OPTIMIZER_8BIT_MIN_SIZE:
                total += states * 4 * p.numel()
            else:
                total += states * (p.numel() + 4 * math.ceil(p.numel() / OPTIMIZER_8BIT_BLOCK))
        return total, "formula"
    if optim.startswith("sgd"):
        return 0, "formula"  # the Trainer's SGD has no momentum
    if "lion" in optim or "adagrad" in optim or "rmsprop" in optim:
        return sum(p.numel() * 4 for p in params), "formula"
    if optim.startswith("adafactor"):  # factored second moment for matrices, no first moment
        return sum(4 * (sum(p.shape) if p.dim() == 2 else p.numel()) for p in params), "modelled"
    if "adam" in optim:  # exp_avg and exp_avg_sq, like the parameter (32-bit for bnb's 32-bit variants)
        width = 4 if ("32bit" in optim or "bnb" in optim) else None
        return sum(2 * p.numel() * (width or p.element_size()) for p in params), "counted"
    return sum(2 * p.numel() * p.element_size() for p in params), "modelled"  # unknown: assumed Adam-like


# ---------------------------------------------------------------------------- activations

@dataclass
class SavedActivations:
    outside_layers: int  # embeddings, final norm, head, loss
    per_layer: list[int]  # what each decoder layer saves
    layer_inputs: int  # what gradient checkpointing keeps per layer instead (its inputs)
    log_probs: torch.Size | None  # the loss's fp32 log-softmax (the largest tensor for a big vocabulary)

    def total(self, checkpointing: bool) -> int:
        if not checkpointing or not self.per_layer:
            return self.outside_layers + sum(self.per_layer)
        return self.outside_layers + self.layer_inputs * len(self.per_layer) + max(self.per_layer)


def saved_for_backward(model, batch_size: int, seq_length: int, vocab_size: int) -> SavedActivations:
    """Run one training forward on meta tensors and measure what it saves for backward: the tensors still
    held when the forward ends (a branch whose graph was dropped, like DoRA's detached weight norm, frees
    its saved tensors at once), each storage once, parameters excluded (the optimizer accounts for them)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    params = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: list[tuple[weakref.ref, int | None]] = []  # weak: a tensor the graph lets go of is not held
    current: list[int | None] = [None]
    inputs: dict[int, int] = {}

    def pack(tensor):
        if tensor.untyped_storage()._cdata not in params:
            saved.append((weakref.ref(tensor), current[0]))
        return tensor

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    handles = []
    for index, layer in enumerate(layers):

        def enter(module, args, kwargs, index=index):
            current[0] = index
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.is_floating_point()]
            inputs[index] = sum(t.untyped_storage().nbytes() for t in tensors[:1])  # the hidden states

        def leave(module, args, kwargs, output):
            current[0] = None

        handles.append(layer.register_forward_pre_hook(enter, with_kwargs=True))
        handles.append(layer.register_forward_hook(leave, with_kwargs=True))
    ids = torch.zeros(batch_size, seq_length, dtype=torch.long, device="meta")
    model.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            output = model(input_ids=ids, labels=ids)  # no mask: masks are checked with .item(), which meta cannot do
    finally:
        for handle in handles:
            handle.remove()
    held: dict[int, tuple[torch.Tensor, int | None]] = {}
    for ref, layer in saved:
        tensor = ref()
        if tensor is not None:  # every storage still held is alive, so no two of them share an address
            held.setdefault(tensor.untyped_storage()._cdata, (tensor, layer))
    del output
    outside, per_layer = 0, [0] * len(layers)
    for tensor, layer in held.values():
        if layer is None:
            outside += tensor.untyped_storage().nbytes()
        else:
            per_layer[layer] += tensor.untyped_storage().nbytes()
    log_probs = [t.shape for t, _ in held.values()
                 if t.dtype == torch.float32 and t.dim() >= 2 and t.shape[-1] == vocab_size]
    return SavedActivations(outside, per_layer, max(inputs.values(), default=0),
                            max(log_probs, key=lambda shape: shape.numel(), default=None))


# ---------------------------------------------------------------------------- the plan

def run_model(cfg, config, compute_dtype: torch.dtype, attention: str = PLANNED_ATTENTION):
    """The run's model on the meta device with its real PEFT config, which the memory plan and the work count
    (harness/plan/work.py) are both taken from: (the model, the Linear layers a 4/8-bit base quantizes by id
    of their weight, whether the optimizer keeps fp32 master weights)."""
    method = cfg.method.method
    # As harness.models.loading loads it: full fine-tuning keeps fp32 master weights; 4/8-bit bases get their
    # remaining 16-bit weights (embeddings, norms, head) cast to fp32 by prepare_model_for_kbit_training.
    master_fp32 = method == "full" and cfg.model.dtype == "auto"
    model = meta_model(config, compute_dtype, attention, cfg.model.trust_remote_code)
    quantized = quantized_linears(model) if cfg.model.quantization in ("4bit", "8bit") else {}
    if method == "full":
        model.requires_grad_(True)
    else:
        model.requires_grad_(False)
        peft = peft_config(cfg.method, model, adalora_schedule(cfg.method, 1000) if method == "adalora" else None)
        if peft is not None:
            from peft import get_peft_model

            if method == "loftq":  # LoftQ's initial values cost no memory of their own; skip computing them
                peft.init_lora_weights, peft.loftq_config = True, {}
            with values_not_drawn():
                model = get_peft_model(model, peft)
            for name, p in model.named_parameters():  # AdaLoRA's rank counters never train (on meta they
                if ".ranknum." in name:                # come out trainable, and would save extra activations)
                    p.requires_grad_(False)
    return model, quantized, master_fp32


def optimized_tensors(model, master_fp32: bool) -> list[torch.Tensor]:
    """The trainable parameters as the optimizer holds them (fp32 masters for full fine-tuning)."""
    return [torch.empty(p.shape, dtype=torch.float32, device="meta") if master_fp32 else p
            for p in model.parameters() if p.requires_grad]


def plan_run(cfg, config, compute_dtype: torch.dtype = torch.bfloat16, attention: str = PLANNED_ATTENTION,
             context_bytes: int = CUDA_CONTEXT_BYTES, label: str = "", context_how: str = "modelled",
             allocator_ratio: float | None = None, allocator_how: str = "") -> Plan:
    """Plan the peak memory of the run `cfg` (a RunConfig) on a model with this transformers config.

    A model whose decoder layers are all alike is counted on two and three of its layers and extrapolated (a 70B
    model plans as fast as a 3-layer one; tests/test_plan_speed.py holds it equal to counting the whole model)."""
    layers = text_config(config).num_hidden_layers
    if layers > 3 and layers_alike(config, compute_dtype, cfg.model.trust_remote_code):
        two, three = (_counted(cfg, with_layers(config, n), compute_dtype, attention) for n in (2, 3))
        counted = _extrapolated(two, three, layers, cfg)
    else:
        counted = _counted(cfg, config, compute_dtype, attention)
    method, quantization, targs = cfg.method.method, cfg.model.quantization, cfg.train
    parts = list(counted.parts)
    seq_length = cfg.data.max_seq_length  # dynamic padding: the longest sequence of a batch, at most this
    if cfg.run.objective == "grpo":  # before the dequantized weight, which _counted puts last
        parts.insert(len(parts) - (quantization in ("4bit", "8bit")), Part(
            "generation KV cache beyond the activations (transient)",
            _generation_cache_beyond(config, targs, seq_length, compute_dtype, parts), "modelled",
            scales_with_batch=True))
    if allocator_ratio and allocator_ratio > 1:
        # A GPU calibration's peak reserved / peak allocated (harness.plan.speeds.calibrated_memory): the caching
        # allocator holds whole blocks beyond what the tensors take, and the GPU runs out by what it reserves. In
        # two parts, so that a batch search scales the reserve of what scales with the batch, and only that.
        scaling = sum(part.bytes for part in parts if part.scales_with_batch)
        fixed = sum(part.bytes for part in parts) - scaling
        parts += [Part("allocator reserve beyond the batch's tensors", round((allocator_ratio - 1) * scaling),
                       allocator_how, scales_with_batch=True),
                  Part("allocator reserve beyond the other tensors", round((allocator_ratio - 1) * fixed),
                       allocator_how)]
    parts.append(Part("CUDA context", context_bytes, context_how))  # context_how: "measured (...)" from a calibration
    rank = cfg.method.init_r if method == "adalora" else (cfg.method.r if method in LORA_FAMILY else None)
    return Plan(
        model=cfg.model.model, method=method, rank=rank, quantization=quantization,
        optim=str(getattr(targs.optim, "value", targs.optim)), batch_size=targs.per_device_train_batch_size,
        seq_length=seq_length, checkpointing=bool(targs.activation_checkpointing),
        compute_dtype=str(compute_dtype).removeprefix("torch."),
        trainable_params=counted.trainable_count, total_params=counted.total_count, parts=parts, label=label,
    )


@dataclass
class _Counted:
    """What the plan takes from the meta model: its parts but the GRPO cache and the CUDA context (the
    dequantized weight last, where there is one), and what the extrapolation needs beside their totals."""

    parts: list[Part]
    saved: SavedActivations
    trainable_count: int
    total_count: int
    outside_optimized: dict[str, torch.Tensor]  # trainable tensors outside the layers, as the optimizer holds them
    layer_optimizer_bytes: list[int]  # the optimizer's states of each layer's trainable tensors


def _extrapolated(two: _Counted, three: _Counted, layers: int, cfg) -> _Counted:
    """The model with `layers` decoder layers alike, from its two- and three-layer copies. Parts and counts grow
    by the third layer's share, but for two: the activations keep each layer's own (a checkpointed plan keeps
    the largest layer's; prefix tuning's second layer saves more than the rest, so the first two are taken as
    counted and the third repeated), and the optimizer's states are taken per tensor (a tensor outside the
    layers can grow with them, prefix tuning's, and cross the size where bitsandbytes' states turn 8-bit)."""

    def grown(a: int, b: int) -> int:
        return b + (layers - 3) * (b - a)

    saved = SavedActivations(grown(two.saved.outside_layers, three.saved.outside_layers),
                             three.saved.per_layer[:2] + three.saved.per_layer[2:3] * (layers - 2),
                             three.saved.layer_inputs, three.saved.log_probs)
    outside = [torch.empty([grown(a, b) for a, b in zip(two.outside_optimized[name].shape, tensor.shape)],
                           dtype=tensor.dtype, device="meta") for name, tensor in three.outside_optimized.items()]
    optim = str(getattr(cfg.train.optim, "value", cfg.train.optim))
    optimizer = (optimizer_state_bytes(optim, outside)[0] + sum(three.layer_optimizer_bytes[:2])
                 + (layers - 2) * three.layer_optimizer_bytes[2])
    parts = []
    for a, b in zip(two.parts, three.parts):
        if b.name.startswith(ACTIVATIONS):
            parts.append(dataclasses.replace(b, bytes=saved.total(bool(cfg.train.activation_checkpointing))))
        else:
            parts.append(dataclasses.replace(b, bytes=optimizer if b.name.startswith("optimizer states")
                                             else grown(a.bytes, b.bytes)))
    return _Counted(parts, saved, grown(two.trainable_count, three.trainable_count),
                    grown(two.total_count, three.total_count), {}, [])


ACTIVATIONS = "activations saved for backward"
_ALIKE: dict[tuple, bool] = {}


def layers_alike(config, compute_dtype: torch.dtype, trust_remote_code: bool = False) -> bool:
    """Whether every decoder layer has the same modules and parameter shapes (the model without an adapter, built
    on meta once per config; the PEFT config picks modules by name, so it adapts every layer alike)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    key = (config.to_json_string(use_diff=False), str(compute_dtype), trust_remote_code)
    if key not in _ALIKE:
        model = meta_model(config, compute_dtype, PLANNED_ATTENTION, trust_remote_code)

        def signature(layer):
            return ([type(m).__name__ for m in layer.modules()],
                    [(name, tuple(p.shape), p.dtype) for name, p in layer.named_parameters()])

        layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        if len(_ALIKE) >= 32:  # one entry per model and dtype planned in this process
            _ALIKE.pop(next(iter(_ALIKE)))
        _ALIKE[key] = bool(layers) and all(signature(layer) == signature(layers[0]) for layer in layers[1:])
    return _ALIKE[key]


def _counted(cfg, config, compute_dtype: torch.dtype, attention: str) -> _Counted:
    """The parts of the plan counted on the meta model with this config (every layer of it)."""
    method, quantization = cfg.method.method, cfg.model.quantization
    targs = cfg.train
    optim = str(getattr(targs.optim, "value", targs.optim))  # an OptimizerNames member, or a name
    dtype_name = str(compute_dtype).removeprefix("torch.")
    model, quantized, master_fp32 = run_model(cfg, config, compute_dtype, attention)
    weights = trainable = trainable_count = total_count = 0
    for name, p in model.named_parameters():
        total_count += p.numel()
        if p.requires_grad:
            size = 4 if master_fp32 else p.element_size()
            trainable += p.numel() * size
            trainable_count += p.numel()
        elif id(p) in quantized:
            weights += quantized_weight_bytes(p.numel(), quantized[id(p)].out_features, quantization,
                                              cfg.model.bnb_4bit_use_double_quant)
        else:
            weights += p.numel() * (4 if quantized and p.is_floating_point() else p.element_size())
    parts = [
        Part(f"weights ({_format_label(quantization, dtype_name, master_fp32)})", weights,
             "formula" if quantized else "counted"),
        Part("trainable parameters", trainable, "counted"),
        Part("gradients", trainable, "counted"),
    ]
    optimizer, how = optimizer_state_bytes(optim, optimized_tensors(model, master_fp32))
    parts.append(Part(f"optimizer states ({optim})", optimizer, how))
    outside_optimized, layer_optimizer_bytes = _optimized_by_layer(model, optim, master_fp32)
    if method == "adalora":  # importance scores: ipt, exp_avg_ipt, exp_avg_unc per adapter parameter
        scores = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)
        parts.append(Part("AdaLoRA importance scores", 3 * scores, "counted"))
    if master_fp32 and compute_dtype != torch.float32:
        copies = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
        parts.append(Part("16-bit weight copies (autocast)", copies * compute_dtype.itemsize, "modelled"))

    seq_length = cfg.data.max_seq_length
    objective = cfg.run.objective
    # DPO runs each pair's chosen and rejected answer in one batch: twice the sequences of its batch of pairs.
    sequences = targs.per_device_train_batch_size * (2 if objective == "dpo" else 1)
    saved = saved_for_backward(model, sequences, seq_length, config.vocab_size)
    parts.append(Part(ACTIVATIONS + (" (checkpointed)" if targs.activation_checkpointing else ""),
                      saved.total(targs.activation_checkpointing), "counted", scales_with_batch=True))
    # The loss: the logits in the compute dtype and their fp32 copy exist beside the saved log-softmax
    # (forward), as do the gradients of both (backward).
    # TRL's DPOTrainer computes the answers' log-probabilities through a fused head in chunks: no full logits.
    if saved.log_probs is not None and objective != "dpo":
        positions = saved.log_probs.numel() // saved.log_probs[-1]
        width = compute_dtype.itemsize + (0 if compute_dtype == torch.float32 else 4)
        parts.append(Part("logits and their fp32 copy (transient)", positions * config.vocab_size * width,
                          "modelled", scales_with_batch=True))
    if objective == "dpo" and method == "full" and not targs.precompute_ref_log_probs:
        # With an adapter the reference is the base with the adapter off; full fine-tuning needs a frozen copy.
        reference = sum(p.numel() for p in model.parameters()) * compute_dtype.itemsize
        parts.append(Part(f"reference model ({dtype_name}, frozen copy)", reference, "counted"))
    if quantized:
        largest = max(m.weight.numel() for m in quantized.values())
        parts.append(Part("one dequantized weight (transient)", largest * compute_dtype.itemsize, "modelled"))
    return _Counted(parts, saved, trainable_count, total_count, outside_optimized, layer_optimizer_bytes)


def _optimized_by_layer(model, optim: str, master_fp32: bool) -> tuple[dict[str, torch.Tensor], list[int]]:
    """The trainable tensors outside the decoder layers, by name, and the optimizer's states of each layer's."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    layer_of = {id(p): index for index, layer in enumerate(layers) for p in layer.parameters()}
    outside, per_layer = {}, [0] * len(layers)
    for name, p in model.named_parameters():
        if p.requires_grad:
            held = torch.empty(p.shape, dtype=torch.float32, device="meta") if master_fp32 else p
            if id(p) in layer_of:
                per_layer[layer_of[id(p)]] += optimizer_state_bytes(optim, [held])[0]
            else:
                outside[name] = held
    return outside, per_layer


def _generation_cache_beyond(config, targs, seq_length: int, dtype: torch.dtype, parts: list[Part]) -> int:
    """GRPO generates the completions of a whole generation batch (batch x steps per generation) at once; their
    key/value cache (prompt + completion tokens, every layer) lives while the loss's activations do not, so
    only what it needs beyond those activations and logits adds to the peak."""
    layers = config.num_hidden_layers
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    sequences = targs.per_device_train_batch_size * (targs.steps_per_generation or targs.gradient_accumulation_steps)
    cache = 2 * layers * heads * head_dim * sequences * seq_length * dtype.itemsize
    training = sum(part.bytes for part in parts if part.scales_with_batch)
    return max(0, cache - training)


def _format_label(quantization: str, dtype_name: str, master_fp32: bool) -> str:
    if quantization == "4bit":
        return "4-bit, the rest fp32"
    if quantization == "8bit":
        return "8-bit, the rest fp32"
    return "fp32" if master_fp32 else dtype_name

