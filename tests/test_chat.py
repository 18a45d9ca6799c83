"""Conversations as tokens: the loss on every assistant answer and its end-of-turn token, nothing else."""
from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.data.chat import NO_TEMPLATE, encode_conversation
from harness.data.examples import IGNORE_INDEX, _instruction_example, encode
from harness.data.formats import Conversation, read_conversations, to_conversation
from harness.data.reading import read_table
from harness.errors import UserError
from harness.models.loading import load_tokenizer
from harness.run.config import DataArguments, ModelArguments

# ChatML with {% generation %} around the answer only, so transformers' assistant mask leaves <|im_end|> out.
CHATML_MARKED = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}{% endgeneration %}"
    "{% else %}{{ message['content'] }}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# ChatML with tools the way Qwen2.5 writes them: tools in the system turn, calls in <tool_call>, results in a user turn.
CHATML_TOOLS = (
    "{% if tools %}{{ '<|im_start|>system\\n# Tools\\n<tools>' }}{% for tool in tools %}{{ '\\n' + (tool | tojson) }}"
    "{% endfor %}{{ '\\n</tools><|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message.role == 'assistant' %}{{ '<|im_start|>assistant\\n' + message.content }}"
    "{% for call in message.tool_calls or [] %}{{ '<tool_call>\\n' + (call.function | tojson) + '\\n</tool_call>' }}"
    "{% endfor %}{{ '<|im_end|>\\n' }}"
    "{% elif message.role == 'tool' %}{{ '<|im_start|>user\\n<tool_response>\\n' + message.content + "
    "'\\n</tool_response><|im_end|>\\n' }}"
    "{% else %}{{ '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Rewrites the top of the text whenever the conversation grows: no render of a prefix is a prefix of the whole.
CHATML_COUNTED = "{{ (messages | length | string) + ' messages\\n' }}" + CHATML_MARKED
# Writes earlier answers as a placeholder: they are not in the whole conversation's text at all.
CHATML_FORGETFUL = CHATML_MARKED.replace(
    "{{ message['content'] }}{% endgeneration %}",
    "{{ message['content'] if loop.last else '[earlier answer]' }}{% endgeneration %}")


@pytest.fixture(scope="module")
def qwen():
    return load_tokenizer(ModelArguments(model="tiny-qwen2"))


@pytest.fixture(scope="module")
def stories():
    return load_tokenizer(ModelArguments(model="stories260k"))


def with_template(name: str, template: str | None):
    tokenizer = load_tokenizer(ModelArguments(model=name))  # a fresh one: the fixtures stay as they are
    tokenizer.chat_template = template
    return tokenizer


def trained_runs(tokenizer, encoded) -> list[str]:
    """The text of each stretch of consecutive tokens that carry loss."""
    runs, current = [], []
    for token, trained in zip(encoded.input_ids + [None], encoded.completion_mask + [0]):
        if trained:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current, skip_special_tokens=False, clean_up_tokenization_spaces=False))
            current = []
    return runs


def chat(*turns: str, system: str | None = None) -> Conversation:
    """user, assistant, user, assistant, ... turns."""
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": ("user", "assistant")[k % 2], "content": text} for k, text in enumerate(turns)]
    return Conversation(messages)


THREE_TURNS = chat("Hi there", "Hello! How can I help?", "Name a colour.", "Blue.", "Another one?",
                   "Green, like grass.", system="Be brief.")
ANSWERS = ["Hello! How can I help?", "Blue.", "Green, like grass."]


# ---------------------------------------------------------------------------- which tokens carry loss

def test_every_answer_and_its_end_of_turn_token_and_nothing_else(qwen, stories):
    encoded = encode_conversation(qwen, THREE_TURNS, 4096)
    assert trained_runs(qwen, encoded) == [a + "<|im_end|>" for a in ANSWERS] + ["<|endoftext|>"]
    assert encoded.assistant_turns == 3 and not encoded.turns_cut
    assert len(encoded.completion_mask) == len(encoded.input_ids)
    # stories260k: "### Response:\n" prompts, the answer ends with </s>, which is its EOS: nothing appended
    encoded = encode_conversation(stories, THREE_TURNS, 4096)
    assert trained_runs(stories, encoded) == [a + "</s>" for a in ANSWERS]
    assert encoded.input_ids.count(stories.bos_token_id) == 1  # the template's <s>, not a second one


