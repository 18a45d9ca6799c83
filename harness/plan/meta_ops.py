"""What the planner's meta-device run stands in for, so that harness.plan.work can count a training step on
shapes alone: attention as one counted fused kernel, the dispatch modes that count element-wise bytes and stand in
for autocast (which torch refuses on meta), TRL's fused LM head as SFTTrainer adds it (and the autocast question it
asks), and rows left unpacked.
"""
from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

COUNTED_ATTENTION = "planned_counted_attention"

# ---------------------------------------------------------------------------- attention as one counted kernel

ATTENTION_OPS = {torch.ops.aten._scaled_dot_product_flash_attention,
                  torch.ops.aten._scaled_dot_product_flash_attention_backward}


def _counted_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The flash-attention op on meta tensors, so that the FLOP counter counts attention as the fused kernel a
    GPU runs (the same choice the memory plan makes for what attention keeps)."""
    from transformers.integrations.sdpa_attention import repeat_kv

    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    out = torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, 0.0, True, scale=scaling)[0]
    return out.transpose(1, 2).contiguous(), None


def register_counted_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(COUNTED_ATTENTION, _counted_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(COUNTED_ATTENTION, sdpa_mask)


# ---------------------------------------------------------------------------- dispatch modes

SKINNY_DIMENSION = 64  # a matrix product with a dimension under this (a LoRA rank) is bound by its operands' bytes
MATMULS = {torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm, torch.ops.aten.baddbmm}


def _addmm_in_place(*args, **kwargs):
    return flop_registry[torch.ops.aten.addmm](*args, **kwargs)


_addmm_in_place._get_raw = True  # takes the tensors, as flop_registry's own formulas do
# Products PyTorch's counter has no formula for: the in-place addmm_ with which TRL's fused LM head accumulates
# its gradient GEMMs in fp32 (trl/kernels/chunked_logprob.py, _addmm_fp32 off CUDA): the same FLOPs as addmm.
EXTRA_FLOP_FORMULAS = {torch.ops.aten.addmm_: _addmm_in_place}
_RANDOM = {torch.ops.aten.bernoulli, torch.ops.aten.bernoulli_, torch.ops.aten.native_dropout, torch.ops.aten.rand,
           torch.ops.aten.rand_like, torch.ops.aten.randn, torch.ops.aten.randn_like, torch.ops.aten.uniform_,
           torch.ops.aten.normal_, torch.ops.aten.randint, torch.ops.aten.randint_like}


class BytesTouched(TorchDispatchMode):
    """What the ops run under it do, from their tensors' shapes and dtypes (on meta: no arithmetic): the bytes
    every op but the matrix products (the FLOP counter's) reads and writes (its input and output tensors), the
    random-number ops' bytes apart, the FLOPs of skinny matrix products, and the ops dispatched. Views and
    allocations move no data and are not ops counted (a view costs a CPU a fraction of a microsecond)."""

    MOVE_NOTHING = {torch.ops.aten.empty, torch.ops.aten.empty_like, torch.ops.aten.empty_strided,
                    torch.ops.aten._unsafe_view, torch.ops.aten.lift_fresh}

    def __init__(self):
        super().__init__()
        self.bytes = 0
        self.random_bytes = 0
        self.skinny_flops = 0
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        packet = func.overloadpacket
        if func.is_view or packet in self.MOVE_NOTHING or func.namespace != "aten":
            return out
        self.ops += 1
        if packet in flop_registry or packet in EXTRA_FLOP_FORMULAS:
            if packet in MATMULS or packet in EXTRA_FLOP_FORMULAS:
                three = (torch.ops.aten.addmm, torch.ops.aten.baddbmm, torch.ops.aten.addmm_)
                a, b = args[1:3] if packet in three else args[:2]
                if min(*a.shape[-2:], b.shape[-1]) < SKINNY_DIMENSION:
                    self.skinny_flops += 2 * a.numel() * b.shape[-1]
            return out
        if packet is torch.ops.aten.embedding:  # a lookup reads the rows it writes, not the whole table
            tensors = (args[1], out, out)
        else:
            tensors = tree_leaves((args, kwargs, out))
        moved = sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
        if packet in _RANDOM:
            self.random_bytes += moved
        else:
            self.bytes += moved
        return out


class Autocast(TorchDispatchMode):
    """A GPU's 16-bit autocast as far as the count sees it (torch.autocast refuses the meta device): a matrix product
    with an fp32 operand runs in the compute dtype. Its fp32 activation is cast first, once (an element-wise op the
    count sees; the backward reuses the copy, as autograd keeps autocast's); its fp32 weight too, uncounted here (its
    bytes are cast_bytes). What follows the product then runs in 16 bits, as on the GPU: PEFT's fp32 adapters'
    scaling and the add into the layer's output, and their backward. PEFT's own cast of the input to fp32 and the
    dropout on it stay fp32, as they are under autocast."""

    def __init__(self, dtype: torch.dtype, model):
        super().__init__()
        self.dtype = dtype
        self.params = {p.untyped_storage()._cdata for p in model.parameters()}
        self.copies: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # the original held: its address stays its

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in MATMULS and any(isinstance(a, torch.Tensor) and a.dtype == torch.float32
                                                    for a in args):
            args = tuple(self._cast(a) if isinstance(a, torch.Tensor) and a.dtype == torch.float32 else a
                         for a in args)
        return func(*args, **(kwargs or {}))

    def _cast(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()._cdata
        if storage in self.params:  # a weight: its cast is counted by the Linear's hook (cast_bytes)
            return torch.empty_strided(tensor.shape, tensor.stride(), dtype=self.dtype, device=tensor.device)
        key = (storage, tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()))
        if key not in self.copies:
            self.copies[key] = (tensor, torch.ops.aten._to_copy(tensor, dtype=self.dtype))  # not .to: a view op
        return self.copies[key][1]


# ---------------------------------------------------------------------------- TRL's fused LM head

# What SFTTrainer asks its fused LM head for (trl/trainer/sft_trainer.py: the loss, and the entropy and top-1 metrics)
FUSED_HEAD_OUTPUTS = ("log_probs", "entropy", "is_top1")


def fused_head_hooks(model, touched, loss_start, loss_bytes) -> list:
    """TRL's fused LM head (trl.trainer.utils.add_fused_lm_head, as SFTTrainer adds it) on the counted model, once,
    and hooks that measure its bytes: from the backbone's output to the loss in the forward; in the backward, from
    its start to the gradient reaching the backbone's output. Returns the hooks' handles."""
    from trl.trainer.utils import add_fused_lm_head

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(base, "_planned_fused_head", False):
        add_fused_lm_head(base, outputs=FUSED_HEAD_OUTPUTS)
        base._planned_fused_head = True
    backbone = getattr(base, base.base_model_prefix)

    def backbone_done(module, args, output):
        loss_start[0] = touched.bytes
        hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
        if hidden.requires_grad:
            hidden.register_hook(lambda grad: loss_bytes.__setitem__(0, loss_bytes[0] + touched.bytes - loss_start[0]))

    return [backbone.register_forward_hook(backbone_done)]


@contextlib.contextmanager
def meta_autocast_answered(compute_dtype):
    """TRL's fused LM head asks torch whether autocast is on for its tensors' device; torch has no autocast for
    "meta" and raises. Answer as the real run would: on, in the compute dtype, for a 16-bit run (Autocast)."""
    is_enabled, get_dtype = torch.is_autocast_enabled, torch.get_autocast_dtype

    def enabled(*args):
        return compute_dtype != torch.float32 if args and str(args[0]) == "meta" else is_enabled(*args)

    def dtype(device_type):
        return compute_dtype if str(device_type) == "meta" else get_dtype(device_type)

    torch.is_autocast_enabled, torch.get_autocast_dtype = enabled, dtype
    try:
        yield
    finally:
        torch.is_autocast_enabled, torch.get_autocast_dtype = is_enabled, get_dtype


# ---------------------------------------------------------------------------- rows

@contextlib.contextmanager
def unpacked_rows():
    """Each row of the counted batch is one sequence. Without a cache (checkpointing turns it off) transformers
    checks that from the position ids' values, which meta tensors do not have: answer it for them."""
    from transformers import masking_utils

    find = masking_utils.find_packed_sequence_indices
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = find


# ---------------------------------------------------------------------------- meta stand-ins of per-step work

def adalora_score_bytes(model) -> int:
    """AdaLoRA's importance-score update of one step: PEFT's own RankAllocator.update_ipt, its bytes counted on
    one stand-in adapter parameter (it is element-wise, so every parameter moves as many bytes per element)."""
    allocator = model.base_model.rankallocator
    adapter = [p for name, p in model.named_parameters() if "lora_" in name and allocator.adapter_name in name]
    stand_in = torch.nn.Module()
    stand_in.lora_E = torch.nn.ParameterDict(
        {allocator.adapter_name: torch.nn.Parameter(torch.empty(64, 64, dtype=adapter[0].dtype, device="meta"))})
    stand_in.lora_E[allocator.adapter_name].grad = torch.empty(64, 64, dtype=adapter[0].dtype, device="meta")
    saved = allocator.ipt, allocator.exp_avg_ipt, allocator.exp_avg_unc
    touched = BytesTouched()
    try:
        allocator.reset_ipt()
        allocator.update_ipt(stand_in)  # the first update only allocates the scores
        with touched:
            allocator.update_ipt(stand_in)
    finally:
        allocator.ipt, allocator.exp_avg_ipt, allocator.exp_avg_unc = saved
    return touched.bytes * sum(p.numel() for p in adapter) // (64 * 64)


_OPTIMIZER_OPS: list[int] = []


def optimizer_ops_per_tensor() -> int:
    """Ops of torch's AdamW step and the Trainer's clipping for one trainable tensor, counted by running them on
    a meta stand-in. Off a GPU torch's AdamW takes one tensor at a time (its default foreach is for CUDA), so a
    step dispatches this many ops per trainable tensor; on a GPU foreach groups them (harness.plan.timing)."""
    if not _OPTIMIZER_OPS:
        weight = torch.nn.Parameter(torch.empty(8, 8, device="meta"))
        weight.grad = torch.empty(8, 8, device="meta")
        optimizer = torch.optim.AdamW([weight], foreach=False)
        optimizer.step()  # the first step makes the states
        touched = BytesTouched()
        with touched:
            optimizer.step()
            torch.nn.utils.clip_grad_norm_([weight], 1.0, foreach=False)
        _OPTIMIZER_OPS.append(touched.ops)
    return _OPTIMIZER_OPS[0]
