"""The same examples trained four ways: padded to a fixed length (the baseline), padded to each batch's longest,
padding-free, and packed; several runs each, side by side.

  python -m harness.bench.packing_timing --repeats 3 -- recipes/qwen2_5_0_5b_lora.py --model smollm2-135m \
      --max_samples 400 --max_steps 8 --per_device_train_batch_size 4 --max_seq_length 512

Each way runs the recipe as a whole process with its own flags added (SFTConfig's: `--padding_free false
--pad_to_multiple_of N` pads every batch to N, the window: every example to the full length as fixed-length
notebook scripts do; `--padding_free false`, the batch's longest; `--padding_free true`; `--packing true`), into a temporary folder of its own, so nothing is
resumed; the ways take turns, repeat after repeat, so a slow spell of the machine falls on all of them. From each
run's result.json: non-padding tokens per second of training, the tokens and the input positions it computed
(padding included), the training seconds, the peak memory and the final train and eval losses. Writes
results/packing.md (min / median / max per way, the speed-up over the fixed-length baseline, whether the ranges
overlap, and beside it the ideal: positions the baseline computes per real token) and packing.json beside it.
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

from harness.bench.recipe_file import read_defaults
from harness.bench.timing import commit_and_versions, run_whole, spread
from harness.errors import OneLineArgumentParser, UserError, reported_as_one_line
from harness.files import write_json_atomic, write_text_atomic
from harness.locations import RESULTS_DIR
from harness.reporting.page import model_note

BASELINE = "fixed length (pad to the window)"


def ways(window: int) -> dict[str, list[str]]:
    return {
        BASELINE: ["--padding_free", "false", "--pad_to_multiple_of", str(window)],
        "padded to the batch's longest": ["--padding_free", "false"],
        "padding-free": ["--padding_free", "true"],
        "packed (BFD)": ["--packing", "true"],
    }


FIGURES = ("tokens_per_second", "train_seconds", "tokens_trained", "positions_trained", "peak_memory_mb",
           "train_loss", "eval_loss", "global_step")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog="python -m harness.bench.packing_timing", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="Runs of each way (they take turns).")
    parser.add_argument("--out", default=str(RESULTS_DIR / "packing.md"), help="The table; its .json beside it.")
    parser.add_argument("run", nargs=argparse.REMAINDER, help="After --: the recipe script and its arguments.")
    return parser


def window_of(run_args: list[str]) -> int:
    """The run's --max_seq_length (the recipe's default when not given)."""
    if "--max_seq_length" in run_args:
        return int(run_args[run_args.index("--max_seq_length") + 1])

    return int(read_defaults(Path(run_args[0])).get("max_seq_length", 512))


def run_once(run_args: list[str], extra: list[str], folder: Path) -> dict:
    run_whole([*run_args, *extra, "--output_dir", str(folder), "--disable_tqdm", "true"],
              f"`{shlex.join(['python', *run_args, *extra])}`")
    record = json.loads((folder / "result.json").read_text(encoding="utf-8"))
    return {name: record.get(name) for name in (*FIGURES, "model", "device", "versions", "git", "data", "config",
                                                 "cpu_threads")}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    with reported_as_one_line("packing_timing"):
        args = build_parser().parse_args(argv)
        run_args = args.run[1:] if args.run[:1] == ["--"] else args.run
        if not run_args or not run_args[0].endswith(".py"):
            raise UserError("give the recipe and its arguments after --, e.g. -- recipes/qwen2_5_0_5b_lora.py "
                            "--model smollm2-135m --max_steps 8")
        if args.repeats < 1:
            raise UserError(f"--repeats must be at least 1, got {args.repeats}")
        window = window_of(run_args)
        runs: dict[str, list[dict]] = {way: [] for way in ways(window)}
        with tempfile.TemporaryDirectory(prefix="packing-timing-") as tmp:
            for repeat in range(args.repeats):
                for i, (way, extra) in enumerate(ways(window).items()):
                    figures = run_once(run_args, extra, Path(tmp) / f"r{repeat}-{i}")
                    runs[way].append(figures)
                    print(f"repeat {repeat + 1}/{args.repeats}, {way}: {figures['tokens_per_second']} tokens/s",
                          flush=True)
        first = runs[BASELINE][0]
        data = {"command": shlex.join(["python", "-m", "harness.bench.packing_timing", *argv]),
                "run": shlex.join(["python", *run_args]), "window": window, "device": first["device"],
                "model": first["model"], "git": first["git"], "versions": first["versions"], "data": first["data"],
                "cpu_threads": first["cpu_threads"],
                # each run's settings as its result.json has them: harness.plan.time_check predicts the runs from them
                "runs": {way: [{k: r.get(k) for k in (*FIGURES, "config")} for r in rs] for way, rs in runs.items()}}
        out = Path(args.out)
        write_json_atomic(out.with_suffix(".json"), data)
        write_text_atomic(out, render(data))
        print(f"Wrote {out} and {out.with_suffix('.json').name}", flush=True)
        return 0



def render(data: dict) -> str:
    runs = data["runs"]
    base = [r["tokens_per_second"] for r in runs[BASELINE]]
    git = data["git"] or {}
    lines = [
        "# Padding, padding-free and packing: the same examples, four ways",
        "",
        "Made with (from the repository root):",
        "",
        "```",
        data["command"],
        "```",
        "",
        f"- **The run**: `{data['run']}`, window {data['window']} tokens, each way a whole recipe process into a "
        "folder of its own (nothing resumed); the ways took turns, repeat after repeat.",
        f"- **Device**: {data['device']}"
        + (f", {data['cpu_threads']} CPU thread(s) per run" if data.get("cpu_threads") else "") + ".",
        f"- **Model**: {model_note(data['model'])}.",
        f"- **Data**: `{(data['data'] or {}).get('data_file')}`, {(data['data'] or {}).get('train_examples')} "
        "training examples.",
        *commit_and_versions(git, data["versions"]),
        "",
        "Tokens/s counts the non-padding tokens trained on per second of training (optimizer steps only); positions "
        "are what the model computed, padding included. The ideal speed-up is the baseline's positions per real "
        "token: what removing every padded position could give if a position cost the same however it is batched. "
        "Packing puts several examples in a row, so an epoch takes fewer, larger optimizer steps: its losses differ "
        "for that reason.",
        "",
        "| way | runs | tokens/s min / median / max | speed-up (median) | beyond noise? | positions / token | ideal "
        "| train s (median) | peak MiB (median) | train loss | eval loss | optimizer steps |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base_positions = runs[BASELINE][0]["positions_trained"]
    for way, rs in runs.items():
        speeds = [r["tokens_per_second"] for r in rs]
        if way == BASELINE:
            speedup, verdict = "(baseline)", ""
        else:
            speedup = f"{statistics.median(speeds) / statistics.median(base):.2f}x"
            apart = max(speeds) < min(base) or min(speeds) > max(base)
            verdict = ("cannot tell from one run each" if min(len(speeds), len(base)) < 2
                       else "yes: the ranges do not overlap" if apart else "no: the ranges overlap")
        tokens, positions = rs[0]["tokens_trained"], rs[0]["positions_trained"]
        ratio = f"{positions / tokens:.2f}" if tokens and positions else ""
        ideal = f"{base_positions / positions:.2f}x" if positions and base_positions else ""
        losses = sorted({r["train_loss"] for r in rs})
        evals = sorted({r["eval_loss"] for r in rs if r["eval_loss"] is not None})
        lines.append(
            f"| {way} | {len(rs)} | {spread(speeds)} | {speedup} | {verdict} | {ratio} | {ideal} "
            f"| {statistics.median(r['train_seconds'] for r in rs):.1f} "
            f"| {statistics.median(r['peak_memory_mb'] for r in rs if r['peak_memory_mb'] is not None):.0f} "
            f"| {', '.join(f'{v:.4f}' for v in losses)} | {', '.join(f'{v:.4f}' for v in evals)} "
            f"| {rs[0].get('global_step') or ''} |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
