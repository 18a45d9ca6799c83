"""The work of one optimizer step (harness/plan/work.py): what is counted on the meta device equals what PyTorch's
own FLOP counter counts on a real CPU step, and it scales as the arithmetic says it must."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from harness.locations import REPO_ROOT
from harness.plan import meta_ops, work
from harness.plan.architectures import model_config
from harness.plan.memory import quantized_linears, quantized_weight_bytes
from harness.plan.work import step_work
from harness.run.command_line import parse_args

QWEN2_7B = "Qwen/Qwen2-7B-Instruct"


def _cfg(model: str = "tiny-qwen2", *flags: str):
    return parse_args({}, ["--model", model, "--output_dir", "unused", "--per_device_train_batch_size", "2",
                           "--gradient_accumulation_steps", "1", "--max_seq_length", "24",
                           "--activation_checkpointing", "false", *flags])


def _work(model: str = "tiny-qwen2", *flags: str, dtype=torch.float32):
    return step_work(_cfg(model, *flags), model_config(model), dtype)


def _real_flops(cfg) -> tuple[int, int]:
    """(forward, forward + backward) FLOPs of one real training step of tiny-qwen2 on the CPU, set up as the
    harness and the Trainer set it up (its PEFT config; non-reentrant checkpointing, inputs needing gradients),
    counted by FlopCounterMode. The CPU's SDPA kernel has no formula in the counter: it gets the GPU flash
    kernel's, which is what the meta count uses."""
    from peft import get_peft_model
    from torch.utils.flop_counter import FlopCounterMode, flop_registry
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from harness.models.methods import adalora_schedule, peft_config
    from harness.models.offline import resolve_offline_model
    from harness.plan.meta_ops import EXTRA_FLOP_FORMULAS, FUSED_HEAD_OUTPUTS

    aten = torch.ops.aten

    def formula_of(op):
        def count(*args, **kwargs):
            return flop_registry[op](*args, **kwargs)
        count._get_raw = True  # already takes the tensors' shapes
        return count

    cpu_flash = {aten._scaled_dot_product_flash_attention_for_cpu: formula_of(aten._scaled_dot_product_flash_attention),
                 aten._scaled_dot_product_flash_attention_for_cpu_backward:
                     formula_of(aten._scaled_dot_product_flash_attention_backward), **EXTRA_FLOP_FORMULAS}
    model = AutoModelForCausalLM.from_pretrained(resolve_offline_model("tiny-qwen2"), attn_implementation="sdpa")
    add_fused_lm_head(model, outputs=FUSED_HEAD_OUTPUTS)  # SFTTrainer's loss, as the planner counts an SFT step
    method = cfg.method.method
    if method == "full":
        model.requires_grad_(True)
    else:
        model = get_peft_model(model, peft_config(cfg.method, model, adalora_schedule(cfg.method, 1000)
                                                  if method == "adalora" else None))
    if cfg.train.activation_checkpointing:  # what the Trainer calls (it also makes the inputs need gradients)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (cfg.train.per_device_train_batch_size, cfg.data.max_seq_length))
    with FlopCounterMode(display=False, custom_mapping=cpu_flash) as counter:
        loss = model(input_ids=ids, labels=ids, fused_lm_head=True).loss
        forward = counter.get_total_flops()
        loss.backward()
    return forward, counter.get_total_flops()


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("method, checkpointing", [
    ("full", "false"), ("full", "true"), ("lora", "false"), ("lora", "true"), ("dora", "true"),
    ("adalora", "true"), ("ia3", "true"), ("prompt_tuning", "true"), ("prefix_tuning", "false"), ("p_tuning", "false"),
])
def test_meta_count_equals_the_flop_counter_on_a_real_cpu_step(method, checkpointing):
    cfg = _cfg("tiny-qwen2", "--method", method, "--activation_checkpointing", checkpointing, "--r", "4",
               "--init_r", "6", "--num_virtual_tokens", "5")
    counted = step_work(cfg, model_config("tiny-qwen2"), torch.float32)
    forward, total = _real_flops(cfg)
    assert counted.forward_flops == forward > 0
    assert counted.flops == total  # backward, and checkpointing's recompute as PyTorch really runs it


