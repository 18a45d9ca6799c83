"""Packing and padding-free through TRL's SFTTrainer: the same loss and gradients as the examples run one by one,
no example attending to another, the answer-only mask kept; and the refusals where packing would mix examples."""
from __future__ import annotations

import re

import pytest
import torch

from harness.data.encoding import prepare
from harness.data.examples import IGNORE_INDEX
from harness.models.loading import load_model, load_tokenizer
from harness.run.config import DataArguments, ModelArguments

# Float32 on CPU: packed and one-by-one runs differ only by summation order (measured ~1e-7 relative).
LOSS_RTOL, GRAD_ATOL = 1e-5, 1e-6

REVIEWS = [("A fine film with a great cast.", "positive"), ("Dull. " * 9, "negative"),
           ("I laughed, I cried \u0085 and then I laughed again \U0001F600.", "positive"),
           ("Two hours I will never get back.", "negative"), ("Superb.", "positive")]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelArguments(model="tiny-qwen2"))


def _prepared(tokenizer, task: str):
    if task == "classification":
        args = DataArguments(max_seq_length=64)
        rows = [{"text": text, "label": label} for text, label in REVIEWS]
    else:
        args = DataArguments(task="instruction", prompt_format="chat_template", max_seq_length=64)
        rows = [{"instruction": f"Say {w} twice.", "input": "", "output": f"{w} {w}."} for w in ("yes", "no", "maybe")]
        rows.append({"instruction": "Repeat the text.", "input": "abc " * 5, "output": "abc " * 5})
    return prepare(rows, [], args, tokenizer)


def _lora_model():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = load_model(ModelArguments(model="tiny-qwen2"), "lora", False)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    for name, p in model.named_parameters():  # lora_B starts at zero: make the adapter do something
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model


def _trainer(model, tokenizer, data, tmp_path, **settings):
    from harness.objectives.sft_trainer import SFTSettings, build_trainer

    settings = {"max_length": 64, "completion_only_loss": True, **settings}
    args = SFTSettings(output_dir=str(tmp_path), per_device_train_batch_size=8, report_to=[], bf16=False,
                       use_cpu=True, dataloader_pin_memory=False, **settings)
    return build_trainer(model, tokenizer, args, data)


def _loss_and_grads(trainer):
    """One batch holding every example: TRL's loss on it (token mean over the answer tokens) and its gradients."""
    batch = next(iter(trainer.get_train_dataloader()))
    model = trainer.model
    model.zero_grad()
    model.train()
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return float(loss.detach()), grads, batch


def _one_by_one(model, data):
    """The reference: every example alone, its summed answer-token loss, divided by all answer tokens."""
    model.zero_grad()
    model.train()
    rows = list(data.train)
    total = sum(sum(r["completion_mask"][1:]) for r in rows)  # the first token is never predicted
    loss_sum = 0.0
    for r in rows:
        ids = torch.tensor([r["input_ids"]])
        labels = torch.tensor([[t if m else IGNORE_INDEX for t, m in zip(r["input_ids"], r["completion_mask"])]])
        logits = model(input_ids=ids).logits[0, :-1]
        nll = torch.nn.functional.cross_entropy(logits, labels[0, 1:], ignore_index=IGNORE_INDEX, reduction="sum")
        (nll / total).backward()
        loss_sum += float(nll.detach())
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss_sum / total, grads


@pytest.mark.parametrize("task", ["classification", "instruction"])
@pytest.mark.parametrize("way", [{}, {"padding_free": True, "max_length": None}, {"packing": True}],
                         ids=["padded", "padding_free", "packed"])
def test_a_batch_trains_as_its_examples_one_by_one(tokenizer, tmp_path, task, way, one_torch_thread):
    data = _prepared(tokenizer, task)
    model = _lora_model()
    reference_loss, reference_grads = _one_by_one(model, data)
    loss, grads, batch = _loss_and_grads(_trainer(model, tokenizer, data, tmp_path, **way))
    assert loss == pytest.approx(reference_loss, rel=LOSS_RTOL)
    worst = max(float((grads[n] - reference_grads[n]).abs().max()) for n in grads)
    assert worst < GRAD_ATOL, worst
    if way:  # one row, the examples end to end, each restarting its positions
        assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
        assert int((batch["position_ids"][0] == 0).sum()) == len(data.train)
    # The answer-only mask survived: exactly the answer tokens carry loss, none of the prompts'.
    answers = sum(sum(m[1:]) for m in data.train["completion_mask"])
    assert int((batch["labels"] != IGNORE_INDEX).sum()) == answers


def test_packed_examples_do_not_see_each_other(tokenizer, tmp_path, one_torch_thread):
    """Change every token of the other examples in a packed row: the first example's log-probabilities stay."""
    data = _prepared(tokenizer, "classification")
    model = _lora_model()
    batch = next(iter(_trainer(model, tokenizer, data, tmp_path, packing=True).get_train_dataloader()))
    ids, positions = batch["input_ids"], batch["position_ids"]
    starts = (positions[0] == 0).nonzero().flatten().tolist()
    first_end = starts[1]
    changed = ids.clone()
    changed[0, first_end:] = (changed[0, first_end:] + 7) % len(tokenizer)
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids, position_ids=positions).logits[0, :first_end]
        after = model(input_ids=changed, position_ids=positions).logits[0, :first_end]
        # ... and the second example, in the row behind the first, gives the logits it gives alone
        packed_second = model(input_ids=ids, position_ids=positions).logits[0, starts[1]:starts[2]]
        alone = model(input_ids=ids[:, starts[1]:starts[2]]).logits[0]
    assert float((before - after).abs().max()) < 1e-5
    assert float((packed_second - alone).abs().max()) < 1e-4


