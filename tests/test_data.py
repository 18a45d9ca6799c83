"""Prompt layout and tokenization: loss only on the answer, the text cut instead of the answer."""
from __future__ import annotations

import pytest

from harness.data.examples import IGNORE_INDEX, Example, build_examples, encode
from harness.data.reading import split_records
from harness.models.loading import load_tokenizer
from harness.run.config import DataArguments, ModelArguments


@pytest.fixture(scope="module", params=["tiny-qwen2", "stories260k"])
def tokenizer(request):
    return load_tokenizer(ModelArguments(model=request.param))


def classification_example(tokenizer, text: str, label: str = "positive") -> Example:
    args = DataArguments()
    return build_examples([{"text": text, "label": label}], args, tokenizer)[0]


def test_labels_mask_the_prompt_and_keep_the_answer(tokenizer):
    example = classification_example(tokenizer, "A fine film with a great cast.")
    encoded = encode(tokenizer, example, max_len=512)
    answer = encoded.input_ids[encoded.prompt_len:]
    assert encoded.labels[: encoded.prompt_len] == [IGNORE_INDEX] * encoded.prompt_len
    assert encoded.labels[encoded.prompt_len:] == answer
    assert answer[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(answer, skip_special_tokens=True).strip() == "positive"
    # The prompt's tokens are exactly the prompt alone, tokenized: no merge across the seam.
    assert encoded.input_ids[: encoded.prompt_len] == tokenizer(example.prompt)["input_ids"]


def test_padding_is_masked_by_the_collator(tokenizer, tmp_path):
    """The batch the SFT trainer really trains on (its own collator, as the flagship recipe sets it up): padded to
    the longest row, padding and prompt out of the loss, every answer token in it."""
    from transformers import AutoModelForCausalLM

    from harness.data.encoding import prepare
    from harness.objectives.sft_trainer import build_trainer
    from harness.run.command_line import parse_args
    from harness.run.flow import load_recipe, preflight
    from harness.run.training import trainer_settings

    recipe = "qwen2_7b_adalora"
    cfg = parse_args({**load_recipe(recipe).DEFAULTS, "recipe": recipe}, [
        "--model", tokenizer.name_or_path, "--output_dir", str(tmp_path / "run"), "--validation_split", "0",
        "--per_device_train_batch_size", "2"])
    targs = trainer_settings(cfg, preflight(cfg, output_dir=False).targs)
    rows = [{"text": "Bad.", "label": "positive"}, {"text": "Bad. " * 20, "label": "negative"}]
    prepared = prepare(rows, [], cfg.data, tokenizer)
    examples = sorted(prepared.train, key=lambda e: len(e["input_ids"]))  # short, long
    model = AutoModelForCausalLM.from_pretrained(tokenizer.name_or_path)
    trainer = build_trainer(model, tokenizer, targs, prepared)
    [batch] = list(trainer.get_train_dataloader())  # both examples, one batch, through the trainer's collator

    short, long = (len(e["input_ids"]) for e in examples)
    assert short < long and batch["input_ids"].shape == (2, long)  # padded to the longest in the batch, not max_len
    for row in range(2):
        length = int(batch["attention_mask"][row].sum())
        example = next(e for e in examples if len(e["input_ids"]) == length)
        assert batch["input_ids"][row, :length].tolist() == example["input_ids"]  # real tokens first (right padding)
        assert (batch["attention_mask"][row, length:] == 0).all()
        assert (batch["labels"][row, length:] == IGNORE_INDEX).all()  # no loss on padding
        trained = batch["labels"][row] != IGNORE_INDEX
        assert trained.tolist() == [bool(m) for m in example["completion_mask"]] + [False] * (long - length)
        assert 0 < int(trained.sum()) < length  # the answer, not the prompt
        assert (batch["labels"][row][trained] == batch["input_ids"][row][trained]).all()


def test_long_review_is_cut_never_the_instruction_or_answer(tokenizer):
    review = "This movie was long and slow and the plot went nowhere at all. " * 80
    example = classification_example(tokenizer, review, "negative")
    encoded = encode(tokenizer, example, max_len=128)
    assert encoded.body_cut
    assert len(encoded.input_ids) <= 128
    text = tokenizer.decode(encoded.input_ids, skip_special_tokens=True)
    assert text.lstrip().startswith("Human: Determine the sentiment")
    assert text.rstrip().endswith("Assistant: negative")
    answer = encoded.input_ids[encoded.prompt_len:]
    assert tokenizer.decode(answer, skip_special_tokens=True).strip() == "negative"


def test_prompt_too_long_for_any_text_is_refused(tokenizer):
    from harness.errors import UserError

    example = classification_example(tokenizer, "Some review.")
    with pytest.raises(UserError, match="max_seq_length 8 is too short"):
        encode(tokenizer, example, max_len=8)


def test_split_is_fixed_and_disjoint():
    rows = [{"text": str(i), "label": "positive"} for i in range(50)]
    args = DataArguments(validation_split=0.1)
    train_a, eval_a = split_records(rows, args)
    train_b, eval_b = split_records(rows, args)
    assert (len(train_a), len(eval_a)) == (45, 5)
    assert eval_a == eval_b and train_a == train_b
    assert not {r["text"] for r in train_a} & {r["text"] for r in eval_a}


def test_chat_template_classification_cuts_inside_the_user_turn():
    tokenizer = load_tokenizer(ModelArguments(model="tiny-qwen2"))
    args = DataArguments(prompt_format="chat_template")
    example = build_examples([{"text": "word " * 400, "label": "positive"}], args, tokenizer)[0]
    encoded = encode(tokenizer, example, max_len=100)
    text = tokenizer.decode(encoded.input_ids)
    assert text.startswith("<|im_start|>system")
    assert text.endswith("<|im_start|>assistant\npositive<|im_end|>\n<|endoftext|>") or text.endswith(
        "<|im_start|>assistant\npositive<|im_end|>"
    )
    assert len(encoded.input_ids) <= 100


# Characters byte-level BPE splits into several tokens sharing one character span (real IMDB reviews hold
# U+0085), emoji, control characters, mojibake.
AWKWARD = ["\u0085", "\u2028", "\U0001F600", "\U0001F469\u200D\U0001F4BB", "\x00", "\x1b", "Ã©", "\ufffd", "é"]


@pytest.mark.parametrize("ending", AWKWARD)
@pytest.mark.parametrize("over", [1, 2, 3])
def test_a_review_ending_in_a_split_character_is_cut_and_does_not_hang(tokenizer, ending, over):
    # Before the fix, a window one token short of "...\u0085" (two tokens, one character span) made encode()
    # cut one token, get the same text back, and loop forever before the first step.
    import signal

    example = classification_example(tokenizer, "good film " * 20 + ending * 2, "positive")
    whole = len(encode(tokenizer, example, max_len=10_000).input_ids)

    def hung(*_):
        raise TimeoutError("encode() did not finish in 20 s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    try:
        encoded = encode(tokenizer, example, max_len=whole - over)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert encoded.body_cut and len(encoded.input_ids) <= whole - over
    assert tokenizer.decode(encoded.input_ids[encoded.prompt_len:], skip_special_tokens=True).strip() == "positive"


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st

_texts = st.lists(st.one_of(st.sampled_from(AWKWARD + [" ", "film ", "\n"]), st.text(max_size=12)), max_size=120).map("".join)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(review=_texts, room=st.integers(min_value=0, max_value=60))
def test_any_review_fits_the_window_with_its_label_whole(tokenizer, review, room):
    example = classification_example(tokenizer, review or "x", "negative")
    bare = encode(tokenizer, classification_example(tokenizer, "", "negative"), max_len=10_000)
    max_len = len(bare.input_ids) + room  # the prompt and label alone always fit; `room` tokens are left for text
    encoded = encode(tokenizer, example, max_len=max_len)
    assert len(encoded.input_ids) <= max_len
    answer = encoded.input_ids[encoded.prompt_len:]
    assert encoded.labels == [IGNORE_INDEX] * encoded.prompt_len + answer
    assert tokenizer.decode(answer, skip_special_tokens=True).strip() == "negative"
    assert tokenizer.decode(encoded.input_ids, skip_special_tokens=True).lstrip().startswith("Human: Determine")