def test_forward_is_two_flops_per_weight_and_token_plus_attention():
    # stories260k, by hand: 5 layers of q 64x64, k and v 64x32, o 64x64, gate/up/down 64x172, and the head 64x512
    # (tied to the embedding, which itself is a lookup); attention QK^T and PV, 8 heads of 8, over the T x T pairs.
    # The head scores every position but the last of each row (TRL's fused LM head, as SFTTrainer runs it: the
    # last has no next token), and its backward recomputes each tile of logits before its two gradient products.
    batch, length = 2, 24
    layers, head = 5 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 172), 64 * 512
    scored = batch * (length - 1)
    attention = 5 * 2 * (2 * batch * 8 * length * length * 8)
    counted = _work("stories260k", "--method", "full")
    assert counted.tokens == batch * length
    assert counted.forward_flops == 2 * layers * batch * length + 2 * head * scored + attention
    # Full fine-tuning's backward: gradients of the inputs and of the weights, twice the forward (the flash
    # kernel's backward recomputes the scores: 2.5 times its forward); the head's: recompute + both gradients.
    assert counted.backward_flops == 2 * 2 * layers * batch * length + 3 * 2 * head * scored + 2.5 * attention
    assert counted.attention_flops == 3.5 * attention


def test_frozen_weights_take_no_weight_gradient_on_qwen2_7b():
    lora, dora, full = (_work(QWEN2_7B, "--method", m, "--r", "16", "--per_device_train_batch_size", "1",
                              "--max_seq_length", "1024", dtype=torch.bfloat16) for m in ("lora", "dora", "full"))
    # twice the forward, plus the fused head recomputing its logits once more (hidden 3584 x vocabulary 152064,
    # over the 1023 positions that have a next token)
    head = 2 * 3584 * 152064 * 1023
    assert full.backward_flops == pytest.approx(2 * full.forward_flops + head, rel=0.02)
    assert 0.5 < lora.backward_flops / full.backward_flops < 0.55  # only the inputs' gradients (and the adapter's)
    assert lora.backward_flops < dora.backward_flops < full.backward_flops
    # DoRA with dropout reruns the base layer on the dropped-out input (PEFT's DoRA variant), so its forward
    # and backward nearly double; without dropout it is LoRA's and the magnitude's small extra.
    assert dora.forward_flops > 1.9 * lora.forward_flops
    dora_without_dropout = _work(QWEN2_7B, "--method", "dora", "--r", "16", "--lora_dropout", "0",
                                 "--per_device_train_batch_size", "1", "--max_seq_length", "1024", dtype=torch.bfloat16)
    assert dora_without_dropout.backward_flops == pytest.approx(lora.backward_flops, rel=0.01)
    assert dora.weight_norm_bytes > 0 == lora.weight_norm_bytes


