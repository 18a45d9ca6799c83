"""Will it fit? Planned peak GPU memory before anything is downloaded (only a config.json, or nothing for the
recipes' own models).

  python -m harness.plan --model Qwen/Qwen2-7B-Instruct --gpu T4      # every method x rank: fits or not
  python -m harness.plan recipes/qwen2_7b_adalora.py --gpu 16         # one recipe, its defaults + any flags
  python -m harness.plan recipes/llama2_7b_lora.py --r 32 --max_seq_length 2048 --per_device_train_batch_size 2
  python -m harness.plan --model smollm2-135m --ranks 8 --json        # for machines

Any recipe setting can follow (--r, --quantization, --max_seq_length, --optim, ...). Without a recipe
the table uses the 7B recipes' T4 training (batch 1, 512 tokens, checkpointing, paged 8-bit AdamW).
How each part is computed, and how accurate it is: harness/plan/memory.py and docs/will-it-fit.md.
"""
from __future__ import annotations

import argparse
import json
import sys

from harness.errors import raise_usage_error, reported_as_one_line
from harness.plan.method_table import build_plans, step_time, step_works


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m harness.plan [RECIPE]", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.error = raise_usage_error
    parser.add_argument("--gpu", help="a GPU name (T4, L4, A10G, RTX 4090, A100-80, H100, ...) or its memory in GiB; "
                                      "default: this machine's GPU, if any")
    parser.add_argument("--ranks", default="4,8,16,32", help="ranks for the table of every method (no recipe)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    parser.add_argument("--published", action="store_true",
                        help="the planner beside the memory figures others published (results/plan_vs_published.md)")
    return parser


def main(argv: list[str] | None = None) -> int:
    with reported_as_one_line("plan"):
        argv = list(sys.argv[1:] if argv is None else argv)
        # A recipe file comes first; a parser positional would also take the value of an unknown flag.
        recipe = argv.pop(0) if argv and not argv[0].startswith("-") else None
        options, settings = _parser().parse_known_args(argv)
        options.recipe = recipe
        # imported here, not at the top: --help and one-line refusals answer without importing torch
        from harness.models.loading import quiet_libraries

        if options.published:
            # imported here, not at the top: --help and one-line refusals answer without importing torch
            from harness.plan.published import table

            with quiet_libraries():
                print(table())
            return 0
        gpu = _gpu(options.gpu)
        with quiet_libraries():
            plans, table, config, cfgs = build_plans(options, settings)
        if options.json:
            with quiet_libraries():  # the work of one optimizer step, counted on the same meta model
                works = step_works(cfgs, config)
            spec = options.gpu if options.gpu is not None else gpu and gpu[0]  # torch's name of this GPU
            print(json.dumps({"gpu": gpu and {"name": gpu[0], "bytes": int(gpu[1] * 2**30)},
                              "plans": [{**p.to_dict(), **w.to_dict(), **step_time(w, cfg, spec)}
                                        for p, w, cfg in zip(plans, works, cfgs)]}, indent=1))
        else:
            print(_table(plans, gpu, config.hidden_size) if table else _breakdown(plans[0], gpu))
    return 0


def _gpu(spec: str | None):
    # imported here, not at the top: --help and one-line refusals answer without importing torch
    from harness.plan.gpus import gpu_memory

    if spec is not None:
        return gpu_memory(spec)
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return props.name, props.total_memory / 2**30
    return None


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def _table(plans, gpu, hidden_size: int) -> str:
    from tabulate import tabulate

    gpu_bytes = gpu[1] * 2**30 if gpu else None
    rows = []
    for p in plans:
        row = {
            "method": p.label, "rank": p.rank if p.rank is not None else "",
            "trainable (M)": f"{p.trainable_params / 1e6:.2f}",
            "weights": _gib(p.bytes_of("weights", *(["trainable parameters"] if p.method == "full" else []))),
            "grads + optimizer": _gib(p.bytes_of("gradients", "optimizer states", "AdaLoRA importance scores")),
            "activations": _gib(p.bytes_of("activations saved for backward")),
            "planned peak (GiB)": _gib(p.total_bytes),
        }
        if gpu_bytes:
            row[f"fits {gpu[0]}"] = "yes" if p.fits(gpu_bytes) else "no"
            row["largest batch"] = p.max_batch_size(gpu_bytes)
            longest = p.max_seq_length(gpu_bytes)
            row["longest sequence"] = longest if longest is not None else ""
        rows.append(row)
    first = plans[0]
    head = (f"Planned peak GPU memory of {first.model}: {first.seq_length} tokens, batch {first.batch_size}, "
            f"{first.optim}, checkpointing {'on' if first.checkpointing else 'off'}, {first.compute_dtype} compute"
            + (f", on {gpu[0]} ({gpu[1]:.1f} GiB)" if gpu else "") + ".\n\n")
    ranks = _largest_ranks(plans, gpu_bytes, hidden_size) if gpu_bytes else ""
    return head + tabulate(rows, headers="keys", tablefmt="github", disable_numparse=True) + "\n\n" + ranks + _legend()


