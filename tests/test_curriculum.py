"""Curriculum buckets and stage boundaries, stage chaining, reuse, roll-back with --start_stage, and
that a stage really starts from the adapter the stage before saved."""
from __future__ import annotations

import json

import pytest
import torch

from harness.alpaca100.curriculum import (
    SINGLE_PASS,
    bucket_counts,
    bucket_of,
    has_code,
    has_math,
    plan_stages,
    train_stages,
)
from harness.errors import UserError
from harness.run.command_line import parse_args

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def rec(words: int, instruction: str = "Describe it.", extra: str = "") -> dict:
    return {"instruction": instruction, "input": "", "output": " ".join(["fine"] * words) + extra}


def test_bucket_boundaries():
    assert bucket_of(rec(49)) == "easy"
    assert bucket_of(rec(50)) == "medium"
    assert bucket_of(rec(120)) == "medium"
    assert bucket_of(rec(121)) == "hard"
    # Code or math makes even a short record hard, wherever it is.
    assert bucket_of(rec(5, extra="\ndef area(r):\n    return 3.14 * r * r")) == "hard"
    assert bucket_of(rec(5, instruction="What is 12 * 7?")) == "hard"
    assert bucket_of(rec(5, instruction="Solve the equation for y.")) == "hard"
    # Prose that only looks a little like code or math stays where its length puts it.
    assert not has_code("If you want to win, for example, return the ball.\nFor the team.")
    assert not has_math("Between 2010-2020 the city grew; call 555-1234 (ages 5-10).")
    assert has_code("<div class='x'>hi</div>") and has_code("SELECT name FROM users")
    assert has_math("x^2 + 3 = 7") and has_math(r"\frac{1}{2}")


def test_stages_are_cumulative_and_empty_buckets_are_skipped():
    easy, medium, hard = [rec(10), rec(20)], [rec(60)], [rec(200)]
    stages = plan_stages(easy + hard + medium, curriculum=True)
    assert [(s.number, s.folder, len(s.records), s.added) for s in stages] == [
        (1, "stage1_easy", 2, 2), (2, "stage2_medium", 3, 1), (3, "stage3_hard", 4, 1)]
    assert stages[1].records == easy + medium and stages[2].records == easy + medium + hard

    no_medium = plan_stages(easy + hard, curriculum=True)
    assert [s.folder for s in no_medium] == ["stage1_easy", "stage3_hard"]
    assert bucket_counts(easy + hard) == {"easy": 2, "medium": 0, "hard": 1}

    single = plan_stages(easy + hard, curriculum=False)
    assert [(s.folder, len(s.records)) for s in single] == [(SINGLE_PASS, 3)]


@pytest.fixture
def fake_training(monkeypatch):
    """harness.run.flow.train, as the curriculum calls it, replaced by a recorder that writes what a finished stage writes."""
    from harness.alpaca100 import curriculum
    from harness.data.reading import data_identity
    from harness.files import write_json_atomic

    calls = []

    def train(cfg):
        from harness.run.folder import claimed

        with claimed(cfg) as folder:
            out = folder.path
        calls.append({
            "stage": out.name, "init_adapter": cfg.run.init_adapter, "eval_file": cfg.data.eval_file,
            "validation_split": cfg.data.validation_split,
            "records": json.loads(open(cfg.data.data_file).read()),
        })
        record = {"status": "ok", "data": data_identity(cfg.data.data_file), "eval_loss": 1.0}
        write_json_atomic(out / "result.json", record)
        return record

    monkeypatch.setattr(curriculum, "train", train)
    return calls


def config(tmp_path):
    from harness.alpaca100.pipeline import EXTRA_ARGUMENTS

    return parse_args({"task": "instruction", "output_dir": str(tmp_path), "recipe": "curriculum_test"}, [],
                      extra_classes=EXTRA_ARGUMENTS)


