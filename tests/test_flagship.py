"""The flagship recipe end to end on offline models: AdaLoRA really reallocates, the adapter
reloads to the same logits, result.json holds real values, a rerun resumes."""
from __future__ import annotations

import json
import math

import pytest
import torch

from harness.run.flow import load_recipe

flagship = load_recipe("qwen2_7b_adalora")


def run(argv):
    return flagship.run_recipe("qwen2_7b_adalora", flagship.DEFAULTS, argv)


@pytest.fixture
def keep_trainer(monkeypatch):
    """Capture the Trainer the recipe builds, to compare the in-memory model with what was saved."""
    from harness.objectives import sft

    kept = {}
    original = sft.build_trainer

    def capture(*args, **kwargs):
        kept["trainer"] = original(*args, **kwargs)
        return kept["trainer"]

    monkeypatch.setattr(sft, "build_trainer", capture)
    return kept


def reload_adapter(output_dir, quantization: str):
    from peft import PeftModel

    from harness.models.loading import load_model
    from harness.run.config import ModelArguments

    base = load_model(ModelArguments(model="tiny-qwen2", quantization=quantization), "adalora", False)
    return PeftModel.from_pretrained(base, output_dir).eval()


@pytest.mark.parametrize("quantization", ["4bit", "none"])
def test_flagship_trains_reallocates_and_reloads(quantization, recipe_argv, tmp_path, keep_trainer):
    out = tmp_path / "run"
    record = run(recipe_argv("--quantization", quantization, "--load_best_model_at_end", "false"))

    # Every optimizer step AdaLoRA planned for really happened, and the budget shrank to target.
    assert record["status"] == "ok"
    assert record["global_step"] == record["planned_steps"] == record["adalora"]["schedule"]["total_step"]
    adalora = record["adalora"]
    assert adalora["modules"] == 14  # 7 projections x 2 layers of tiny-qwen2
    assert adalora["initial_budget"] == 12 * 14
    assert adalora["total_rank"] == adalora["target_budget"] == 4 * 14
    assert len(set(adalora["ranks"].values())) > 1, "ranks should differ between modules"
    assert json.loads((out / "adalora_ranks.json").read_text())["total_rank"] == 4 * 14

    # The saved adapter is the trained model: same logits after a reload from disk.
    trained = keep_trainer["trainer"].model.eval()
    ids = torch.tensor([[5, 17, 300, 42, 7, 99, 1000, 3]])
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
        reloaded = reload_adapter(out, quantization)
        actual = reloaded(input_ids=ids).logits
    assert torch.allclose(expected, actual, atol=1e-5), (expected - actual).abs().max()
    assert sum(reloaded.peft_config["default"].rank_pattern[k].count(True)
               for k in reloaded.peft_config["default"].rank_pattern) == 4 * 14


def test_result_json_holds_real_values(recipe_argv, tmp_path):
    record = run(recipe_argv())
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert saved["status"] == "ok"
    assert saved["recipe"] == "qwen2_7b_adalora" and saved["method"] == "adalora"
    assert saved["model"] == "tiny-qwen2" and saved["quantization"] == "4bit"
    assert saved["model_weights"].startswith("Random-weight")  # an offline model's record says what its weights are
    assert saved["device"].startswith("cpu")
    assert saved["peak_memory_kind"] == "cpu_rss" and saved["peak_memory_mb"] > 100  # torch alone is ~200 MB
    assert "cuda_reserved_mb" not in saved  # not measured here, so absent rather than 0
    assert 0 < saved["train_seconds"] < saved["total_seconds"]
    assert saved["tokens_trained"] > 0
    assert saved["tokens_per_second"] == pytest.approx(saved["tokens_trained"] / saved["train_seconds"], rel=0.01)
    assert 0 < saved["trainable_params"] < saved["total_params"]
    assert saved["adapter_bytes"] == (tmp_path / "run" / "adapter_model.safetensors").stat().st_size
    for loss in ("train_loss", "eval_loss"):
        assert math.isfinite(saved[loss]) and saved[loss] > 0
    assert 0 <= saved["eval"]["accuracy"] <= 1 and 0 <= saved["eval"]["macro_f1"] <= 1
    assert 0 <= saved["eval"]["answer_token_accuracy"] <= 1
    assert saved["eval"]["examples"] == 4  # 10% of 40 rows
    assert saved["seed"] == 42
    assert {"torch", "transformers", "peft", "bitsandbytes"} <= saved["versions"].keys()
    assert "commit" in saved["git"]
    assert "--model tiny-qwen2" in saved["command"]
    assert saved["config"]["learning_rate"] == 1e-4 and saved["config"]["init_r"] == 12
    assert saved["data"]["data_sha256"] and saved["data"]["train_examples"] == 36
    assert record["eval_loss"] == saved["eval_loss"]
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json"):
        assert (tmp_path / "run" / name).is_file()


