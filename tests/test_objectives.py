"""DPO and GRPO: the preference and GSM8K readers, the GRPO recipe's reward functions, the memory plan of
both objectives, harness.bench planning them, and each recipe end to end on a tiny model."""
from __future__ import annotations

import json

import pytest

from harness.data import gsm8k, preference
from harness.errors import UserError
from harness.run.command_line import parse_args
from harness.run.flow import load_recipe

# ---------------------------------------------------------------------------- preference pairs

def test_llama_factory_pairs_keep_system_and_earlier_turns():
    row = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                             {"from": "gpt", "value": "Hello"}, {"from": "human", "value": "2+2?"}],
           "chosen": {"from": "gpt", "value": "4"}, "rejected": {"from": "gpt", "value": "5"}}
    [pair] = preference.checked_rows([row], "f.json")
    assert [m["role"] for m in pair["prompt"]] == ["system", "user", "assistant", "user"]
    assert pair["prompt"][-1]["content"] == "2+2?"
    assert pair["chosen"] == [{"role": "assistant", "content": "4"}]
    assert pair["rejected"] == [{"role": "assistant", "content": "5"}]


def test_trl_formats_read_as_trl_would():
    text = {"prompt": "Q", "chosen": "good", "rejected": "bad"}
    assert preference.checked_rows([text], "f") == [text]
    chat = {"prompt": [{"role": "user", "content": "Q"}], "chosen": [{"role": "assistant", "content": "good"}],
            "rejected": [{"role": "assistant", "content": "bad"}]}
    assert preference.checked_rows([chat], "f") == [chat]
    implicit = {"chosen": chat["prompt"] + chat["chosen"], "rejected": chat["prompt"] + chat["rejected"]}
    assert preference.checked_rows([implicit], "f") == [chat]  # the shared first turns are the prompt


def test_the_shipped_pairs_all_read():
    from harness.data.reading import read_table

    pairs = preference.checked_rows(read_table("data/dpo_en_demo.json"), "data/dpo_en_demo.json")
    assert len(pairs) == 300 and preference.is_conversational(pairs)
    assert sum(p["prompt"][0]["role"] == "system" for p in pairs) == 80  # as data/SOURCES.md counts them
    assert all(p["prompt"][-1]["role"] == "user" for p in pairs)


@pytest.mark.parametrize("row, message", [
    ({"prompt": "Q", "chosen": "a"}, "row 1 has no rejected"),
    ({"prompt": "Q", "chosen": "a", "rejected": ""}, "the rejected answer is empty"),
    ({"prompt": " ", "chosen": "a", "rejected": "b"}, "the prompt is empty"),
    ({"prompt": "Q", "chosen": ["a"], "rejected": "b"}, "must all be texts or all be lists of messages"),
    ({"conversations": [{"from": "gpt", "value": "hi"}], "chosen": "a", "rejected": "b"}, "must end with a human turn"),
    ({"chosen": "a", "rejected": "b"}, "no prompt or conversations"),
])
def test_unusable_pairs_are_refused_with_their_row(row, message):
    with pytest.raises(UserError, match=message):
        preference.checked_rows([row], "f.json")


# ---------------------------------------------------------------------------- GSM8K and the rewards

def test_reference_answers_and_where_a_completion_gives_its_own():
    assert gsm8k.reference_answer("3 + 4 = <<3+4=7>>7 so\n#### 1,007") == "1007"
    assert gsm8k.reference_answer("no mark here") is None
    assert gsm8k.canonical_number("$18.50") == "18.5" and gsm8k.canonical_number("-3.0") == "-3"
    assert gsm8k.marked_answer("so 5 + 4 = 9\n#### 9.") == "9"
    assert gsm8k.marked_answer("the answer is 9") is None
    assert gsm8k.final_answer("first 12, then 9") == "9"


def test_every_shipped_gsm8k_row_has_a_reference():
    from harness.data.reading import read_table

    for name, rows in (("train", 7473), ("test", 1319)):
        checked = gsm8k.checked_rows(read_table(f"data/gsm8k_{name}.jsonl"), name)
        assert len(checked) == rows and all(row["answer"] for row in checked)