def test_stages_chain_reuse_and_roll_back(tmp_path, fake_training):
    records = [rec(10), rec(60), rec(200), rec(30)]
    stages = plan_stages(records, curriculum=True)
    cfg = config(tmp_path)
    heldout = str(tmp_path / "data" / "heldout.json")

    results = train_stages(cfg, stages, tmp_path, heldout, start_stage=None)
    assert [c["stage"] for c in fake_training] == ["stage1_easy", "stage2_medium", "stage3_hard"]
    assert [c["init_adapter"] for c in fake_training] == [
        None, str(tmp_path / "stage1_easy"), str(tmp_path / "stage2_medium")]
    assert [len(c["records"]) for c in fake_training] == [2, 3, 4]
    assert all(c["eval_file"] == heldout and c["validation_split"] == 0.0 for c in fake_training)
    assert [r["stage"] for r in results] == ["stage1_easy", "stage2_medium", "stage3_hard"]

    # A rerun reuses every finished stage: nothing is trained again.
    fake_training.clear()
    train_stages(cfg, stages, tmp_path, heldout, start_stage=None)
    assert fake_training == []

    # Roll back to medium: stage 1 is kept, 2 and 3 are moved aside (not deleted) and retrained.
    train_stages(cfg, stages, tmp_path, heldout, start_stage="medium")
    assert [(c["stage"], c["init_adapter"]) for c in fake_training] == [
        ("stage2_medium", str(tmp_path / "stage1_easy")), ("stage3_hard", str(tmp_path / "stage2_medium"))]
    assert len(list(tmp_path.glob("stage2_medium.rolled-back-*"))) == 1
    assert len(list(tmp_path.glob("stage3_hard.rolled-back-*"))) == 1
    assert (tmp_path / "stage1_easy" / "result.json").is_file()


def test_start_stage_is_checked(tmp_path, fake_training):
    cfg = config(tmp_path)
    stages = plan_stages([rec(10), rec(200)], curriculum=True)  # no medium records
    with pytest.raises(UserError, match="stage has no records"):
        train_stages(cfg, stages, tmp_path, None, start_stage="2")
    with pytest.raises(UserError, match="needs the adapter of stage stage1_easy"):
        train_stages(cfg, stages, tmp_path, None, start_stage="hard")
    with pytest.raises(UserError, match="use 1, 2, 3"):
        train_stages(cfg, stages, tmp_path, None, start_stage="4")
    with pytest.raises(UserError, match="needs --curriculum"):
        train_stages(cfg, plan_stages([rec(10)], curriculum=False), tmp_path, None, start_stage="1")
    assert fake_training == []

    # Other records in a finished stage's folder are not silently reused.
    train_stages(cfg, stages, tmp_path, None, start_stage=None)
    changed = plan_stages([rec(11), rec(200)], curriculum=True)
    with pytest.raises(UserError, match="trained on other records"):
        train_stages(cfg, changed, tmp_path, None, start_stage=None)


def test_a_stage_starts_from_the_saved_adapter(tmp_path):
    """init_adapter loads the previous stage's LoRA weights (not a fresh init) and refuses a misfit."""
    from peft import LoraConfig, get_peft_model

    from harness.models.loading import load_model
    from harness.models.methods import load_adapter_weights, peft_config
    from harness.run.config import MethodArguments, ModelArguments

    method = MethodArguments(method="lora", target_modules="attention", r=4, lora_alpha=8)

    def fresh():
        model = load_model(ModelArguments(model="tiny-llama"), "lora", False)
        return get_peft_model(model, peft_config(method, model))

    saved = fresh()
    with torch.no_grad():
        for name, param in saved.named_parameters():
            if "lora_B" in name:
                param.normal_()  # a fresh adapter's B is zero: make the saved one recognisable
    saved.save_pretrained(tmp_path / "stage1")
    expected = {n: p.detach().clone() for n, p in saved.named_parameters() if "lora_" in n}

    model = fresh()
    load_adapter_weights(model, tmp_path / "stage1")
    loaded = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert expected.keys() == loaded.keys()
    assert all(torch.equal(expected[n], loaded[n]) for n in expected)
    assert all(p.requires_grad for p in loaded.values())  # still trainable

    other = load_model(ModelArguments(model="tiny-llama"), "lora", False)
    other = get_peft_model(other, LoraConfig(task_type="CAUSAL_LM", r=8, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(UserError, match="does not fit"):
        load_adapter_weights(other, tmp_path / "stage1")
    with pytest.raises(UserError, match="no adapter"):
        load_adapter_weights(other, tmp_path / "nowhere")
