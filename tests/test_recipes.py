"""Every recipe in recipes/ runs end to end on the tiny offline model of its architecture (a few
optimizer steps, a final evaluation, weights saved, the flagship's result.json), the Qwen2.5 config
files reproduce their recipes, and GPU-only paths stop with one clear line where there is no GPU."""
from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from harness.locations import RECIPES_DIR
from harness.run.command_line import parse_args
from harness.run.config import DataArguments, ModelArguments
from harness.run.flow import load_recipe

RECIPES = sorted(p.stem for p in (RECIPES_DIR).glob("*.py"))
# Tested in their own files: the flagship (test_flagship.py), the select-train-judge pipeline, and the DPO and
# GRPO recipes (test_objectives.py: their records hold other scores, and GRPO's run needs its reward functions).
OWN_TESTS = {"qwen2_7b_adalora", "llama2_7b_lora_alpaca100", "qwen2_5_0_5b_dpo", "qwen2_5_0_5b_grpo"}
OFFLINE_MODEL = {"qwen2": "tiny-qwen2", "opt": "tiny-opt", "llama2": "tiny-llama"}  # by name prefix
GPU_ONLY = {"llama2_7b_loftq"}  # PEFT computes LoftQ on CUDA
CONFIGS = RECIPES_DIR / "configs"

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one CPU thread (conftest.py)

# What the flagship's result.json holds, for every recipe.
RESULT_KEYS = {
    "status", "recipe", "method", "backend", "model", "quantization", "device", "peak_memory_mb",
    "peak_memory_kind", "train_seconds", "total_seconds", "tokens_per_second", "trainable_params",
    "total_params", "train_loss", "eval_loss", "eval", "seed", "versions", "git", "command", "config",
}


def offline_model(name: str) -> str:
    return next(model for prefix, model in OFFLINE_MODEL.items() if name.startswith(prefix))


def fast_argv(name: str, out) -> list[str]:
    return [
        "--model", offline_model(name), "--output_dir", str(out),
        "--max_steps", "2", "--max_samples", "24",
        # Reviews are cut to fit; instructions (and the 512-token vocabulary of tiny-llama) need more room.
        "--max_seq_length", "128" if load_recipe(name).DEFAULTS["task"] == "classification" else "256",
        "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
        "--activation_checkpointing", "false",  # recomputation only costs time on a tiny model
        # No checkpoints and no mid-run evaluation: the final evaluation still runs.
        "--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end", "false",
        "--disable_tqdm", "true",
    ]


def unsloth_usable() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("unsloth") is not None


def test_every_recipe_of_the_issue_exists():
    expected = {
        "qwen2_5_0_5b_full", "qwen2_5_0_5b_lora", "qwen2_5_0_5b_qlora", "qwen2_5_0_5b_qlora_8bit", "qwen2_7b_qlora",
        "opt_350m_lora", "opt_350m_p_tuning", "opt_350m_prefix_tuning", "opt_350m_prompt_tuning", "opt_350m_ia3",
        "llama2_7b_lora", "llama2_7b_dora", "llama2_7b_rslora", "llama2_7b_loftq", "llama2_7b_unsloth",
    }
    assert expected <= set(RECIPES)


@pytest.fixture
def initial_weights(monkeypatch) -> dict:
    """The weights a run saves (the adapter's, or the whole model's), as they were when its trainer was built:
    after the adapter's initialisation (LoftQ's, an --init_adapter's), before the first step."""
    from peft import PeftModel, get_peft_model_state_dict

    from harness.objectives import sft

    snapshot: dict[str, torch.Tensor] = {}
    real = sft.build_trainer

    def snapshotting(model, *args, **kwargs):
        weights = get_peft_model_state_dict(model) if isinstance(model, PeftModel) else model.state_dict()
        snapshot.update({name: tensor.detach().float().cpu().clone() for name, tensor in weights.items()})
        return real(model, *args, **kwargs)

    monkeypatch.setattr(sft, "build_trainer", snapshotting)
    return snapshot


