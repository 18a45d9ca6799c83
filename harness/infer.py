"""Generate text with a trained adapter: one prompt, or an interactive multi-turn chat.

    python -m harness.infer --base Qwen/Qwen2.5-0.5B-Instruct --adapter outputs/qwen2_5_0_5b_lora --prompt "Name three primary colours."
    python -m harness.infer --adapter outputs/qwen2_5_0_5b_qlora --load-in-4bit --chat   # base from the run's result.json
    python -m harness.infer --base outputs/qwen2_5_0_5b_full --chat                      # a fully fine-tuned model
    python -m harness.infer --base stories260k --prompt "Once upon a time"              # offline, no adapter

Prompts are laid out the way the run that trained the adapter laid them out (its result.json
records the prompt format): the base model's chat template, or the Alpaca / Human-Assistant text
layout for models without one. --chat keeps the conversation; /reset starts over; Ctrl-D, Ctrl-C
or /exit leave. A reply never runs past the positions the model has (its max_position_embeddings, where
no RoPE scaling stretches it): --max_new_tokens is capped at what is left after the prompt, said on stderr.
"""
from __future__ import annotations

import argparse
import math
import sys

from harness.errors import OneLineArgumentParser, UserError, reported_as_one_line

PROMPT_FORMAT_CHOICES = ("auto", "chat_template", "alpaca", "human_assistant")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog="python -m harness.infer", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--base", help="Hub id, local folder or offline model name (default: the one the adapter's run recorded)")
    add("--adapter", help="folder holding adapter_config.json (a recipe's output_dir); "
                          "leave out for a plain or fully fine-tuned model")
    add("--load-in-4bit", "--load_in_4bit", dest="load_in_4bit", action="store_true",
        help="load the base in 4-bit NF4, as the QLoRA recipes trained it (needs bitsandbytes)")
    add("--dtype", default="auto", help="auto | bfloat16 | float16 | float32 (auto: bf16/fp16 on GPU, fp32 on CPU)")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--prompt", help="generate one reply to this text and exit")
    mode.add_argument("--chat", action="store_true", help="interactive multi-turn chat on the terminal")
    add("--system", help="system message, for chat templates that have one")
    add("--prompt_format", choices=PROMPT_FORMAT_CHOICES,
        help="prompt layout (default: the one the adapter was trained with, else auto)")
    add("--max_new_tokens", type=int, default=256, help="longest reply, in tokens")
    add("--temperature", type=float, default=0.7, help="sampling temperature; 0 = greedy (deterministic)")
    add("--top_p", type=float, default=0.9, help="nucleus sampling: smallest token set with this much probability")
    add("--top_k", type=int, default=50, help="sample among the k most likely tokens (0: no limit)")
    add("--seed", type=int, help="seed for sampling, for repeatable replies")
    add("--trust_remote_code", action="store_true", help="run code shipped with the model repo (only for repos you trust)")
    return parser


def check_options(args) -> None:
    if args.max_new_tokens < 1:
        raise UserError(f"--max_new_tokens must be at least 1, got {args.max_new_tokens}")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise UserError(f"--temperature must be a finite number >= 0 (0 is greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:  # nan fails every comparison, so it is refused here too
        raise UserError(f"--top_p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0:
        raise UserError(f"--top_k must be >= 0, got {args.top_k}")
    if args.seed is not None and not 0 <= args.seed <= 2**32 - 1:
        raise UserError(f"--seed must be in [0, {2**32 - 1}], got {args.seed}")


def load_for_generation(args):
    """(model, tokenizer, data settings for the prompt layout)."""
    # imported here, not at the top: --help and one-line refusals answer without importing torch
    from harness.models.adapters import attach, check_fits, open_adapter
    from harness.models.loading import load_config, load_model, load_tokenizer, position_limit
    from harness.run.config import DataArguments, ModelArguments

    adapter = open_adapter(args.adapter) if args.adapter else None
    if adapter is None and not args.base:
        raise UserError("pass --base (a model) and/or --adapter (a trained adapter folder)")
    base = adapter.base_model(args.base) if adapter else args.base
    model_args = ModelArguments(
        model=base,
        quantization="4bit" if args.load_in_4bit else "none",
        dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
    )
    tokenizer = load_tokenizer(model_args)  # the base's tokenizer and chat template
    data_args = adapter.data_arguments() if adapter else DataArguments(task="instruction", prompt_format="auto")
    if args.prompt_format:
        data_args.prompt_format = args.prompt_format
    if args.prompt is not None:  # a prompt that leaves no room is refused, a cap said, before the weights load
        reply_length(args, len(prompt_ids(tokenizer, data_args, first_messages(args))["input_ids"][0]),
                     position_limit(load_config(model_args)))
    if adapter:
        check_fits(adapter, model_args, base)  # an adapter for another base is refused before the weights load
    if adapter and adapter.trained_quantization == "4bit" and not args.load_in_4bit:
        print("note: this adapter was trained on a 4-bit base; --load-in-4bit reproduces that base exactly",
              file=sys.stderr)
    model = load_model(model_args, "lora", gradient_checkpointing=False, for_training=False)
    if adapter:
        model = attach(model, adapter, base)
    model.eval()
    return model, tokenizer, data_args


def first_messages(args) -> list[dict]:
    """The conversation --prompt starts: the system message, if any, and the prompt."""
    system = [{"role": "system", "content": args.system}] if args.system else []
    return system + [{"role": "user", "content": args.prompt}]


def prompt_ids(tokenizer, data_args, messages: list[dict]):
    """The prompt for the next assistant turn, tokenized exactly as training tokenized its prompts (special
    tokens included)."""
    from harness.data.examples import generation_prompt

    # verbose=False: a prompt longer than the model's positions is said in one line of this tool's (reply_length)
    return tokenizer(generation_prompt(messages, data_args, tokenizer), return_tensors="pt", verbose=False)


class ConversationTooLong(UserError):
    """The prompt fills every position the model has: nothing can be generated after it."""


def reply_length(args, prompt_tokens: int, positions: int | None) -> int:
    """--max_new_tokens, capped at the positions the model has left after the prompt (said once, on stderr):
    past them a model with learned positions fails and a RoPE model without scaling writes on untrained ones."""
    if positions is None or prompt_tokens + args.max_new_tokens <= positions:
        return args.max_new_tokens
    room = positions - prompt_tokens
    if room < 1:
        raise ConversationTooLong(f"the prompt takes {prompt_tokens:,} tokens, and the model has {positions:,} "
                                  "positions in all: none is left for a reply; shorten the prompt")
    if not getattr(args, "cap_said", False):
        sys.stdout.flush()
        print(f"infer: --max_new_tokens {args.max_new_tokens} capped at {room:,} (the model has {positions:,} "
              f"positions and the prompt takes {prompt_tokens:,})", file=sys.stderr, flush=True)
        args.cap_said = True
    return room


def reply(model, tokenizer, data_args, messages: list[dict], args) -> str:
    """Generate the next assistant turn for `messages` and print it (as it comes, where possible)."""
    import torch
    from transformers import TextStreamer

    # imported here, not at the top: --help and one-line refusals answer without importing torch
    from harness.data.examples import stop_strings
    from harness.models.loading import position_limit

    inputs = prompt_ids(tokenizer, data_args, messages).to(next(model.parameters()).device)
    options = dict(
        max_new_tokens=reply_length(args, inputs["input_ids"].shape[1], position_limit(model.config)),
        do_sample=args.temperature > 0,
        pad_token_id=tokenizer.pad_token_id,
    )
    if args.temperature > 0:
        options.update(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    stops = stop_strings(data_args, tokenizer)
    if stops:
        options.update(stop_strings=stops, tokenizer=tokenizer)
    else:  # streamed text cannot be taken back, so only stream when no stop string needs cutting off
        options["streamer"] = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    with torch.no_grad():
        output = model.generate(**inputs, **options)
    text = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    for stop in stops:
        text = text.split(stop)[0]
    if stops:
        print(text.strip(), flush=True)
    return text.strip()


def chat(model, tokenizer, data_args, args) -> None:
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = list(system)
    print("Chat: type a message and press Enter. /reset starts over; Ctrl-D, Ctrl-C or /exit leave.")
    while True:
        try:
            text = input("you> ").strip()
        except (EOFError, KeyboardInterrupt, OSError):  # Ctrl-D, Ctrl-C, a terminal gone: the session ends
            print()
            return
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            history = list(system)
            print("(conversation cleared)")
            continue
        history.append({"role": "user", "content": text})
        print("model> ", end="", flush=True)
        try:
            answer = reply(model, tokenizer, data_args, history, args)
        except KeyboardInterrupt:  # stop a long reply, keep the session
            print("\n(reply interrupted)")
            history.pop()
            continue
        except ConversationTooLong as exc:
            print(f"\n({exc}: /reset starts over)")
            history.pop()
            continue
        history.append({"role": "assistant", "content": answer})


def main(argv: list[str] | None = None) -> int:
    with reported_as_one_line("infer"):
        args = build_parser().parse_args(argv)
        check_options(args)
        if args.chat and sys.stdin is None:  # started with stdin closed (`<&-`): no message can come
            print("Chat: stdin is closed, so there is nothing to answer; bye.")
            return 0
        if args.seed is not None:
            from transformers import set_seed

            set_seed(args.seed)
        model, tokenizer, data_args = load_for_generation(args)
        if args.chat:
            chat(model, tokenizer, data_args, args)
        else:
            reply(model, tokenizer, data_args, first_messages(args), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