def test_checkpointing_reruns_the_layers_forward_up_to_what_backward_needs():
    config = model_config("stories260k")
    for method in ("lora", "full"):
        plain = _work("stories260k", "--method", method)
        checkpointed = _work("stories260k", "--method", method, "--activation_checkpointing", "true")
        assert checkpointed.forward_flops == plain.forward_flops and plain.recompute_flops == 0
        layers_forward = plain.forward_flops - 2 * 64 * 512 * (plain.tokens - plain.tokens // 24)  # all but the head
        if method == "full":  # the recompute stops before the last product, down_proj, whose output no backward needs
            down_proj = 2 * 172 * 64 * plain.tokens * config.num_hidden_layers
            assert checkpointed.recompute_flops == layers_forward - down_proj
            assert checkpointed.backward_flops == plain.backward_flops
        else:  # LoRA's down_proj runs before its adapter: only the last adapter product is left out
            assert layers_forward * 0.97 < checkpointed.recompute_flops < layers_forward
            # and with checkpointing the Trainer makes the inputs need gradients: the first layer's too
            assert checkpointed.backward_flops > plain.backward_flops


def test_flops_grow_linearly_with_the_batch_and_the_attention_with_the_length_squared():
    short = _work("stories260k", "--method", "lora", "--max_seq_length", "64")
    batch = _work("stories260k", "--method", "lora", "--max_seq_length", "64", "--per_device_train_batch_size", "4")
    accumulated = _work("stories260k", "--method", "lora", "--max_seq_length", "64", "--gradient_accumulation_steps", "3")
    long = _work("stories260k", "--method", "lora", "--max_seq_length", "128")
    assert batch.flops == 2 * short.flops and accumulated.flops == 3 * short.flops
    assert long.attention_flops == 4 * short.attention_flops
    # and the rest with the tokens: the head scores all but each row's last (forward, recompute, input gradient)
    rows = short.tokens // 64
    head_per_position = 3 * 2 * 64 * 512
    assert (long.flops - long.attention_flops) - head_per_position * rows * 127 == 2 * (
        short.flops - short.attention_flops - head_per_position * rows * 63)


def test_a_4bit_base_adds_dequantized_bytes_and_no_flops():
    from harness.plan.memory import meta_model

    plain = _work("tiny-qwen2", "--method", "lora", "--activation_checkpointing", "true", dtype=torch.bfloat16)
    nf4 = _work("tiny-qwen2", "--method", "lora", "--activation_checkpointing", "true", "--quantization", "4bit",
                dtype=torch.bfloat16)
    assert nf4.flops == plain.flops and plain.dequant_bytes == 0
    # Checkpointed, every quantized weight is dequantized three times a micro-batch: forward, backward (the inputs
    # need gradients) and recompute; each time its packed bytes are read and 16 bits a weight written.
    linears = quantized_linears(meta_model(model_config("tiny-qwen2"), torch.bfloat16)).values()
    once = sum(quantized_weight_bytes(m.weight.numel(), m.out_features, "4bit", True) + 2 * m.weight.numel()
               for m in linears)
    assert nf4.dequant_bytes == 3 * once
    # prepare_model_for_kbit_training's fp32 head: TRL's fused head casts it to 16 bits (forward and backward)
    head = model_config("tiny-qwen2").hidden_size * model_config("tiny-qwen2").vocab_size
    assert nf4.cast_bytes - plain.cast_bytes == 2 * head * (4 + 2)


def test_prompt_tuning_runs_its_virtual_tokens_through_the_model():
    prompted = _work("stories260k", "--method", "prompt_tuning", "--num_virtual_tokens", "8")
    longer = _work("stories260k", "--method", "none", "--max_seq_length", str(24 + 8))
    assert prompted.forward_flops == longer.forward_flops
    assert prompted.tokens == 2 * 24  # the user's tokens: the virtual ones are not data


def test_8bit_optimizer_moves_a_quarter_of_adamw_states():
    flags = ("--method", "lora", "--r", "16", "--per_device_train_batch_size", "1", "--max_seq_length", "128")
    states = {}
    for optim in ("adamw_torch_fused", "paged_adamw_8bit"):  # both one fused pass (torch's unfused AdamW: more)
        w = _work(QWEN2_7B, *flags, "--optim", optim, dtype=torch.bfloat16)
        # optimizer: 3 x the trainable bytes (parameters read and written, gradients read) + states read and
        # written; gradient_bytes is the clipping's 3 passes at accumulation 1
        states[optim] = (w.optimizer_bytes - w.gradient_bytes) / 2
    assert 3.8 < states["adamw_torch_fused"] / states["paged_adamw_8bit"] < 4.0  # 1 byte + a 4-byte scale per 256


def test_adalora_scores_are_an_elementwise_pass_over_its_parameters():
    scored = _work("tiny-qwen2", "--method", "adalora")
    trainable = scored.gradient_bytes // 3  # accumulation 1: the clipping's 3 passes over the gradients
    # PEFT's update_ipt: |p * grad|, two moving averages and |ipt - average|: 10 element-wise ops, 24 passes
    assert scored.score_bytes == 24 * trainable > 0
    assert _work("tiny-qwen2", "--method", "lora").score_bytes == 0


def test_dpo_adds_the_reference_forward_of_both_answers():
    from harness.bench.grid import load_defaults

    path = REPO_ROOT / "recipes" / "qwen2_5_0_5b_dpo.py"
    config = model_config("tiny-qwen2")

    def dpo(method: str):
        cfg = parse_args(load_defaults(path.stem, path.resolve()), ["--model", "tiny-qwen2", "--method", method,
                                                                    "--max_seq_length", "32"])
        return cfg, step_work(cfg, config, torch.float32)

    cfg, lora = dpo("lora")
    _, base = dpo("none")  # the reference is the base with the adapter off: the untrained model's forward
    assert lora.reference_flops == base.forward_flops > 0
    assert lora.tokens == 2 * cfg.train.per_device_train_batch_size * cfg.train.gradient_accumulation_steps * 32


def test_uniform_layers_count_as_one_and_two_layers_extrapolated(monkeypatch):
    config = model_config("tiny-qwen2")
    config.num_hidden_layers = 5
    config.layer_types = config.layer_types[:1] * 5 if getattr(config, "layer_types", None) else None
    counted_layers = []
    count = work._count

    def spy(cfg, config, *args):
        counted_layers.append(config.num_hidden_layers)
        return count(cfg, config, *args)

    monkeypatch.setattr(work, "_count", spy)
    for flags in (("--method", "lora", "--activation_checkpointing", "true"), ("--method", "dora"),
                  ("--method", "adalora", "--quantization", "4bit"), ("--method", "prefix_tuning"),
                  ("--method", "full", "--optim", "paged_adamw_8bit")):
        cfg = _cfg("tiny-qwen2", *flags)
        counted_layers.clear()
        work._COUNTS.clear()
        extrapolated = step_work(cfg, config, torch.bfloat16)
        work._COUNTS.clear()
        with monkeypatch.context() as patched:
            patched.setattr(work, "_layers_alike", lambda *args: False)
            whole = step_work(cfg, config, torch.bfloat16)
        assert counted_layers == [1, 2, 5]  # one layer, two layers, then the whole model
        assert dataclasses.asdict(extrapolated) == dataclasses.asdict(whole), flags


def test_counting_a_7b_model_takes_well_under_a_second_a_method():
    import time

    work._COUNTS.clear()
    start = time.perf_counter()
    _work(QWEN2_7B, "--method", "lora", "--r", "16", "--max_seq_length", "1024", "--activation_checkpointing", "true",
          dtype=torch.bfloat16)
    assert time.perf_counter() - start < 10  # ~0.3 s alone; a busy 2-core machine is slower


def test_the_recipes_plans_carry_their_step_work_as_json():
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "harness.plan", "recipes/qwen2_7b_qlora.py", "--json"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)["plans"][0]
    from harness.plan.method_table import compute_dtype as _compute_dtype

    cfg = parse_args(_recipe_defaults("qwen2_7b_qlora"), [])
    counted = step_work(cfg, model_config(cfg.model.model), _compute_dtype(cfg))
    assert plan["step_flops"] == counted.flops and plan["step_bytes"] == counted.bytes > 0
    assert plan["step_work"]["dequant_bytes"] == counted.dequant_bytes > 0 and plan["planned_peak_bytes"] > 0