PLAIN = ("{% for m in messages %}{{ m.role + ':\\n' + m.content + '\\n' }}{% endfor %}"
         "{% if add_generation_prompt %}{{ 'assistant:\\n' }}{% endif %}")


def test_one_bos_whether_the_template_writes_it_or_not():
    opt = load_tokenizer(ModelArguments(model="tiny-opt"))  # its tokenizer puts </s> (its BOS) before every text
    conv = chat("Hi", "Hello")
    written = encode_conversation(opt, conv, 4096)  # its Alpaca template writes the BOS itself
    assert opt.decode(written.input_ids).startswith("</s>### Instruction:") and written.input_ids[1] != opt.bos_token_id
    plain = with_template("tiny-opt", PLAIN)
    added = encode_conversation(plain, conv, 4096)  # this one does not: the tokenizer's is kept, as harness.data.reading does
    assert added.input_ids[0] == plain.bos_token_id and added.input_ids[1] != plain.bos_token_id
    assert added.completion_mask[0] == 0 and trained_runs(plain, added) == ["Hello", "</s>"]


def test_a_token_across_the_answer_start_is_the_prompts():
    """A generation prompt that ends with a space ("assistant: ") shares its last token with the answer in
    byte-level BPE (" H"): that token starts in the prompt, so it carries no loss; the answer's first
    letter goes untrained. A template quirk: its prompt alone tokenizes differently from the whole."""
    spaced = with_template("tiny-opt", PLAIN.replace("':\\n'", "': '").replace("'assistant:\\n'", "'assistant: '"))
    encoded = encode_conversation(spaced, chat("Hi", "Hello"), 4096)
    assert spaced.decode(encoded.input_ids).endswith("assistant: Hello\n</s>")
    assert trained_runs(spaced, encoded) == ["ello", "</s>"]


def test_add_eos_false_appends_nothing(qwen):
    encoded = encode_conversation(qwen, THREE_TURNS, 4096, add_eos=False)
    assert trained_runs(qwen, encoded) == [a + "<|im_end|>" for a in ANSWERS]
    assert qwen.decode(encoded.input_ids[-2:]) == "<|im_end|>\n"  # the newline is there, untrained


