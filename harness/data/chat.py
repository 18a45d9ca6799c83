"""A conversation as tokens, with the loss on every assistant turn (not only the last one).

The tokenizer's own chat template lays the conversation out. The text assistant turn i adds is what the
template writes for it after the generation prompt: from the end of render(messages[:i], generation
prompt) to the end of render(messages[:i+1]), trailing whitespace excluded. That keeps the
end-of-turn token the template writes after the answer (`<|im_end|>`, `</s>`), so the model learns to
stop, and leaves out the generation prompt (`<|im_start|>assistant\n`), which is the prompt's, and
the newline after the end-of-turn, which the next turn's layout owns. The full text is tokenized
once; character spans become token spans through the tokenizer's offsets.

For a one-turn conversation that fits, the tokens are those harness.data.examples.encode builds for the same
instruction (same text, same appended EOS), with two differences: the newline after the end-of-turn token
carries no loss here, and a template that writes its own BOS is not given a second one by the tokenizer.
To fit max_len, harness.data.reading cuts an Alpaca input first; here whole turns are kept or dropped.
"""
from __future__ import annotations

import bisect
import weakref
from dataclasses import dataclass

from harness.data.formats import Conversation
from harness.errors import UserError

NO_TEMPLATE = ("this tokenizer has no chat template; conversations need one: use a model with one or pass "
               "--chat_template_path FILE.jinja")


@dataclass
class EncodedConversation:
    input_ids: list[int]
    completion_mask: list[int]  # 1: the token carries loss (an assistant turn's, or the appended EOS)
    assistant_turns: int  # assistant turns that start within the kept tokens
    turns_cut: bool  # later turns, or the end of an answer, were dropped to fit max_len


@dataclass
class _TokenizerFacts:
    template: str  # the template source(s), to see whether it knows about tools
    bos_prefix: list[int]  # what the tokenizer puts before a text by itself (add_special_tokens=True)


# Per tokenizer, computed once: a run encodes thousands of conversations with the same tokenizer.
_FACTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _facts(tokenizer) -> _TokenizerFacts:
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise UserError(NO_TEMPLATE)
    source = template if isinstance(template, str) else " ".join(map(str, dict(template).values()))
    cached = _FACTS.get(tokenizer)
    if cached is not None and cached.template == source:
        return cached
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"the tokenizer {type(tokenizer).__name__} is not a fast (Rust) tokenizer, so it cannot "
                        "tell where each token sits in the text; conversations need a fast tokenizer")
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    special = tokenizer("a", add_special_tokens=True)["input_ids"]
    # harness.data.reading tokenizes prompts with add_special_tokens=True: a BOS the tokenizer adds is kept, unless
    # the template already wrote it (stories260k's writes <s>; adding one more would double it).
    at = next((k for k in range(len(special) - len(bare) + 1) if special[k: k + len(bare)] == bare), 0)
    prefix = special[:at]  # (an EOS some tokenizers also add at the end is appended below, by add_eos)
    facts = _TokenizerFacts(source, prefix)
    try:
        _FACTS[tokenizer] = facts
    except TypeError:  # not weak-referenceable: recompute next time
        pass
    return facts


def _uses_tools(conv: Conversation) -> bool:
    return bool(conv.tools) or any(m.get("tool_calls") or m.get("role") == "tool" for m in conv.messages)


def _render(tokenizer, messages: list[dict], tools: list[dict] | None, generation_prompt: bool, where: str) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except Exception as exc:  # jinja2's TemplateError (raise_exception in the template), TypeError on odd values
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise UserError(f"{where}the chat template refused this conversation ({reason}); fix the row or use a "
                        "template that accepts it") from None


_PROBE = {"role": "user", "content": "\u2063"}  # invisible separator: a user turn that says nothing


def _segment(tokenizer, conv: Conversation, turn: int, head: str, alone: str, where: str) -> str:
    """What the template writes for assistant turn `turn` (answer + end-of-turn), when the renders of the
    conversation up to it do not extend each other: from a one-turn probe conversation instead."""
    if alone.startswith(head) and turn > 0:
        return alone[len(head):]
    head = _render(tokenizer, [_PROBE], conv.tools, True, where)
    alone = _render(tokenizer, [_PROBE, conv.messages[turn]], conv.tools, False, where).rstrip()
    return alone[len(head):] if alone.startswith(head) else ""


def _locate(full: str, conv: Conversation, turn: int, alone: str, segment: str, cursor: int,
            previous: int) -> tuple[int, int] | None:
    """Where assistant turn `turn` sits in the full text when the template rewrites earlier turns.

    `previous` is the message index after the last located assistant turn; the messages between are found
    first (in order, from `cursor`) so that a user turn that happens to say the same words is not taken for the
    answer. The whole `segment` (answer + end-of-turn) is looked for first, then the answer alone, extended by
    what the template writes after it in `alone` (the render that ends with this turn)."""
    for message in conv.messages[previous:turn]:  # bounded by the conversation's length
        text = message.get("content") or ""
        found = full.find(text, cursor) if text.strip() else -1
        if found >= 0:
            cursor = found + len(text)
    answer = conv.messages[turn].get("content") or ""
    # a blank answer's segment is only the end-of-turn token, which every turn has: it would be found anywhere
    if segment.strip() and (answer.strip() or conv.messages[turn].get("tool_calls")):
        start = full.find(segment, cursor)
        if start >= 0:
            return start, start + len(segment)
    start = full.find(answer, cursor) if answer.strip() else -1
    if start < 0:
        return None
    end = start + len(answer)
    # `alone` (the conversation rendered up to this answer, trailing whitespace off) ends with the answer and
    # whatever the template writes after it: the end-of-turn token, trained with the answer
    at = alone.rfind(answer)
    suffix = alone[at + len(answer):] if at >= 0 else ""
    return start, end + len(suffix) if suffix and full.startswith(suffix, end) else end