def _recipe_defaults(name: str) -> dict:
    from harness.bench.grid import load_defaults

    path = Path(REPO_ROOT / "recipes" / f"{name}.py")
    return load_defaults(path.stem, path.resolve())


# ---------------------------------------------------------------------------- element-wise work, random numbers, ops

def test_dropout_draws_random_numbers_for_each_adapter_input():
    still = _work("stories260k", "--method", "lora", "--lora_dropout", "0")
    dropped = _work("stories260k", "--method", "lora", "--lora_dropout", "0.1")
    assert still.random_bytes == 0 and still.flops == dropped.flops
    # stories260k, every linear of its 5 layers adapted: each LoRA layer drops out its own copy of its input (q, k,
    # v, o, gate, up: 64 features; down: 172); bernoulli_ writes the float32 mask in place (read and written)
    assert dropped.random_bytes == 5 * (6 * 64 + 172) * dropped.tokens * 4 * 2
    assert dropped.elementwise_bytes > still.elementwise_bytes  # and scales the kept values (div_, mul)
    assert dropped.ops > still.ops


def test_elementwise_bytes_of_the_activation_match_a_hand_count(monkeypatch):
    by_op: dict[str, int] = {}

    class PerOp(meta_ops.BytesTouched):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            before = self.bytes
            out = super().__torch_dispatch__(func, types, args, kwargs)
            by_op[str(func.overloadpacket)] = by_op.get(str(func.overloadpacket), 0) + self.bytes - before
            return out

    monkeypatch.setattr(work, "BytesTouched", PerOp)
    monkeypatch.setattr(work, "_layers_alike", lambda *args: False)  # one count of the whole model
    work._COUNTS.clear()
    counted = _work("stories260k", "--method", "full")
    work._COUNTS.clear()
    # SiLU of the gate, 172 features a token in each of 5 layers, float32: the forward reads and writes it, the
    # backward reads the gradient and the input and writes the input's gradient
    tokens = counted.tokens
    assert by_op["aten.silu"] == 5 * 2 * tokens * 172 * 4
    assert by_op["aten.silu_backward"] == 5 * 3 * tokens * 172 * 4
    assert counted.elementwise_bytes == sum(by_op.values()) - counted.random_bytes