def assert_training_changed_the_saved_weights(out, initial: dict, method: str) -> None:
    """The saved weights are trained ones: compared with the same tensors before the first step."""
    from safetensors.torch import load_file

    saved = load_file(str(out / ("model.safetensors" if method == "full" else "adapter_model.safetensors")))
    common = sorted(saved.keys() & initial.keys())
    assert common and len(common) >= len(saved) - 1, (sorted(saved)[:5], sorted(initial)[:5])  # (a tied head aside)
    changed = {name for name in common if not torch.equal(saved[name].float(), initial[name])}
    if method in PROMPT_METHODS:
        core = {"prompt_embeddings"}  # the virtual tokens' embeddings (P-tuning: its encoder's output)
    elif method == "ia3":
        core = {name for name in common if "ia3_l" in name}  # every learned scale vector, all ones at the start
    elif method == "full":
        core = {name for name in common if ".layers." in name}  # every weight of every layer
    else:  # the LoRA family: B starts at zero (LoftQ: at the quantization error) and moves on every step
        core = {name for name in common if "lora_B" in name}
        assert all(float(saved[name].abs().sum()) > 0 for name in core)
    assert core and core <= changed, sorted(core - changed)[:5]


PROMPT_METHODS = ("prompt_tuning", "prefix_tuning", "p_tuning")


@pytest.mark.parametrize("name", [r for r in RECIPES if r not in OWN_TESTS])
def test_recipe_runs_on_its_offline_model(name, tmp_path, capsys, initial_weights):
    if name in GPU_ONLY and not torch.cuda.is_available():
        pytest.skip("PEFT computes LoftQ on a CUDA GPU (the refusal is tested in test_methods.py)")
    recipe = load_recipe(name)
    out = tmp_path / "run"
    argv = fast_argv(name, out)
    backend = recipe.DEFAULTS.get("backend", "peft")
    if backend == "unsloth" and not unsloth_usable():
        argv += ["--backend", "peft"]
        backend = "peft"
    record = recipe.run_recipe(name, recipe.DEFAULTS, argv)
    printed = capsys.readouterr().out

    assert record["status"] == "ok" and record["global_step"] == 2
    saved = json.loads((out / "result.json").read_text())
    assert RESULT_KEYS <= saved.keys()
    assert saved["recipe"] == name and saved["method"] == recipe.DEFAULTS["method"]
    assert saved["backend"] == backend
    assert saved["quantization"] == recipe.DEFAULTS.get("quantization", "none")
    assert f"Trainable parameters: {saved['trainable_params']:,} of {saved['total_params']:,}" in printed
    # The memory plan was made before loading, from the architecture alone, and it counted the same adapter.
    assert "Memory plan: planned peak" in printed and saved["memory_plan"]["status"] == "planned"
    assert saved["memory_plan"]["trainable_params"] == saved["trainable_params"]
    assert math.isfinite(saved["train_loss"]) and math.isfinite(saved["eval_loss"])
    assert 0 <= saved["eval"]["answer_token_accuracy"] <= 1
    if recipe.DEFAULTS["task"] == "classification":
        assert 0 <= saved["eval"]["accuracy"] <= 1  # label-likelihood scoring ran
    if saved["method"] == "full":
        assert saved["trainable_params"] == saved["total_params"]
        assert saved["model_bytes"] == (out / "model.safetensors").stat().st_size
        assert "adapter_bytes" not in saved  # there is no adapter: no figure rather than a wrong one
    else:
        assert 0 < saved["trainable_params"] < saved["total_params"]
        assert saved["adapter_bytes"] == (out / "adapter_model.safetensors").stat().st_size
    assert_training_changed_the_saved_weights(out, initial_weights, saved["method"])