def test_best_checkpoint_from_before_the_final_allocation_is_restored(recipe_argv, tmp_path):
    # greater_is_better on eval_loss makes the earliest (unpruned) checkpoint "best": restoring it into
    # the pruned model that finished training is what the Trainer's own loading gets wrong for AdaLoRA.
    record = run(recipe_argv("--max_steps", "8", "--eval_steps", "2", "--save_steps", "2",
                             "--learning_rate", "1e-2", "--greater_is_better", "true", "--save_total_limit", "10"))
    evals = [h for h in record["log_history"] if "eval_loss" in h]
    assert record["best_checkpoint"].endswith("checkpoint-2")
    assert record["eval_loss"] == pytest.approx(evals[0]["eval_loss"], rel=1e-5)
    assert record["adalora"]["total_rank"] == record["adalora"]["initial_budget"]  # step 2 was before pruning


def test_rerun_resumes_from_the_last_checkpoint(recipe_argv, tmp_path):
    out = tmp_path / "run"
    argv = recipe_argv("--max_steps", "8", "--eval_steps", "4", "--save_steps", "4", "--save_total_limit", "5")
    first = run(argv)
    assert first["resumed_from"] is None
    # Stop it as an interrupted run stops: no checkpoint-8, a record saying so. The rerun picks up at step 4.
    import shutil

    shutil.rmtree(out / "checkpoint-8")
    (out / "result.json").write_text(json.dumps({**first, "status": "interrupted"}))
    second = run(argv)
    assert second["resumed_from"].endswith("checkpoint-4")
    assert second["global_step"] == 8
    # Optimizer, RNG and AdaLoRA's importance scores come back too: the run ends as if never interrupted.
    assert second["adalora"]["ranks"] == first["adalora"]["ranks"]
    assert second["eval_loss"] == pytest.approx(first["eval_loss"], rel=1e-4)
    assert second["tokens_trained"] < first["tokens_trained"]  # only steps 5-8 ran this time