def _assistant_spans(tokenizer, conv: Conversation, last: int, where: str) -> tuple[str, list[tuple[int, int]]]:
    """The conversation's text up to its last assistant turn, and each assistant turn's character span in it."""
    full = _render(tokenizer, conv.messages[: last + 1], conv.tools, False, where)
    spans: list[tuple[int, int]] = []
    cursor, previous = 0, 0
    for i, message in enumerate(conv.messages[: last + 1]):
        if message.get("role") != "assistant":
            continue
        # transformers renders no empty conversation: a first turn that is the assistant's has no head of its own
        head = _render(tokenizer, conv.messages[:i], conv.tools, True, where) if i else None
        upto = full if i == last else _render(tokenizer, conv.messages[: i + 1], conv.tools, False, where)
        end = len(upto.rstrip())
        if head is not None and full.startswith(head) and full.startswith(upto) and cursor <= len(head) <= end:
            span = (len(head), end)
        else:  # the template writes earlier turns differently inside a longer conversation (or no prefix at all)
            segment = _segment(tokenizer, conv, i, head or "", upto[:end], where)
            if segment and full.startswith(upto) and upto.endswith(segment, 0, end) and cursor <= end - len(segment):
                span = (end - len(segment), end)  # the renders do extend each other; only the head was missing
            else:
                span = _locate(full, conv, i, upto[:end], segment, cursor, previous)
            if span is None or span[0] < cursor:
                raise UserError(
                    f"{where}the chat template writes assistant turn {len(spans) + 1} differently inside the whole "
                    "conversation than on its own, and its answer could not be found in the rendered text; "
                    "use a template that writes earlier turns unchanged")
        spans.append(span)
        cursor, previous = span[1], i + 1
    return full, spans


def encode_conversation(tokenizer, conv: Conversation, max_len: int, add_eos: bool = True, *,
                        where: str = "") -> EncodedConversation | None:
    """Tokens of the conversation through its last assistant turn, the loss on every assistant turn; cut to max_len
    after the last whole assistant turn that fits. None when not even the first assistant turn starts within
    max_len (or there is no assistant turn): the caller leaves such rows out. `where` ("data file x, row 3")
    prefixes error messages."""
    where = f"{where}: " if where else ""
    facts = _facts(tokenizer)
    if _uses_tools(conv) and "tools" not in facts.template and "tool_calls" not in facts.template:
        raise UserError(f"{where}the conversation uses tools (tool calls or tool results) but this tokenizer's chat "
                        "template has no tool support; use a model whose template has one, or --chat_template_path")
    if any(m.get("tool_calls") for m in conv.messages) and "tool_calls" not in facts.template:
        raise UserError(f"{where}the conversation has tool calls but this tokenizer's chat template does not write "
                        "tool_calls (they would be dropped); use a template that does, or --chat_template_path")
    assistants = [i for i, m in enumerate(conv.messages) if m.get("role") == "assistant"]
    if not assistants:
        return None
    # Turns after the last answer carry no loss: they are not rendered at all.
    full, spans = _assistant_spans(tokenizer, conv, assistants[-1], where)
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids, offsets = list(encoded["input_ids"]), encoded["offset_mapping"]
    # Token k is an answer's when its span starts inside the answer's characters. Token starts never go back,
    # so each answer's tokens are one slice, found by bisection. Zero-width tokens (a special token the
    # tokenizer itself added) take the previous start, to keep the order, and never carry loss.
    starts = [start for start, _ in offsets]
    zero_width = [k for k, (start, stop) in enumerate(offsets) if stop <= start]
    for k in zero_width:  # in order, so a run of them all take the start before the run
        starts[k] = starts[k - 1] if k else 0
    mask = [0] * len(ids)
    token_spans = []
    for start, stop in spans:
        a, b = bisect.bisect_left(starts, start), bisect.bisect_left(starts, stop)
        mask[a:b] = [1] * (b - a)
        token_spans.append((a, b))
    for k in zero_width:
        mask[k] = 0
    if facts.bos_prefix and ids[: len(facts.bos_prefix)] != facts.bos_prefix:
        ids, mask = facts.bos_prefix + ids, [0] * len(facts.bos_prefix) + mask
        token_spans = [(a + len(facts.bos_prefix), b + len(facts.bos_prefix)) for a, b in token_spans]
    eos = tokenizer.eos_token_id
    trained = [t for t, m in zip(ids[token_spans[-1][0]: token_spans[-1][1]], mask[token_spans[-1][0]:]) if m]
    if add_eos and eos is not None and (not trained or trained[-1] != eos):
        ids, mask = ids + [eos], mask + [1]  # after the template's text, as harness.data.examples.encode appends it
    if len(ids) <= max_len:
        return EncodedConversation(ids, mask, len(token_spans), False)
    fitting = [b for a, b in token_spans if a < b <= max_len]
    if fitting:
        cut = fitting[-1]  # after the last whole answer that fits: no half turn, no prompt without its answer
    elif token_spans[0][0] < max_len:
        cut = max_len  # the first answer alone overflows: keep its beginning, as harness.data.reading does
    else:
        return None
    return EncodedConversation(ids[:cut], mask[:cut], sum(a < cut for a, _ in token_spans), True)