def test_qwen2_5_recipe_trains_on_a_chat_messages_jsonl(tmp_path):
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": f"What is {i} plus {i}?"},
        {"role": "assistant", "content": f"{2 * i}."},
    ]}) + "\n" for i in range(12)), encoding="utf-8")
    recipe = load_recipe("qwen2_5_0_5b_lora")
    record = recipe.run_recipe("qwen2_5_0_5b_lora", recipe.DEFAULTS,
                               fast_argv("qwen2_5_0_5b_lora", tmp_path / "run") + ["--data_file", str(chats)])
    assert record["status"] == "ok" and record["data"]["train_examples"] == 10
    # Loss on the assistant's answer alone: "{2i}." and the chat template's end-of-turn tokens.
    assert record["data"]["train_answer_tokens_per_epoch"] < record["data"]["train_tokens_per_epoch"] / 4


@pytest.mark.parametrize("name", [r for r in RECIPES if r not in OWN_TESTS])
def test_recipe_docstring_gives_its_commands(name):
    doc = load_recipe(name).__doc__
    assert f"python recipes/{name}.py" in doc and "Run it" in doc


# ---------------------------------------------------------------------------- config files

QWEN2_5 = ("full", "lora", "qlora", "qlora_8bit")


def settings(recipe_name: str, argv: list[str]) -> dict:
    recipe = load_recipe(recipe_name)
    return parse_args({**recipe.DEFAULTS, "recipe": recipe_name}, argv).to_dict()


@pytest.mark.parametrize("kind", QWEN2_5)
def test_config_file_holds_exactly_its_recipe(kind):
    name = f"qwen2_5_0_5b_{kind}"
    config = CONFIGS / f"train_config_{kind}.yaml"
    assert settings(name, ["--config", str(config)]) == settings(name, [])


def test_config_file_selects_the_method_in_any_qwen2_5_recipe():
    chosen = settings("qwen2_5_0_5b_full", ["--config", str(CONFIGS / "train_config_qlora_8bit.yaml")])
    assert (chosen["recipe"], chosen["method"], chosen["quantization"]) == ("qwen2_5_0_5b_qlora_8bit", "lora", "8bit")
    assert (chosen["r"], chosen["lora_alpha"], chosen["learning_rate"]) == (64, 16, 2e-4)


def test_command_line_overrides_the_config_file():
    chosen = settings("qwen2_5_0_5b_lora", ["--config", str(CONFIGS / "train_config_lora.yaml"),
                                           "--r", "8", "--learning_rate", "3e-4"])
    assert (chosen["r"], chosen["learning_rate"]) == (8, 3e-4)
    assert (chosen["lora_alpha"], chosen["lora_dropout"], chosen["target_modules"]) == (16, 0.1, "all7")


# ---------------------------------------------------------------------------- Unsloth and GPU-only paths