def test_mask_is_transformers_assistant_mask_plus_end_of_turn(qwen, stories):
    marked = with_template("tiny-qwen2", CHATML_MARKED)
    reference = marked.apply_chat_template(THREE_TURNS.messages, tokenize=True, return_dict=True,
                                           return_assistant_tokens_mask=True)
    encoded = encode_conversation(marked, THREE_TURNS, 4096, add_eos=False)
    assert encoded.input_ids == list(reference["input_ids"])
    im_end = marked.convert_tokens_to_ids("<|im_end|>")
    expected = list(reference["assistant_masks"])
    for k in range(1, len(expected)):
        if encoded.input_ids[k] == im_end and expected[k - 1]:
            expected[k] = 1  # the end-of-turn right after an answer
    assert encoded.completion_mask == expected and sum(expected) > len(ANSWERS)
    # stories260k's own template marks the answer and its </s>: the same mask exactly
    reference = stories.apply_chat_template(THREE_TURNS.messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
    encoded = encode_conversation(stories, THREE_TURNS, 4096)
    assert encoded.input_ids == list(reference["input_ids"])
    assert encoded.completion_mask == list(reference["assistant_masks"])


def test_one_turn_matches_harness_data_encode(qwen, stories):
    """The single-turn path of harness.data.reading builds the same tokens, with two documented differences:
    tiny-qwen2: the "\\n" after <|im_end|> is trained there, not here (the next turn's layout owns it);
    stories260k: there the tokenizer adds <s> before the template's own <s> (two BOS); here it is not doubled."""
    args = DataArguments(task="instruction", prompt_format="chat_template")
    rows = read_table("data/alpaca_en_demo.json")[:30]
    for row in rows:
        conv = to_conversation(row, "alpaca")
        for tokenizer in (qwen, stories):
            today = encode(tokenizer, _instruction_example(row, args, tokenizer), 4096)
            today_mask = [int(label != IGNORE_INDEX) for label in today.labels]
            mine = encode_conversation(tokenizer, conv, 4096)
            if tokenizer is qwen:
                assert mine.input_ids == today.input_ids
                newline = [k for k, (a, b) in enumerate(zip(mine.completion_mask, today_mask)) if a != b]
                assert len(newline) == 1
                assert qwen.decode(mine.input_ids[newline[0] - 1: newline[0] + 1]) == "<|im_end|>\n"
            else:
                assert today.input_ids[:2] == [stories.bos_token_id] * 2
                assert mine.input_ids == today.input_ids[1:] and mine.completion_mask == today_mask[1:]


def test_a_long_single_answer_is_cut_exactly_as_harness_data_cuts_it(qwen):
    args = DataArguments(task="instruction", prompt_format="chat_template")
    row = {"instruction": "Tell me a long story.", "input": "", "output": "Once upon a time there was a cat. " * 60}
    today = encode(qwen, _instruction_example(row, args, qwen), 100)
    mine = encode_conversation(qwen, to_conversation(row, "alpaca"), 100)
    assert mine.input_ids == today.input_ids and len(mine.input_ids) == 100
    assert mine.completion_mask == [int(label != IGNORE_INDEX) for label in today.labels]
    assert mine.turns_cut and mine.assistant_turns == 1


# ---------------------------------------------------------------------------- tools

def glaive_conversation() -> Conversation:
    rows = read_table("data/glaive_toolcall_en_demo.json")[:1]
    return read_conversations(rows, "sharegpt", "glaive")[0][0][1]


def test_tools_with_a_template_without_tool_support_are_refused(qwen):
    with pytest.raises(UserError) as caught:
        encode_conversation(qwen, glaive_conversation(), 4096, where="data file glaive.json, row 1")
    message = str(caught.value)
    assert "\n" not in message and message.startswith("data file glaive.json, row 1: ") and "no tool support" in message
    calls_only = with_template("tiny-qwen2", CHATML_TOOLS.replace("tool_calls", "calls"))  # writes tools, not calls
    with pytest.raises(UserError, match="does not write tool_calls"):
        encode_conversation(calls_only, glaive_conversation(), 4096)


def test_the_function_call_is_trained_and_the_observation_is_not():
    tokenizer = with_template("tiny-qwen2", CHATML_TOOLS)
    conv = glaive_conversation()
    encoded = encode_conversation(tokenizer, conv, 4096)
    runs = trained_runs(tokenizer, encoded)
    call = '<tool_call>\n{"name": "search_recipes", "arguments": {"ingredients": ["chicken", "bell peppers", "rice"]}}'
    assert runs[1] == call + "\n</tool_call><|im_end|>"
    answers = [m["content"] for m in conv.messages if m["role"] == "assistant" and m["content"]]
    assert [runs[0], runs[2], runs[3]] == [a + "<|im_end|>" for a in answers] and runs[4] == "<|endoftext|>"
    whole = tokenizer.decode(encoded.input_ids)
    assert "<tool_response>" in whole and "Chicken and Rice Casserole" in whole and "search_recipes" in whole
    assert not any("tool_response" in run or "Casserole" in run.split("I found")[0] for run in runs)


# ---------------------------------------------------------------------------- cutting to max_len

def test_cut_keeps_whole_turns(qwen):
    whole = encode_conversation(qwen, THREE_TURNS, 4096)
    im_end = qwen.convert_tokens_to_ids("<|im_end|>")
    ends = [k + 1 for k, token in enumerate(whole.input_ids) if token == im_end and whole.completion_mask[k]]
    for max_len in (ends[1], ends[1] + 3, ends[2] - 1):
        cut = encode_conversation(qwen, THREE_TURNS, max_len)
        assert cut.input_ids == whole.input_ids[: ends[1]] and cut.completion_mask == whole.completion_mask[: ends[1]]
        assert cut.assistant_turns == 2 and cut.turns_cut
    cut = encode_conversation(qwen, THREE_TURNS, ends[2])  # the last answer fits, its "\n" and EOS do not
    assert cut.input_ids == whole.input_ids[: ends[2]] and cut.assistant_turns == 3 and cut.turns_cut


def test_first_answer_too_long_keeps_its_beginning_and_nothing_fitting_is_none(qwen):
    conv = chat("Tell me everything.", "word " * 300, "More?", "No.")
    first = encode_conversation(qwen, conv, 4096).completion_mask.index(1)
    cut = encode_conversation(qwen, conv, first + 10)
    assert len(cut.input_ids) == first + 10 and sum(cut.completion_mask) == 10
    assert cut.assistant_turns == 1 and cut.turns_cut
    assert encode_conversation(qwen, conv, first) is None  # the answer's first token is beyond the window
    assert encode_conversation(qwen, chat("Only a question"), 4096) is None


# ---------------------------------------------------------------------------- templates and refusals

def test_no_chat_template_is_refused():
    with pytest.raises(UserError) as caught:
        encode_conversation(with_template("tiny-qwen2", None), THREE_TURNS, 4096)
    assert str(caught.value) == NO_TEMPLATE


def test_a_template_error_is_one_line(stories):
    conv = Conversation([{"role": "user", "content": "x"}, {"role": "critic", "content": "y"},
                         {"role": "assistant", "content": "z"}])
    with pytest.raises(UserError) as caught:
        encode_conversation(stories, conv, 4096, where="data file a.json, row 7")
    assert str(caught.value).startswith("data file a.json, row 7: the chat template refused this conversation")
    assert "Unsupported role: critic" in str(caught.value) and "\n" not in str(caught.value)


def test_a_template_that_rewrites_earlier_turns_is_located_in_the_whole_text():
    counted = with_template("tiny-qwen2", CHATML_COUNTED)
    encoded = encode_conversation(counted, THREE_TURNS, 4096)
    assert trained_runs(counted, encoded) == [a + "<|im_end|>" for a in ANSWERS] + ["<|endoftext|>"]
    assert counted.decode(encoded.input_ids).startswith("7 messages\n")
    # a user turn that says the answer's words first is not taken for the answer
    echo = chat("Blue.", "Blue.", "Again", "Blue.")
    runs = trained_runs(counted, encode_conversation(counted, echo, 4096))
    assert runs == ["Blue.<|im_end|>"] * 2 + ["<|endoftext|>"]
    # a conversation the assistant opens: transformers renders no empty conversation to be its prompt
    opened = Conversation([{"role": "assistant", "content": "Welcome!"}, {"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": "How can I help?"}])
    for tokenizer in (load_tokenizer(ModelArguments(model="tiny-qwen2")), counted):
        assert trained_runs(tokenizer, encode_conversation(tokenizer, opened, 4096)) == [
            "Welcome!<|im_end|>", "How can I help?<|im_end|>", "<|endoftext|>"]
    forgetful = with_template("tiny-qwen2", CHATML_FORGETFUL)
    with pytest.raises(UserError, match="could not be found"):
        encode_conversation(forgetful, THREE_TURNS, 4096)


# ---------------------------------------------------------------------------- any conversation, any window

MESSY = ["\u0085", "😀", "\x00", "w" * 10_000, "", " ", "\n", "Ünïcödé", "\r\n", "  lead", "trail  "]
_text = st.one_of(st.sampled_from(MESSY), st.text(max_size=30))


@settings(max_examples=60, deadline=None)
@given(turns=st.lists(st.tuples(st.sampled_from(["user", "assistant"]), _text), min_size=1, max_size=7),
       system=st.one_of(st.none(), _text), max_len=st.integers(min_value=1, max_value=400))
def test_any_conversation_fits_and_trains_only_answers(qwen, turns, system, max_len):
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": role, "content": text} for role, text in turns]
    conv = Conversation(messages)
    whole = encode_conversation(qwen, conv, 100_000)
    encoded = encode_conversation(qwen, conv, max_len)
    if not any(role == "assistant" for role, _ in turns):
        assert whole is None and encoded is None
        return
    first = whole.completion_mask.index(1)
    assert (encoded is None) == (first >= max_len)
    if encoded is None:
        return
    assert len(encoded.input_ids) <= max_len and len(encoded.completion_mask) == len(encoded.input_ids)
    assert encoded.input_ids == whole.input_ids[: len(encoded.input_ids)]
    assert encoded.turns_cut == (len(encoded.input_ids) < len(whole.input_ids))
    answers = [unicodedata.normalize("NFC", m["content"]) + "<|im_end|>" for m in messages if m["role"] == "assistant"]
    runs = trained_runs(qwen, encoded)
    for k, run in enumerate(runs):
        if k == len(runs) - 1 and encoded.turns_cut:
            run = run.rstrip("\ufffd")  # a character cut in the middle of its bytes
        assert run == "<|endoftext|>" or any(run in answer for answer in answers), run
    answer_runs = [run for run in runs if run != "<|endoftext|>"]
    assert len(answer_runs) == encoded.assistant_turns