def test_completion_only_loss_false_trains_every_token(tokenizer, tmp_path):
    data = _prepared(tokenizer, "classification")
    trainer = _trainer(_lora_model(), tokenizer, data, tmp_path, completion_only_loss=False)
    batch = next(iter(trainer.get_train_dataloader()))
    assert int((batch["labels"] != IGNORE_INDEX).sum()) == sum(map(len, data.train["input_ids"]))


def test_a_model_whose_attention_mixes_packed_examples_is_found():
    """(Refused when the user asked for packing: test_padding_free_by_a_recipes_default_gives_way_...)"""
    from harness.objectives.sft_trainer import packed_examples_mix

    assert packed_examples_mix(load_model(ModelArguments(model="tiny-qwen2"), "lora", False), 256) is None  # isolates
    opt = load_model(ModelArguments(model="tiny-opt"), "lora", False)  # OPT's positions ignore position_ids
    assert re.match("packed examples would see each other in this opt model", packed_examples_mix(opt, 256))


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning", "p_tuning"])
@pytest.mark.parametrize("flag", ["--packing", "--padding_free"])
def test_packing_is_refused_for_virtual_token_methods(method, flag, recipe_argv):
    from harness.errors import UserError
    from harness.run.command_line import parse_args
    from harness.run.flow import preflight

    cfg = parse_args({"recipe": "t", "method": method}, recipe_argv(flag, "true"))
    with pytest.raises(UserError, match=f"{flag} would let examples see each other under {method}"):
        preflight(cfg, output_dir=False)


def test_max_length_must_agree_with_the_window(recipe_argv):
    from harness.errors import UserError
    from harness.run.command_line import parse_args
    from harness.run.flow import preflight

    cfg = parse_args({"recipe": "t"}, recipe_argv("--max_length", "300"))
    with pytest.raises(UserError, match="--max_length is TRL's name for --max_seq_length here"):
        preflight(cfg, output_dir=False)
    same = parse_args({"recipe": "t"}, recipe_argv("--max_length", "96"))
    assert preflight(same, output_dir=False).targs.max_length == 96


def test_packing_recipe_end_to_end(recipe_argv, tmp_path):
    """The LoRA recipe with --packing trains, evaluates, saves and records the packing it used."""
    import json

    from harness.run.flow import load_recipe, run_recipe

    recipe = load_recipe("qwen2_5_0_5b_lora")
    out = tmp_path / "packed"
    record = run_recipe("qwen2_5_0_5b_lora", recipe.DEFAULTS, recipe_argv("--packing", "true", output_dir=out))
    assert record["status"] == "ok" and record["global_step"] > 0
    saved = json.loads((out / "result.json").read_text())
    assert saved["config"]["packing"] is True and saved["tokens_trained"] > 0
    assert (out / "adapter_model.safetensors").is_file()


def test_padding_free_by_a_recipes_default_gives_way_where_asked_for_it_is_refused(recipe_argv, tmp_path, capsys):
    """A recipe may default to padding-free; where it cannot serve (a virtual-token method, an attention that mixes
    packed examples) the run trains padded batches and says so in one line. Asked for by the user, it is refused."""
    import json

    from harness.errors import UserError
    from harness.run.command_line import parse_args
    from harness.run.flow import preflight, run_recipe

    cfg = parse_args({"recipe": "t", "method": "prompt_tuning", "padding_free": True}, recipe_argv())
    assert cfg.train.padding_free and not cfg.user_set("padding_free")
    assert preflight(cfg, output_dir=False).targs.padding_free is False
    assert "Padding-free: off for prompt_tuning" in capsys.readouterr().out
    asked = parse_args({"recipe": "t", "method": "prompt_tuning"}, recipe_argv("--padding_free", "true"))
    assert asked.user_set("padding_free")
    with pytest.raises(UserError, match="--padding_free would let examples see each other under prompt_tuning"):
        preflight(asked, output_dir=False)

    # tiny-opt's attention mixes packed examples: found after loading, the default gives way...
    out = tmp_path / "opt"
    record = run_recipe("t", {"padding_free": True}, recipe_argv("--max_steps", "1", model="tiny-opt", output_dir=out))
    assert record["status"] == "ok" and record["config"]["padding_free"] is False
    assert "Padding-free: off, packed examples would see each other in this opt model" in capsys.readouterr().out
    assert json.loads((out / "result.json").read_text())["positions_trained"] > record["tokens_trained"]  # padded
    # ...and the same setting from a --config file is the user's: refused, in one line.
    config = tmp_path / "c.yaml"
    config.write_text("padding_free: true\n")
    with pytest.raises(SystemExit) as stop:
        run_recipe("t", {}, recipe_argv("--config", str(config), "--max_steps", "1", model="tiny-opt",
                                        output_dir=tmp_path / "opt-asked"))
    assert stop.value.code == 2
    assert "drop --packing / --padding_free for this model" in capsys.readouterr().err


def test_batch_layout_is_not_part_of_a_runs_fingerprint(recipe_argv):
    """Padded, padded to a multiple or padding-free train the same tokens with the same loss: a rerun that changes
    the layout still finds (or resumes) its run."""
    from harness.run.command_line import parse_args
    from harness.run.folder import fingerprint_of, run_settings

    prints = {fingerprint_of(run_settings(parse_args({"recipe": "t"}, recipe_argv(*flags))))
              for flags in ([], ["--padding_free", "true"], ["--pad_to_multiple_of", "96"])}
    assert len(prints) == 1
    assert fingerprint_of(run_settings(parse_args({"recipe": "t"}, recipe_argv("--packing", "true")))) not in prints
