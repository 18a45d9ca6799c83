"""The memory planner: what it counts on the meta device equals what a real CPU training step holds."""
from __future__ import annotations

import json
import subprocess
import sys
import weakref

import pytest
import torch

from harness.locations import REPO_ROOT
from harness.models.offline import resolve_offline_model
from harness.plan.architectures import model_config
from harness.plan.memory import plan_run, quantized_weight_bytes
from harness.run.command_line import parse_args

SETTINGS = ["--model", "tiny-qwen2", "--output_dir", "unused", "--max_seq_length", "24",
            "--per_device_train_batch_size", "2", "--optim", "adamw_torch", "--activation_checkpointing", "false"]


def _cfg(*flags: str):
    return parse_args({}, [*SETTINGS, *flags])


def _real_step(cfg):
    """The run's model for real (CPU, fp32), one forward/backward/AdamW step: what it holds, in bytes."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from harness.models.methods import adalora_schedule, peft_config

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

    from harness.models.loading import load_model

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
    # beside each plan, its optimizer step's work (harness/plan/work.py): batch 1 x 8 accumulated x 64 tokens
    assert all(p["step_tokens"] == 512 and p["step_flops"] > 0 and p["step_bytes"] > 0 for p in out["plans"])
    assert lora[1]["step_flops"] > lora[0]["step_flops"]  # a higher rank does more work


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
def test_bad_input_is_one_line(argv, message, capsys):
    # In this process (a fresh one costs ~10 s of imports a case); test_a_recipe_with_its_flags_and_a_verdict
    # checks in a fresh process that no library noise precedes what harness.plan prints.
    from harness.plan.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith(message) and err.count("\n") == 1, err


# ---------------------------------------------------------------------------- the recipes' memory check

def _over_budget(plan_small, plan_large) -> float:
    """A --memory_budget_gb between two plans."""
    return (plan_small.total_bytes + plan_large.total_bytes) / 2 / 2**30


def test_a_run_over_its_memory_budget_stops_naming_what_would_fit(capsys):
    from harness.errors import UserError
    from harness.plan.preflight import check_memory_plan

    config = model_config("tiny-qwen2")
    small = plan_run(_cfg("--per_device_train_batch_size", "1"), config, compute_dtype=torch.float32, context_bytes=0)
    large = plan_run(_cfg("--per_device_train_batch_size", "64"), config, compute_dtype=torch.float32, context_bytes=0)
    budget = _over_budget(small, large)
    cfg = _cfg("--per_device_train_batch_size", "64", "--gradient_accumulation_steps", "2",
               "--memory_budget_gb", str(budget))
    with pytest.raises(UserError) as refused:
        check_memory_plan(cfg, cfg.train)
    message = str(refused.value)
    assert "the memory plan says this run needs" in message and "--memory_check false runs it anyway" in message
    assert "Memory plan: planned peak" in capsys.readouterr().out
    batch = int(message.split("--per_device_train_batch_size ")[1].split()[0].rstrip(".;"))
    accumulation = int(message.split("--gradient_accumulation_steps ")[1].split()[0].rstrip(".;"))
    assert batch * accumulation == 64 * 2 and 64 % batch == 0  # the same effective batch
    fitting = plan_run(_cfg("--per_device_train_batch_size", str(batch)), config, compute_dtype=torch.float32, context_bytes=0)
    too_big = plan_run(_cfg("--per_device_train_batch_size", str(batch * 2)), config, compute_dtype=torch.float32,
                       context_bytes=0)  # the next batch that divides 64
    assert fitting.fits(budget * 2**30) and not too_big.fits(budget * 2**30)

    relaxed = _cfg("--per_device_train_batch_size", "64", "--memory_budget_gb", str(budget), "--memory_check", "false")
    record = check_memory_plan(relaxed, relaxed.train)  # planned and recorded, not refused
    assert record["planned_peak_mb"] > budget * 1024 and record["checked_against"] == "memory_budget"


def test_what_would_fit_names_checkpointing_4bit_and_the_largest_rank_that_fit():
    from harness.plan.preflight import what_would_fit

    config = model_config("tiny-qwen2")
    cfg = _cfg("--r", "64", "--per_device_train_batch_size", "1")
    plan = plan_run(cfg, config, context_bytes=0)
    checkpointed = plan_run(_cfg("--r", "64", "--per_device_train_batch_size", "1", "--activation_checkpointing", "true"),
                            config, context_bytes=0)
    fixes = what_would_fit(cfg, config, plan, checkpointed.total_bytes, 0)
    assert "--activation_checkpointing true" in fixes
    rank = int(next(f for f in fixes if f.startswith("--r ")).split()[1])
    assert plan_run(_cfg("--r", str(rank), "--per_device_train_batch_size", "1"), config,
                    context_bytes=0).total_bytes <= checkpointed.total_bytes  # it fits
    assert not plan_run(_cfg("--r", str(rank * 2), "--per_device_train_batch_size", "1"), config,
                        context_bytes=0).fits(checkpointed.total_bytes)  # the next rank up does not


def test_no_budget_on_cpu_prints_the_plan_and_checks_nothing(capsys):
    from harness.plan.preflight import check_memory_plan

    if torch.cuda.is_available():
        pytest.skip("on a GPU the plan is checked against its free memory")
    cfg = _cfg()
    record = check_memory_plan(cfg, cfg.train)
    assert record["status"] == "planned" and "checked_against" not in record and record["cuda_context_mb"] == 0
    assert record["compute_dtype"] == "float32"  # a CPU run computes in fp32: the plan is of this run
    assert capsys.readouterr().out.startswith("Memory plan: planned peak")


def test_the_largest_batch_and_sequence_that_fit_are_where_the_plans_cross_the_budget():
    config = model_config("tiny-qwen2")
    plan = plan_run(_cfg("--max_seq_length", "64"), config)
    capacity = plan.total_bytes * 1.5
    longest = plan.max_seq_length(capacity)
    assert longest > 64
    assert plan_run(_cfg("--max_seq_length", str(longest)), config).total_bytes <= capacity * 1.01  # linear in T
    assert not plan_run(_cfg("--max_seq_length", str(int(longest * 1.1))), config).fits(capacity)


def test_a_table_on_a_gpu_names_the_largest_rank_and_sequence():
    done = _plan("--model", "tiny-qwen2", "--ranks", "4,8", "--gpu", "1", "--max_seq_length", "64")
    assert done.returncode == 0, done.stderr
    assert "| longest sequence " in done.stdout and "Largest rank that fits: LoRA " in done.stdout


def test_planned_qwen2_7b_nf4_weights_match_the_guides_5_5_gb():
    from harness.plan.published import PUBLISHED, planned

    entry = next(e for e in PUBLISHED if e.what.startswith("Qwen2-7B-Instruct in NF4"))
    figure, _ = planned(entry)
    assert abs(figure - 5.5) / 5.5 < 0.05, figure


def test_the_report_puts_the_plan_beside_the_gpu_measurement():
    from harness.reporting.tables import PLANNED, PLANNED_RATIO, planned_memory

    plan = {"planned_peak_mb": 1524.0, "cuda_context_mb": 512.0}
    gpu = planned_memory({"memory_plan": plan, "peak_memory_mb": 1100.0, "peak_memory_kind": "cuda_reserved"})
    assert gpu[PLANNED] == 1012.0 and gpu[PLANNED_RATIO] == pytest.approx(1100 / 1012)
    cpu = planned_memory({"memory_plan": {"planned_peak_mb": 900.0, "cuda_context_mb": 0}, "peak_memory_mb": 2000.0,
                          "peak_memory_kind": "cpu_rss"})
    assert cpu[PLANNED] == 900.0 and cpu[PLANNED_RATIO] is None  # RSS is not what the plan plans
    assert planned_memory({})[PLANNED] is None  # runs from before the plan: blank, not 0