@pytest.mark.parametrize("completion, correct, marked", [
    ("Half of 36 is 18.\n#### 18", 1.0, 1.0),  # right answer, where the prompt asks for it
    ("Half of 36 is 17.\n#### 17", 0.0, 1.0),  # wrong answer, marked
    ("So she has 18 apples left.", 1.0, 0.0),  # right answer in the wrong place: correct, not marked
    ("#### 17, no wait, it is 18", 0.0, 1.0),  # the marked answer counts, not a later number
    ("I cannot solve this.", 0.0, 0.0),  # no answer at all
])
def test_grpo_rewards_on_hand_written_completions(completion, correct, marked):
    recipe = load_recipe("qwen2_5_0_5b_grpo")
    as_chat = [[{"role": "assistant", "content": completion}]]  # TRL passes conversational completions so
    assert recipe.correctness(as_chat, answer=["18"]) == [correct]
    assert recipe.correctness([completion], answer=["18"]) == [correct]  # and text ones so
    assert recipe.answer_format(as_chat) == [marked]


# ---------------------------------------------------------------------------- settings and the memory plan

def _config(recipe: str, *argv: str):
    return parse_args({**load_recipe(recipe).DEFAULTS, "recipe": recipe}, ["--output_dir", "unused", *argv])


def test_trl_settings_parse_with_the_projects_own():
    dpo = _config("qwen2_5_0_5b_dpo", "--beta", "0.25", "--trust_remote_code", "true")
    assert type(dpo.train).__name__ == "DPOSettings" and dpo.train.beta == 0.25
    assert dpo.train.trust_remote_code is True  # one flag for the model and TRL
    grpo = _config("qwen2_5_0_5b_grpo", "--num_generations", "4")
    assert grpo.train.num_generations == 4 and grpo.train.generation_batch_size == 8
    import dataclasses

    copy = dataclasses.replace(grpo.train, per_device_train_batch_size=4)  # TRL derived settings re-derived
    assert copy.generation_batch_size == 4


def test_memory_plan_counts_both_answers_of_a_pair_and_the_reference_copy():
    from harness.plan.architectures import model_config
    from harness.plan.memory import plan_run

    config = model_config("tiny-qwen2")
    dpo = plan_run(_config("qwen2_5_0_5b_dpo", "--max_seq_length", "256"), config)
    import dataclasses

    as_sft = _config("qwen2_5_0_5b_dpo", "--max_seq_length", "256", "--per_device_train_batch_size", "2")
    as_sft = dataclasses.replace(as_sft, run=dataclasses.replace(as_sft.run, objective="sft"))
    sft_two = plan_run(as_sft, config)
    activations = "activations saved for backward"
    assert dpo.bytes_of(activations) == sft_two.bytes_of(activations) > 0  # 1 pair = 2 sequences
    full = plan_run(_config("qwen2_5_0_5b_dpo", "--method", "full", "--max_seq_length", "256"), config)
    assert full.bytes_of("reference model") > 0 and dpo.bytes_of("reference model") == 0
    qwen = model_config("Qwen/Qwen2.5-0.5B-Instruct")  # built in: no download
    cache = "generation KV cache beyond the activations"
    one_group = plan_run(_config("qwen2_5_0_5b_grpo"), qwen)  # 8 completions: their cache is below the activations
    many = plan_run(_config("qwen2_5_0_5b_grpo", "--per_device_train_batch_size", "1", "--num_generations", "2",
                            "--gradient_accumulation_steps", "512"), qwen)
    assert one_group.bytes_of(cache) == 0 < many.bytes_of(cache)  # 512 completions generated at once


def test_bench_plans_both_recipes_over_ranks(tmp_path):
    from harness.bench import build_parser, plan_trials

    args = build_parser().parse_args(["--recipes", "qwen2_5_0_5b_dpo,qwen2_5_0_5b_grpo", "--ranks", "8,16",
                                      "--model", "tiny-qwen2", "--budget-steps", "1",
                                      "--results-dir", str(tmp_path / "r"), "--output-root", str(tmp_path / "o")])
    trials = plan_trials(args)
    assert [(t.recipe, t.rank) for t in trials] == [
        ("qwen2_5_0_5b_dpo", 8), ("qwen2_5_0_5b_dpo", 16), ("qwen2_5_0_5b_grpo", 8), ("qwen2_5_0_5b_grpo", 16)]
    assert all(t.method != "none" for t in trials)  # each run scores its own untrained model


# ---------------------------------------------------------------------------- end to end