def test_orth_penalty_counts_once_per_optimizer_step(tmp_path):
    """With gradient accumulation the Trainer sums micro-batch losses normalised over the whole batch;
    AdaLoRA's per-forward penalty must then be scaled so it is counted once per optimizer step."""
    from peft import get_peft_model

    from harness.data import reading as data_mod
    from harness.data.encoding import prepare
    from harness.models.loading import load_model, load_tokenizer
    from harness.models.methods import adalora_schedule, peft_config
    from harness.objectives.sft_trainer import build_trainer, orth_penalty_scaled
    from harness.run.command_line import parse_args

    cfg = parse_args(flagship.DEFAULTS, ["--model", "tiny-qwen2", "--quantization", "none", "--lora_dropout", "0",
                                         "--max_samples", "12", "--max_seq_length", "64",
                                         "--output_dir", str(tmp_path), "--gradient_accumulation_steps", "4",
                                         "--eval_strategy", "no", "--load_best_model_at_end", "false"])
    tokenizer = load_tokenizer(cfg.model)
    rows = data_mod.load_records(cfg.data).rows
    prepared = prepare(rows, [], cfg.data, tokenizer)
    model = load_model(cfg.model, "adalora", False)
    model = get_peft_model(model, peft_config(cfg.method, model, adalora_schedule(cfg.method, 10)))
    trainer = build_trainer(model, tokenizer, cfg.train, prepared)
    batch = trainer.data_collator([prepared.train[i] for i in range(2)])
    items = int((batch["labels"][:, 1:] != -100).sum())
    model.train()
    trainer.current_gradient_accumulation_steps = 4
    with torch.no_grad():
        in_training = trainer.compute_loss(model, batch, num_items_in_batch=items)
        with orth_penalty_scaled(model, 0.0):
            language_model_only = trainer.compute_loss(model, batch, num_items_in_batch=items)
        full_penalty = model(**batch).loss - model.base_model.model(**batch).loss
    assert full_penalty > 0.1  # the penalty is really there (A A^T far from I at init)
    assert (in_training - language_model_only).item() == pytest.approx(full_penalty.item() / 4, rel=1e-4)


def test_summary_renders_the_record_it_is_given(recipe_argv, tmp_path):
    from harness.reporting import summary

    run(recipe_argv("--max_steps", "4", "--load_best_model_at_end", "false"))
    out = tmp_path / "summary.md"
    summary.main([str(tmp_path / "run" / "result.json"), "--out", str(out)])
    text = out.read_text()
    record = json.loads((tmp_path / "run" / "result.json").read_text())
    assert record["command"] in text
    assert f"{record['trainable_params']:,}" in text
    assert "peak CPU resident memory of the process (MB)" in text
    # The rank pivot: one row per layer, its totals add up to the recorded budget.
    pivot = text.split("## AdaLoRA rank allocation", 1)[1].split("##", 1)[0]
    totals = [int(line.rsplit("|", 2)[-2]) for line in pivot.splitlines()
              if line.startswith("|") and line.split("|")[1].strip().isdigit()]
    assert len(totals) == 2  # tiny-qwen2's two layers
    assert sum(totals) == record["adalora"]["total_rank"]


def test_eval_on_start_scores_the_untrained_model_as_the_runs_baseline(recipe_argv, tmp_path, capsys):
    from harness.reporting import summary

    run(recipe_argv("--max_steps", "4", "--eval_on_start", "true", "--load_best_model_at_end", "false"))
    record = json.loads((tmp_path / "run" / "result.json").read_text())
    before = record["before_training"]
    step0 = [e for e in record["log_history"] if e.get("step") == 0 and "eval_loss" in e]
    assert before["eval_loss"] == step0[0]["eval_loss"]  # the step-0 evaluation, before any update
    assert 0 <= before["eval_accuracy"] <= 1 and before["eval_accuracy_se"] >= 0
    assert before["eval_loss"] != record["eval_loss"]  # four steps moved the held-out loss
    printed = capsys.readouterr().out
    assert (f"Held-out accuracy on 4 examples: {before['eval_accuracy']:.3f} untrained -> "
            f"{record['eval']['accuracy']:.3f} after 4 steps") in printed
    out = tmp_path / "summary.md"
    summary.main([str(tmp_path / "run" / "result.json"), "--out", str(out)])
    evaluations = out.read_text().split("## Evaluations", 1)[1].splitlines()
    first_row = next(line for line in evaluations if line.startswith("| ") and "step" not in line)
    assert first_row.startswith("| 0 (untrained: the baseline)")


def test_a_run_without_eval_on_start_has_no_before_training(recipe_argv, tmp_path):
    run(recipe_argv("--max_steps", "2", "--load_best_model_at_end", "false"))
    assert json.loads((tmp_path / "run" / "result.json").read_text())["before_training"] is None