def test_ops_and_elementwise_bytes_grow_with_the_layers(monkeypatch):
    monkeypatch.setattr(work, "_layers_alike", lambda *args: False)  # count each model whole
    counts = {}
    for layers in (2, 3, 5):
        config = model_config("stories260k")
        config.num_hidden_layers = layers
        cfg = _cfg("stories260k", "--method", "lora")
        work._COUNTS.clear()
        counts[layers] = step_work(cfg, config, torch.float32)
    work._COUNTS.clear()
    for field in ("ops", "elementwise_bytes", "random_bytes", "optimizer_ops"):
        per_layer = getattr(counts[3], field) - getattr(counts[2], field)
        assert per_layer > 0 and getattr(counts[5], field) - getattr(counts[3], field) == 2 * per_layer, field


def test_lora_rank_products_are_the_skinny_flops_on_qwen2_7b():
    flags = ("--per_device_train_batch_size", "1", "--max_seq_length", "128")
    full = _work(QWEN2_7B, "--method", "full", *flags, dtype=torch.bfloat16)
    lora = _work(QWEN2_7B, "--method", "lora", "--r", "16", *flags, dtype=torch.bfloat16)
    assert full.skinny_flops == 0
    # each adapted linear (in, out) adds 2 r (in + out) FLOPs a token forward, three times that with its backward
    # (the first layer's input needs no gradient: about 1 % less); q, k, v, o, gate, up, down of 28 layers
    features = (3584 + 3584) + 2 * (3584 + 512) + (3584 + 3584) + 3 * (3584 + 18944)
    assert lora.skinny_flops == pytest.approx(3 * 2 * 16 * features * 28 * lora.tokens, rel=0.02)


@pytest.mark.parametrize("decay", [0.0, 0.01])
def test_torch_adamw_moves_its_passes_and_a_fused_optimizer_one(decay):
    # torch's AdamW (not fused) goes over the parameters, gradients and states op by op: what a real CPU step of it
    # moves, counted by the same dispatch mode, is what the plan counts per byte of trainable parameters
    weight = torch.nn.Parameter(torch.randn(32, 48))
    weight.grad = torch.randn(32, 48)
    optimizer = torch.optim.AdamW([weight], foreach=False, weight_decay=decay)
    optimizer.step()
    touched = meta_ops.BytesTouched()
    with touched:
        optimizer.step()
    real_per_byte = touched.bytes / (weight.numel() * 4)
    flags = ("--method", "full", "--weight_decay", str(decay))
    unfused, fused, paged = (_work("stories260k", *flags, "--optim", optim)
                             for optim in ("adamw_torch", "adamw_torch_fused", "paged_adamw_8bit"))
    # a fused kernel's one pass: weights read and written, gradients read, two fp32 states read and written
    trainable = 4 * 260_032  # stories260k's 260,032 parameters (its embedding tied to the head), fp32
    assert fused.optimizer_bytes == 3 * trainable + 2 * 2 * trainable
    assert unfused.optimizer_bytes == pytest.approx(real_per_byte * trainable, rel=1e-3)
    assert unfused.optimizer_bytes > 2.5 * fused.optimizer_bytes and paged.optimizer_bytes < fused.optimizer_bytes
