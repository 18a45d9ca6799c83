"""The memory planner: what it counts on the meta device equals what a real CPU training step holds."""
from __future__ import annotations

import json
import subprocess
import sys
import weakref

import pytest
import torch

from harness.config import REPO_ROOT, parse_args
from harness.offline_models import resolve_offline_model
from harness.plan.architectures import model_config
from harness.plan.memory import plan_run, quantized_weight_bytes

SETTINGS = ["--model", "tiny-qwen2", "--output_dir", "unused", "--max_seq_length", "24",
            "--per_device_train_batch_size", "2", "--optim", "adamw_torch", "--activation_checkpointing", "false"]


def _cfg(*flags: str):
    return parse_args({}, [*SETTINGS, *flags])


def _real_step(cfg):
    """The run's model for real (CPU, fp32), one forward/backward/AdamW step: what it holds, in bytes."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from harness.methods import adalora_schedule, peft_config

    model = AutoModelForCausalLM.from_pretrained(resolve_offline_model("tiny-qwen2"), attn_implementation="eager")
    if cfg.method.method == "full":
        model.requires_grad_(True)
    else:
        model = get_peft_model(model, peft_config(cfg.method, model, adalora_schedule(cfg.method, 1000)
                                                  if cfg.method.method == "adalora" else None))
    trainable = [p for p in model.parameters() if p.requires_grad]
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = []

    def pack(tensor):
        saved.append(weakref.ref(tensor))  # only what the graph still holds when the forward ends counts
        return tensor

    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(input_ids=ids, labels=ids).loss
    held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in (ref() for ref in saved)
            if t is not None and t.untyped_storage().data_ptr() not in params}
    loss.backward()
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    optimizer.step()
    state = sum(t.nbytes for s in optimizer.state.values() for k, t in s.items() if k != "step")
    return {
        "trainable parameters": sum(p.numel() * p.element_size() for p in trainable),
        "gradients": sum(p.grad.nbytes for p in trainable),
        "optimizer states (adamw_torch)": state,
        "activations saved for backward": sum(held.values()),
    }


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("method", ["full", "lora", "dora", "adalora", "ia3", "prompt_tuning", "p_tuning"])
def test_planned_bytes_equal_what_a_real_step_holds(method):
    cfg = _cfg("--method", method, "--r", "4", "--init_r", "6", "--num_virtual_tokens", "5")
    plan = plan_run(cfg, model_config("tiny-qwen2"), compute_dtype=torch.float32, attention="eager")
    planned = {part.name: part.bytes for part in plan.parts}
    real = _real_step(cfg)
    for name in ("trainable parameters", "gradients", "optimizer states (adamw_torch)"):
        assert planned[name] == real[name] > 0, name
    # The same saved-tensor measurement on meta tensors and on real ones: the forward saves the same.
    assert planned["activations saved for backward"] == pytest.approx(real["activations saved for backward"], rel=0.01)


def test_activation_checkpointing_keeps_layer_inputs_and_one_layer():
    plain = plan_run(_cfg("--method", "lora"), model_config("tiny-qwen2"), compute_dtype=torch.float32)
    checkpointed = plan_run(_cfg("--method", "lora", "--activation_checkpointing", "true"), model_config("tiny-qwen2"),
                            compute_dtype=torch.float32)
    act = {p.name.split(" (")[0]: p.bytes for p in plain.parts}["activations saved for backward"]
    act_ckpt = {p.name.split(" (")[0]: p.bytes for p in checkpointed.parts}["activations saved for backward"]
    assert 0 < act_ckpt < act


def test_rank_grows_trainable_bytes_linearly_and_batch_grows_activations():
    config = model_config("tiny-qwen2")
    r4, r8 = (plan_run(_cfg("--method", "lora", "--r", str(r)), config) for r in (4, 8))
    assert r8.trainable_params == 2 * r4.trainable_params
    b2 = plan_run(_cfg("--method", "lora", "--per_device_train_batch_size", "4"), config)
    per_batch = [sum(p.bytes for p in plan.parts if p.scales_with_batch) for plan in (r4, b2)]
    assert per_batch[1] == pytest.approx(2 * per_batch[0], rel=0.02)  # masks and rotary tables do not scale


def test_4bit_weights_take_the_bytes_bitsandbytes_stores():
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    from harness.models import load_model

    cfg = _cfg("--method", "lora", "--quantization", "4bit")
    model = load_model(cfg.model, "lora", gradient_checkpointing=False)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers
    for layer in layers:
        state = layer.weight.quant_state
        stored = layer.weight.nbytes + state.absmax.nbytes + (state.state2.absmax.nbytes if state.nested else 0)
        planned = quantized_weight_bytes(layer.in_features * layer.out_features, layer.out_features, "4bit", state.nested)
        assert planned == stored


@pytest.mark.parametrize("name, parameters", [("Qwen/Qwen2-7B-Instruct", 7_615_616_512),
                                              ("meta-llama/Llama-2-7b-hf", 6_738_415_616)])
def test_built_in_architectures_have_the_published_parameter_counts(name, parameters):
    plan = plan_run(parse_args({}, ["--model", name, "--output_dir", "unused", "--method", "full"]), model_config(name))
    assert plan.total_params == parameters


def _plan(*argv: str):
    return subprocess.run([sys.executable, "-m", "harness.plan", *argv], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300)


def test_table_of_every_method_as_json():
    done = _plan("--model", "tiny-qwen2", "--ranks", "4,8", "--gpu", "T4", "--max_seq_length", "64", "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["gpu"]["name"] == "T4" and out["gpu"]["bytes"] == 15360 * 2**20
    methods = {p["method"] for p in out["plans"]}
    assert methods == {"full", "lora", "dora", "rslora", "loftq", "adalora", "ia3", "prompt_tuning", "prefix_tuning",
                       "p_tuning"}
    lora = [p for p in out["plans"] if p["method"] == "lora" and p["quantization"] == "none"]
    assert [p["rank"] for p in lora] == [4, 8] and lora[1]["trainable_params"] == 2 * lora[0]["trainable_params"]
    assert all(p["max_seq_length"] == 64 for p in out["plans"])


def test_a_recipe_with_its_flags_and_a_verdict():
    done = _plan("recipes/qwen2_7b_adalora.py", "--gpu", "16", "--model", "tiny-qwen2", "--init_r", "6")
    assert done.returncode == 0, done.stderr
    assert "adalora rank 6" in done.stdout and "16 GiB (16.0 GiB): fits" in done.stdout
    assert done.stderr == ""  # no library noise


@pytest.mark.parametrize("argv, message", [
    (["--model", "tiny-qwen2", "--gpu", "T5"], "plan: --gpu: unknown GPU 'T5'; use a size in GiB"),
    (["--model", "no-such/model"], "plan: no model config for 'no-such/model'"),
    (["recipes/nope.py"], "plan: recipe file recipes/nope.py not found"),
    (["recipes/llama2_7b_lora.py", "--r", "0"], "plan: --r must be at least 1, got 0"),
    (["--gpu", "T4"], "plan: name a model"),
    (["--model", "tiny-qwen2", "--ranks", "4,x"], "plan: --ranks: 'x' is not a whole number"),
])
def test_bad_input_is_one_line(argv, message):
    done = _plan(*argv)
    assert done.returncode == 2 and done.stderr.startswith(message) and done.stderr.count("\n") == 1, done.stderr