def test_dpo_recipe_trains_and_scores_pairs_it_never_saw(tmp_path, one_torch_thread):
    from harness.run.flow import run_recipe

    recipe = load_recipe("qwen2_5_0_5b_dpo")
    pairs = [{"prompt": f"Question {i}: which colour is the sky?", "chosen": "Blue.", "rejected": f"Green {i}."}
             for i in range(20)]
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps(pairs))
    out = tmp_path / "dpo"
    record = run_recipe("qwen2_5_0_5b_dpo", recipe.DEFAULTS, [
        "--model", "tiny-qwen2", "--data_file", str(data), "--validation_split", "0.25", "--max_seq_length", "64",
        "--max_steps", "2", "--gradient_accumulation_steps", "1", "--learning_rate", "1e-3",
        "--output_dir", str(out)])
    saved = json.loads((out / "result.json").read_text())
    assert saved["status"] == "ok" and saved["objective"] == "dpo" and saved["global_step"] == 2
    assert saved["eval"]["pairs"] == 5 and saved["data"]["train_pairs"] == 15
    assert 0 <= saved["eval"]["reward_accuracy"] <= 1 and "prefers_chosen" in saved["before_training"]
    assert saved["tokens_trained"] > 0 and saved["adapter_bytes"] > 0 and saved["memory_plan"]["status"] == "planned"
    assert record["train_seconds"] > 0
    # the held-out pairs are pairs the run never trained on
    from harness.data import reading as data_mod

    cfg = parse_args({**recipe.DEFAULTS, "recipe": "x"}, ["--data_file", str(data), "--validation_split", "0.25",
                                                           "--output_dir", "unused"])
    train_rows, eval_rows = data_mod.split_records(data_mod.load_records(cfg.data).rows, cfg.data)
    assert not {r["rejected"] for r in train_rows} & {r["rejected"] for r in eval_rows}
    # Trained towards the chosen answer, not the rejected one: by the run's own held-out score, and, independently of
    # the harness's reading and scoring, by the saved adapter against the base on every held-out pair of the file.
    assert saved["eval"]["reward_margin"] > 0 and saved["eval"]["reward_accuracy"] > 0.5
    assert [_chosen_margin_gain(out, pair) > 0 for pair in pairs if pair["rejected"] in
            {r["rejected"] for r in eval_rows}] == [True] * 5


def _chosen_margin_gain(adapter, pair: dict) -> float:
    """How much the adapter raised log p(chosen) - log p(rejected) after the pair's prompt, over the base model."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from harness.models.offline import resolve_offline_model

    path = resolve_offline_model("tiny-qwen2")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), str(adapter)).eval()
    prompt = tokenizer(pair["prompt"], add_special_tokens=False)["input_ids"]

    def logp(answer: str) -> float:
        ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + ids])).logits[0, len(prompt) - 1:-1].float()
        return float(torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(ids)[:, None]).sum())

    trained = logp(pair["chosen"]) - logp(pair["rejected"])
    with model.disable_adapter():
        untrained = logp(pair["chosen"]) - logp(pair["rejected"])
    return trained - untrained


def test_grpo_recipe_trains_with_its_rewards_and_times_generation(tmp_path, one_torch_thread):
    from harness.run.flow import run_recipe

    recipe = load_recipe("qwen2_5_0_5b_grpo")
    out = tmp_path / "grpo"
    run_recipe("qwen2_5_0_5b_grpo", recipe.DEFAULTS, [
        "--model", "tiny-qwen2", "--max_samples", "8", "--eval_max_samples", "3", "--max_steps", "2",
        "--num_generations", "2", "--per_device_train_batch_size", "4", "--max_completion_length", "8",
        "--output_dir", str(out)], reward_funcs=recipe.REWARD_FUNCS)
    saved = json.loads((out / "result.json").read_text())
    assert saved["status"] == "ok" and saved["objective"] == "grpo" and saved["global_step"] == 2
    assert saved["eval"]["problems"] == saved["before_training"]["problems"] == 3
    assert saved["grpo"]["reward_functions"] == ["correctness", "answer_format"]
    assert 0 < saved["grpo"]["generation_seconds"] and 0 < saved["grpo"]["generation_share"] <= 1
    assert sum("reward" in entry for entry in saved["log_history"]) == 2  # the mean reward of every step
    # prompt and completion tokens: 2 steps x 4 completions of up to 8 tokens, plus their prompts
    assert saved["tokens_trained"] > 2 * 4 * 8
    from harness.reporting.summary import render

    summary = render(saved)  # results/'s page of the run: the before/after, the reward of every step
    assert "untrained (baseline, step 0) accuracy" in summary and "## Mean reward of every step (GRPO)" in summary


def test_grpo_without_reward_functions_is_refused(tmp_path, capsys):
    from harness.run.flow import run_recipe

    with pytest.raises(SystemExit) as stop:
        run_recipe("qwen2_5_0_5b_grpo", load_recipe("qwen2_5_0_5b_grpo").DEFAULTS,
                   ["--model", "tiny-qwen2", "--output_dir", str(tmp_path / "g")])
    assert stop.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "qwen2_5_0_5b_grpo: GRPO needs reward functions: run a GRPO recipe (it passes its own to run_recipe)"]
    assert not (tmp_path / "g").exists()  # refused before output_dir was claimed
