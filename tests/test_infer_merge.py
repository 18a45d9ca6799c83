"""`python -m harness.infer` and `python -m harness.merge` on an adapter a recipe really trained
(stories260k, a real tiny Llama): text comes out, chat keeps its history and exits cleanly, the
merged model reproduces the adapter model, and unmergeable adapters are refused before any write."""
from __future__ import annotations

import builtins
import json
import shutil

import pytest
import torch

from harness import infer, merge
from harness.run.flow import load_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one CPU thread (conftest.py)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A LoRA adapter from the Llama-2 recipe, trained two steps on stories260k (Alpaca layout)."""
    recipe = load_recipe("llama2_7b_lora")
    out = tmp_path_factory.mktemp("adapter") / "run"
    recipe.run_recipe("llama2_7b_lora", recipe.DEFAULTS, [
        "--model", "stories260k", "--quantization", "none", "--output_dir", str(out),
        "--max_steps", "2", "--max_samples", "12", "--max_seq_length", "256", "--learning_rate", "1e-2",
        "--gradient_accumulation_steps", "1", "--activation_checkpointing", "false",
        "--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end", "false",
        "--disable_tqdm", "true",
    ])
    return out


def one_line_error(capsys, main, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    # Loading progress bars may come first when the error needs the model loaded.
    messages = [line for line in err.splitlines() if line.startswith(("infer:", "merge:"))]
    assert len(messages) == 1, err
    return messages[0]


# ---------------------------------------------------------------------------- infer

def test_infer_generates_text_from_a_saved_adapter(trained, capsys):
    # No --base: the run's result.json says stories260k; greedy, so the reply is repeatable.
    prompt = ["--prompt", "Tell me a story about a cat.", "--max_new_tokens", "8", "--temperature", "0"]
    argv = ["--adapter", str(trained), *prompt]
    assert infer.main(argv) == 0
    first = capsys.readouterr().out.strip()
    assert len(first) > 0
    infer.main(argv)
    assert capsys.readouterr().out.strip() == first
    # The adapter is used: the base model alone, the prompt laid out the same way, answers otherwise.
    assert infer.main(["--base", "stories260k", "--prompt_format", "alpaca", *prompt]) == 0
    without = capsys.readouterr().out.strip()
    assert len(without) > 0 and without != first, (first, without)


def test_prompts_are_laid_out_as_in_training(trained):
    from harness.data.examples import build_examples, generation_prompt
    from harness.models.adapters import open_adapter
    from harness.models.loading import load_tokenizer
    from harness.run.config import ModelArguments

    data_args = open_adapter(trained).data_arguments()
    assert (data_args.task, data_args.prompt_format) == ("instruction", "alpaca")
    tokenizer = load_tokenizer(ModelArguments(model="stories260k"))
    trained_layout = build_examples([{"instruction": "Name a colour.", "output": "Red."}], data_args, tokenizer)[0]
    assert generation_prompt([{"role": "user", "content": "Name a colour."}], data_args, tokenizer) == trained_layout.prompt


def test_chat_keeps_history_resets_and_exits_on_eof(trained, monkeypatch, capsys):
    import harness.data.examples

    typed = iter(["Hello", "Tell me more", "/reset", "", "Again"])

    def fake_input(prompt=""):
        try:
            return next(typed)
        except StopIteration:
            raise EOFError from None

    seen = []
    real = harness.data.examples.generation_prompt

    def spy(messages, *args):
        seen.append([m["role"] for m in messages])
        return real(messages, *args)

    monkeypatch.setattr(builtins, "input", fake_input)
    monkeypatch.setattr(harness.data.examples, "generation_prompt", spy)
    assert infer.main(["--adapter", str(trained), "--chat", "--max_new_tokens", "4", "--seed", "0"]) == 0
    assert seen == [["user"], ["user", "assistant", "user"], ["user"]]
    assert capsys.readouterr().out.count("model> ") == 3


def test_chat_exits_cleanly_on_ctrl_c(trained, monkeypatch, capsys):
    def interrupted(prompt=""):
        raise KeyboardInterrupt

    monkeypatch.setattr(builtins, "input", interrupted)
    capsys.readouterr()
    assert infer.main(["--adapter", str(trained), "--chat"]) == 0
    out, err = capsys.readouterr()
    # Nothing on stderr but the model's loading bar: no traceback, no "interrupted" line, no warning.
    assert [line for line in err.splitlines() if line.strip() and not line.startswith("Loading weights")] == [], err
    assert out.startswith("Chat: ") and out.endswith("\n")  # the shell's prompt comes back on a line of its own


def test_infer_bad_input_is_one_line(trained, tmp_path, capsys):
    error = one_line_error(capsys, infer.main, ["--adapter", str(tmp_path / "nowhere"), "--prompt", "hi"])
    assert error == f"infer: adapter folder {tmp_path / 'nowhere'} not found; pass --adapter with the output_dir of a finished run"
    error = one_line_error(capsys, infer.main, ["--adapter", str(trained), "--prompt", "hi", "--top_p", "1.5"])
    assert "--top_p must be in (0, 1]" in error
    error = one_line_error(capsys, infer.main, ["--adapter", str(trained), "--base", "tiny-qwen2", "--prompt", "hi"])
    assert "does not fit base model tiny-qwen2" in error and "(stories260k)" in error


# ---------------------------------------------------------------------------- merge

def test_merged_model_reproduces_the_adapter_model(trained, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from harness.models.offline import resolve_offline_model

    out = tmp_path / "merged"
    assert merge.main(["--adapter", str(trained), "--out", str(out)]) == 0
    assert "Logits check passed" in capsys.readouterr().out
    assert {"model.safetensors", "config.json", "tokenizer_config.json", "merge_info.json"} <= {p.name for p in out.iterdir()}
    info = json.loads((out / "merge_info.json").read_text())
    assert info["logits_check"]["passed"] and info["peft_type"] == "LORA" and not info["dequantized"]

    # Checked independently of merge.py: the merged weights carry the adapter's (non-zero) update.
    ids = torch.tensor([[1, 403, 280, 63, 265, 345, 58, 11]])
    base = AutoModelForCausalLM.from_pretrained(resolve_offline_model("stories260k"))
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        with_adapter = PeftModel.from_pretrained(base, str(trained)).eval()(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(out)(input_ids=ids).logits
    assert not torch.allclose(plain, with_adapter, atol=1e-3), "the adapter should change the model"
    assert torch.allclose(merged, with_adapter, atol=1e-4)


def test_prompt_learning_adapters_are_refused(tmp_path, capsys):
    from peft import PromptTuningConfig, get_peft_model

    from harness.models.loading import load_model
    from harness.run.config import ModelArguments

    adapter = tmp_path / "prompt_tuning"
    model = load_model(ModelArguments(model="stories260k"), "prompt_tuning", False)
    get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).save_pretrained(adapter)
    error = one_line_error(capsys, merge.main, ["--base", "stories260k", "--adapter", str(adapter), "--out", str(tmp_path / "m")])
    assert "a PROMPT_TUNING adapter cannot be merged: it adds virtual tokens" in error
    assert not (tmp_path / "m").exists()


def test_adapter_trained_on_4bit_needs_dequantize(trained, tmp_path, capsys):
    adapter = tmp_path / "qlora"
    shutil.copytree(trained, adapter, ignore=shutil.ignore_patterns("checkpoint-*"))
    record = json.loads((adapter / "result.json").read_text())
    record["quantization"] = "4bit"
    (adapter / "result.json").write_text(json.dumps(record))
    out = tmp_path / "merged"

    error = one_line_error(capsys, merge.main, ["--adapter", str(adapter), "--out", str(out)])
    assert "trained on a 4bit base" in error and "--dequantize" in error
    assert not out.exists()
    assert merge.main(["--adapter", str(adapter), "--out", str(out), "--dequantize"]) == 0
    assert json.loads((out / "merge_info.json").read_text())["dequantized"] is True


def test_failed_check_or_occupied_out_writes_nothing(trained, tmp_path, capsys, monkeypatch):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    error = one_line_error(capsys, merge.main, ["--adapter", str(trained), "--out", str(occupied)])
    assert "already exists and is not an empty folder" in error
    assert [p.name for p in occupied.iterdir()] == ["keep.txt"]

    calls = []
    real = merge._probe_logits

    def drifting(model, tokenizer):  # the second probe (the saved model) comes back different
        logits = real(model, tokenizer)
        calls.append(1)
        return logits + (1.0 if len(calls) == 2 else 0.0)

    monkeypatch.setattr(merge, "_probe_logits", drifting)
    out = tmp_path / "merged"
    error = one_line_error(capsys, merge.main, ["--adapter", str(trained), "--out", str(out)])
    assert error.startswith("merge: merge check failed") and f"nothing was written to {out}" in error
    assert not out.exists() and list(tmp_path.glob(".merged.*")) == []
