"""The 100-best-Alpaca recipe end to end on offline models: select, curriculum-train, decode over a
grid, judge with a local model, report; a rerun reuses every stage and every judgment."""
from __future__ import annotations

import json
import math

import pytest

from harness.run.command_line import parse_args
from harness.run.flow import load_recipe

alpaca100 = load_recipe("llama2_7b_lora_alpaca100")

pytestmark = pytest.mark.usefixtures("one_torch_thread")
NAME = "llama2_7b_lora_alpaca100"


def test_defaults_are_the_guides_settings():
    from harness.alpaca100.pipeline import EXTRA_ARGUMENTS

    cfg = parse_args({**alpaca100.DEFAULTS, "recipe": NAME}, [], extra_classes=EXTRA_ARGUMENTS)
    assert cfg.model.model == "meta-llama/Llama-2-7b-hf"
    assert (cfg.method.method, cfg.method.r, cfg.method.lora_alpha, cfg.method.lora_dropout) == ("lora", 8, 32, 0.05)
    assert cfg.method.target_modules == "attention"
    assert cfg.train.learning_rate == 2e-4 and cfg.train.num_train_epochs == 3
    assert (cfg.train.per_device_train_batch_size, cfg.train.gradient_accumulation_steps) == (1, 4)
    selection, curriculum, decoding, judge = cfg.extras
    assert selection.select_k == 100 and curriculum.curriculum is False
    assert (decoding.temperatures, decoding.top_ps) == ("0.7,1.0,1.3", "0.8,0.9,0.95")
    assert (judge.judge_backend, judge.judge_model, judge.judge_api_key_env) == ("openai", "gpt-4o-mini", "OPENAI_API_KEY")
    # The recipe's own settings are in its config record, and the CLI overrides them like any other.
    assert cfg.to_dict()["select_k"] == 100
    cfg = parse_args({**alpaca100.DEFAULTS, "recipe": NAME}, ["--select_k", "7", "--start-stage", "medium"],
                     extra_classes=EXTRA_ARGUMENTS)
    assert cfg.extras[0].select_k == 7 and cfg.extras[1].start_stage == "medium"


def test_a_missing_api_key_is_refused_before_anything_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(SystemExit) as stop:
        alpaca100.run_select_train_judge(NAME, alpaca100.DEFAULTS, ["--output_dir", str(tmp_path / "run")])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "OPENAI_API_KEY" in err and "\n" not in err
    assert not (tmp_path / "run").exists()


def pool(path):
    """5 easy, 5 medium and 5 hard records (by answer length), distinct prompts."""
    words = "the cat sat on a warm mat and looked at the sun".split()
    records = []
    for bucket, length in (("easy", 12), ("medium", 70), ("hard", 140)):
        for i in range(5):
            answer = " ".join(words[(i + j) % len(words)] for j in range(length + i))
            records.append({"instruction": f"Write a {bucket} story number {i}.", "input": "", "output": answer})
    path.write_text(json.dumps(records))
    return path


def test_recipe_end_to_end_with_a_local_judge_and_a_free_rerun(tmp_path):
    out = tmp_path / "run"
    argv = [
        "--model", "tiny-llama", "--quantization", "none", "--output_dir", str(out),
        "--data_file", str(pool(tmp_path / "pool.json")), "--validation_split", "0.2", "--select_k", "12",
        "--curriculum", "--max_steps", "2", "--max_seq_length", "128", "--logging_steps", "1",
        "--optim", "adamw_torch", "--gradient_accumulation_steps", "1", "--activation_checkpointing", "false",
        "--disable_tqdm", "true",
        "--max_test_prompts", "3", "--max_new_tokens", "8", "--eval_max_samples", "2",
        "--temperatures", "0.7,1.3", "--top_ps", "0.9",
        "--judge_backend", "local", "--judge_model", "tiny-llama",
    ]
    record = alpaca100.run_select_train_judge(NAME, alpaca100.DEFAULTS, argv)
    assert record["status"] == "ok"
    assert json.loads((out / "result.json").read_text())["status"] == "ok"

    # Selection: 3 of 15 held out first, the other 12 all chosen; the plot and scores are there.
    assert record["selection"]["pool"] == 12 and record["selection"]["held_out"] == 3
    assert sum(record["selection"]["buckets"].values()) == 12
    assert (out / "selection" / "selection.png").stat().st_size > 1000

    # Curriculum: one stage per non-empty bucket, each trained from the one before, eval loss on held-out.
    stages = record["stages"]
    expected = [f"stage{i}_{b}" for i, b in enumerate(("easy", "medium", "hard"), 1) if record["selection"]["buckets"][b]]
    assert [s["stage"] for s in stages] == expected and len(expected) >= 2
    assert [s["records"] for s in stages] == sorted(s["records"] for s in stages)
    assert stages[-1]["records"] == 12
    assert stages[0]["init_adapter"] is None
    assert [s["init_adapter"] for s in stages[1:]] == [str(out / s["stage"]) for s in stages[:-1]]
    for stage in stages:
        assert stage["status"] == "ok" and stage["global_step"] == 2 and math.isfinite(stage["eval_loss"])
        assert (out / stage["stage"] / "adapter_model.safetensors").is_file()

    # Decoding grid: 2 settings x 3 test prompts, every answer judged on every dimension.
    answers = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(answers) == 6 and {(a["temperature"], a["top_p"]) for a in answers} == {(0.7, 0.9), (1.3, 0.9)}
    assert all(a["status"] == "ok" and len(a["scores"]) == 4 for a in answers)
    assert {a["skill"] for a in answers} and all(a["band"] != "unknown" for a in answers)
    grid = record["decoding_grid"]
    assert len(grid) == 2 and all(1 <= g["judge_mean"] <= 5 and 0 <= g["heldout_rouge_l"] <= 1 for g in grid)
    assert record["best_setting"]["judge_mean"] == max(g["judge_mean"] for g in grid)
    heldout = (out / "heldout_generations.jsonl").read_text().splitlines()
    assert len(heldout) == 2 * 2

    report = (out / "report.md").read_text()
    for expected_text in ("tiny-llama", "local:tiny-llama:digit-probabilities", "say nothing about answer quality",
                          "random-weight model", "Per skill", "Per difficulty band", "guide: strong model",
                          "evenly spaced subset"):
        assert expected_text in report, expected_text

    # Rerun: every stage reused (not retrained), every judgment from the cache.
    stage_results = {s["stage"]: (out / s["stage"] / "result.json").read_bytes() for s in stages}
    judged_lines = (out / "judgments.jsonl").read_text().count("\n")
    again = alpaca100.run_select_train_judge(NAME, alpaca100.DEFAULTS, argv)
    assert again["judge"]["cache_hits"] == 6
    assert (out / "judgments.jsonl").read_text().count("\n") == judged_lines
    assert {s["stage"]: (out / s["stage"] / "result.json").read_bytes() for s in stages} == stage_results
    assert again["decoding_grid"] == grid