def one_line_error(capsys, name: str, argv: list[str]) -> str:
    recipe = load_recipe(name)
    with pytest.raises(SystemExit) as exit_info:
        recipe.run_recipe(name, recipe.DEFAULTS, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.fixture
def no_model_loading(monkeypatch):
    from harness.objectives import sft, trl_run

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    for objective in (sft, trl_run):  # where the SFT, DPO and GRPO runs load their model
        monkeypatch.setattr(objective, "load_model", refuse)


@pytest.mark.skipif(unsloth_usable(), reason="unsloth and a GPU are here: the recipe would run")
def test_unsloth_recipe_without_unsloth_names_both_ways_forward(tmp_path, capsys, no_model_loading):
    error = one_line_error(capsys, "llama2_7b_unsloth", fast_argv("llama2_7b_unsloth", tmp_path / "run"))
    assert error.startswith("llama2_7b_unsloth: the unsloth backend cannot run here (")
    assert "pip install -r requirements-unsloth.txt" in error and "--backend peft" in error
    if not torch.cuda.is_available():
        assert "no NVIDIA GPU" in error


def test_unsloth_missing_on_a_gpu_machine_is_named(monkeypatch):
    import harness.models.backends
    from harness.errors import UserError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(harness.models.backends.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"\(the unsloth package is not installed\): .*--backend peft"):
        harness.models.backends.check_backend("unsloth", "lora", "4bit")


@pytest.mark.skipif(torch.cuda.is_available(), reason="LoftQ runs where there is a GPU")
def test_loftq_recipe_without_a_gpu_stops_in_one_line(tmp_path, capsys, no_model_loading):
    error = one_line_error(capsys, "llama2_7b_loftq", fast_argv("llama2_7b_loftq", tmp_path / "run"))
    assert "LoftQ needs an NVIDIA GPU" in error and "--method lora" in error


# ---------------------------------------------------------------------------- prompt layouts

def test_alpaca_layout_for_classification_scores_bare_labels():
    from harness.data.examples import build_examples

    tokenizer = load_tokenizer("tiny-opt")
    args = DataArguments(prompt_format="alpaca")
    example = build_examples([{"text": "Great film.", "label": "negative"}], args, tokenizer)[0]
    assert example.prompt.startswith("Below is an instruction that describes a task, paired with an input")
    assert example.prompt.endswith("### Input:\nGreat film.\n\n### Response:\n")
    assert example.answer == "negative" and example.meta["candidates"] == ["positive", "negative"]


def test_auto_layout_uses_the_chat_template_only_where_there_is_one():
    from harness.data.examples import build_examples

    row = [{"instruction": "Say hi.", "input": "", "output": "Hi!"}]
    args = DataArguments(task="instruction", prompt_format="auto")
    qwen = load_tokenizer("tiny-qwen2")
    assert build_examples(row, args, qwen)[0].prompt.endswith("<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n")
    opt = load_tokenizer("tiny-opt")
    opt.chat_template = None  # like facebook/opt-350m itself
    assert build_examples(row, args, opt)[0].prompt.endswith("### Instruction:\nSay hi.\n\n### Response:\n")


def test_a_long_instruction_answer_is_cut_but_a_label_never():
    from harness.data.examples import build_examples, encode
    from harness.errors import UserError

    tokenizer = load_tokenizer("tiny-opt")
    row = {"instruction": "Summarise.", "input": "Some text to summarise.", "output": "word " * 200}
    example = build_examples([row], DataArguments(task="instruction", prompt_format="alpaca"), tokenizer)[0]
    encoded = encode(tokenizer, example, max_len=96)
    assert len(encoded.input_ids) == 96 and encoded.body_cut  # the input went first, then the answer's end
    assert tokenizer.decode(encoded.input_ids[encoded.prompt_len:]).startswith("word word")
    review = build_examples([{"text": "Fine.", "label": "positive"}], DataArguments(prompt_format="alpaca"), tokenizer)[0]
    with pytest.raises(UserError, match="max_seq_length 40 is too short"):
        encode(tokenizer, review, max_len=40)


def load_tokenizer(name: str):
    from harness.models.loading import load_tokenizer as load

    return load(ModelArguments(model=name))


def test_help_is_in_groups_with_the_most_used_settings_first(capsys):
    """--help: model, method, data, training, evaluation, run, each group's most used settings first; every setting
    still parses as before (only the help is laid out)."""
    from harness.run.command_line import HELP_ORDER, HELP_TITLES, parse_args

    with pytest.raises(SystemExit) as done:
        parse_args({"recipe": "t"}, ["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    titles = [HELP_TITLES[kind] + ":" for kind in HELP_ORDER]
    assert [text.index(t) for t in titles] == sorted(text.index(t) for t in titles)  # in this order

    def group(kind: str) -> str:
        start = text.index(HELP_TITLES[kind] + ":")
        later = [text.index(t) for t in titles if text.index(t) > start]
        return text[start:min(later, default=len(text))]

    training = group("training")
    first_flags = [line.split()[0] for line in training.splitlines()[1:] if line.startswith("  --")][:3]
    assert first_flags == ["--learning_rate", "--num_train_epochs", "--max_steps"]
    assert "--eval_steps" in group("evaluation") and "--eval_steps" not in training
    assert "--output_dir" in group("run") and "--eval_file" in group("evaluation") and "--r R" in group("method")
    assert parse_args({"recipe": "t"}, ["--eval_steps", "25", "--output_dir", "x"]).train.eval_steps == 25