def _largest_ranks(plans, gpu_bytes: float, hidden_size: int) -> str:
    """The largest rank of each ranked method that fits, at the table's batch and length: every byte a rank
    adds (adapter, its gradients and optimizer state, its activations) grows linearly with it, so the
    line through the smallest and largest planned rank gives it. A rank above the hidden size adds nothing
    (an update of a hidden x hidden matrix has at most that rank), so the search stops there."""
    by_method: dict[str, list] = {}
    for p in plans:
        if p.rank is not None:
            by_method.setdefault(p.label, []).append(p)
    found = []
    for label, group in by_method.items():
        low, high = min(group, key=lambda p: p.rank), max(group, key=lambda p: p.rank)
        if high.rank == low.rank or high.total_bytes <= low.total_bytes:
            continue
        per_rank = (high.total_bytes - low.total_bytes) / (high.rank - low.rank)
        largest = int(low.rank + (gpu_bytes - low.total_bytes) // per_rank)
        found.append(f"{label}: none" if largest < 1 else f"{label} {largest:,}" if largest < hidden_size
                     else f"{label} any (up to the hidden size, {hidden_size:,})")
    return f"Largest rank that fits: {'; '.join(found)}.\n\n" if found else ""


def _breakdown(p, gpu) -> str:
    from tabulate import tabulate

    rows = [{"part": part.name, "GiB": _gib(part.bytes), "how": part.how} for part in p.parts if part.bytes]
    rows.append({"part": "planned peak", "GiB": _gib(p.total_bytes), "how": ""})
    rank = f" rank {p.rank}" if p.rank is not None else ""
    head = (f"{p.model}, {p.method}{rank}, quantization {p.quantization}: {p.trainable_params / 1e6:.2f} M trainable of "
            f"{p.total_params / 1e6:.0f} M; {p.seq_length} tokens, batch {p.batch_size}, {p.optim}, "
            f"checkpointing {'on' if p.checkpointing else 'off'}, {p.compute_dtype} compute.\n\n")
    text = head + tabulate(rows, headers="keys", tablefmt="github", disable_numparse=True) + "\n"
    if gpu:
        gpu_bytes = gpu[1] * 2**30
        margin = (gpu_bytes - p.total_bytes) / 2**30
        verdict = f"fits, {margin:.2f} GiB to spare" if margin >= 0 else f"does not fit: {-margin:.2f} GiB over"
        longest = p.max_seq_length(gpu_bytes)
        text += (f"\n{gpu[0]} ({gpu[1]:.1f} GiB): {verdict}; the largest batch that fits at {p.seq_length} tokens: "
                 f"{p.max_batch_size(gpu_bytes)}" + (f"; the longest sequence at batch {p.batch_size}: {longest:,} tokens"
                                                     if longest is not None else "") + ".\n")
    return text + "\n" + _legend()


def _legend() -> str:
    return ("counted: from the model's tensors, built on the meta device with the run's real PEFT config; "
            "formula: bitsandbytes' storage formats; modelled: fused attention, transient buffers, CUDA context "
            "(not yet checked against a GPU).")


if __name__ == "__main__":
    sys.exit(main())
