"""The harness's own cost: the same training through a recipe and through a plain SFTTrainer script, side by side.

  python -m harness.bench.overhead_timing --repeats 5 --model smollm2-135m --data_file data/c4_demo.jsonl \
      --max_samples 48 --max_seq_length 256 --max_steps 12

Both train the same examples with the same settings: one LoRA on the seven projections, the same seed, batch,
learning rate and schedule, fp32, padded batches, no checkpointing, no evaluation, no checkpoint saved mid-run. The recipe
(recipes/qwen2_5_0_5b_lora.py) reads the plain-text file through its own data path; the plain script
(harness/bench/plain_sft.py, TRL's trl/scripts/sft.py with a local file) hands it to SFTTrainer as it is. That the
settings really are the same is checked, not assumed: both must train the same number of non-padding tokens in the
same number of steps, and their losses are shown side by side. They take turns, repeat after repeat. Figures: the
whole process's wall time (what a user waits: imports, loading, preparing, training, saving), and Trainer.train()'s
own train_runtime. Writes results/overhead.md and overhead.json beside it.
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

from harness.bench.timing import commit_and_versions, run_whole, spread
from harness.errors import OneLineArgumentParser, UserError, reported_as_one_line
from harness.files import write_json_atomic, write_text_atomic
from harness.locations import RESULTS_DIR
from harness.models.offline import resolve_offline_model
from harness.reporting.page import model_note

RECIPE = "recipes/qwen2_5_0_5b_lora.py"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # the recipe's "all7"
WAYS = ("plain SFTTrainer script", "recipe")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog="python -m harness.bench.overhead_timing", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="Runs of each way (they take turns).")
    parser.add_argument("--model", default="smollm2-135m", help="An offline model's name (the plain script gets its folder).")
    parser.add_argument("--data_file", default="data/c4_demo.jsonl", help="Plain text, one `text` per row: both read it alike.")
    parser.add_argument("--max_samples", type=int, default=48)
    parser.add_argument("--max_seq_length", type=int, default=256)
    parser.add_argument("--max_steps", type=int, default=12)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--out", default=str(RESULTS_DIR / "overhead.md"), help="The table; its .json beside it.")
    return parser


def commands(args: argparse.Namespace, model_folder: str) -> dict[str, list[str]]:
    """The two processes, their settings written out flag by flag (the names differ: TRL's ModelConfig vs ours)."""
    shared = ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1",
              "--max_steps", str(args.max_steps), "--learning_rate", "1e-4", "--lr_scheduler_type", "cosine",
              "--warmup_steps", "0.05", "--seed", "42", "--optim", "adamw_torch", "--logging_steps", "10",
              "--lora_alpha", "16", "--lora_dropout", "0", "--report_to", "none", "--disable_tqdm", "true"]
    return {
        "plain SFTTrainer script": [
            "-m", "harness.bench.plain_sft", "--model_name_or_path", model_folder, "--dtype", "float32",
            "--data_file", args.data_file, "--max_samples", str(args.max_samples), "--max_length", str(args.max_seq_length),
            "--use_peft", "--lora_r", str(args.r), "--lora_target_modules", *TARGETS,
            "--bf16", "false", "--gradient_checkpointing", "false", "--save_strategy", "no", *shared],
        "recipe": [
            RECIPE, "--model", args.model, "--data_file", args.data_file, "--max_samples", str(args.max_samples),
            "--validation_split", "0", "--max_seq_length", str(args.max_seq_length), "--r", str(args.r),
            "--target_modules", "all7", "--activation_checkpointing", "false", "--save_steps", "100000",
            "--padding_free", "false",  # padded batches, as SFTTrainer's default (the recipe's own is padding-free)
            "--eval_on_start", "false", "--forgetting_samples", "0", *shared],
    }


def run_once(way: str, command: list[str], folder: Path) -> dict:
    wall = run_whole([*command, "--output_dir", str(folder)], f"`{shlex.join(['python', *command])}`")
    if way == "recipe":
        record = json.loads((folder / "result.json").read_text(encoding="utf-8"))
        runtime = next(e["train_runtime"] for e in reversed(record["log_history"]) if "train_runtime" in e)
        return {"wall_seconds": wall, "train_runtime": runtime, "tokens": record["tokens_trained"],
                "global_step": record["global_step"], "train_loss": record["train_loss"], "device": record["device"],
                "model": record["model"], "git": record["git"], "versions": record["versions"]}
    plain = json.loads((folder / "plain_result.json").read_text(encoding="utf-8"))
    return {"wall_seconds": wall, "train_runtime": plain["train_runtime"], "tokens": plain["num_input_tokens_seen"],
            "global_step": plain["global_step"], "train_loss": plain["train_loss"]}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    with reported_as_one_line("overhead_timing"):
        args = build_parser().parse_args(argv)
        if args.repeats < 1:
            raise UserError(f"--repeats must be at least 1, got {args.repeats}")
        model_folder = resolve_offline_model(args.model)
        if model_folder is None:
            raise UserError(f"--model {args.model!r} is not an offline model; this comparison runs offline")
        ways = commands(args, model_folder)
        runs: dict[str, list[dict]] = {way: [] for way in WAYS}
        with tempfile.TemporaryDirectory(prefix="overhead-timing-") as tmp:
            for repeat in range(args.repeats):
                for i, way in enumerate(WAYS):
                    figures = run_once(way, ways[way], Path(tmp) / f"r{repeat}-{i}")
                    runs[way].append(figures)
                    print(f"repeat {repeat + 1}/{args.repeats}, {way}: {figures['wall_seconds']:.1f} s in all, "
                          f"train_runtime {figures['train_runtime']:.1f} s", flush=True)
        plain, recipe = runs[WAYS[0]][0], runs[WAYS[1]][0]
        if (plain["tokens"], plain["global_step"]) != (recipe["tokens"], recipe["global_step"]):
            raise UserError(f"not the same training: the plain script trained {plain['tokens']} tokens in "
                            f"{plain['global_step']} steps, the recipe {recipe['tokens']} in {recipe['global_step']}")
        data = {"command": shlex.join(["python", "-m", "harness.bench.overhead_timing", *argv]),
                "ways": {way: shlex.join(["python", *command]).replace(model_folder, f"<{args.model} folder>")
                         for way, command in ways.items()},
                **{k: recipe[k] for k in ("device", "model", "git", "versions")},
                "runs": {way: [{k: r[k] for k in ("wall_seconds", "train_runtime", "tokens", "global_step",
                                                  "train_loss")} for r in rs] for way, rs in runs.items()}}
        out = Path(args.out)
        write_json_atomic(out.with_suffix(".json"), data)
        write_text_atomic(out, render(data))
        print(f"Wrote {out} and {out.with_suffix('.json').name}", flush=True)
        return 0


def render(data: dict) -> str:
    runs, git = data["runs"], data["git"] or {}
    lines = ["# The harness's own cost: a recipe against a plain SFTTrainer script", "",
             "Made with (from the repository root):", "", "```", data["command"], "```", "",
             *[f"- **{way}**: `{command}`" for way, command in data["ways"].items()],
             f"- **Device**: {data['device']}.", f"- **Model**: {model_note(data['model'])}.",
             *commit_and_versions(git, data["versions"]), "",
             "Each way is a whole process; they took turns. *Wall* is from starting the process to its exit (imports, "
             "loading, preparing the data, training, saving: what a user waits); *train_runtime* is Trainer.train()'s "
             "own figure. The ratio is recipe / plain on the medians (1.00 = no overhead); *beyond noise?* asks whether "
             "the two ranges overlap.", "",
             "| way | runs | wall s min / median / max | train_runtime s min / median / max | tokens | steps "
             "| train loss |", "|---|---|---|---|---|---|---|"]
    for way, rs in runs.items():
        lines.append(f"| {way} | {len(rs)} | {spread([r['wall_seconds'] for r in rs])} "
                     f"| {spread([r['train_runtime'] for r in rs])} | {rs[0]['tokens']} | {rs[0]['global_step']} "
                     f"| {', '.join(f'{v:.4f}' for v in sorted({round(r['train_loss'], 4) for r in rs}))} |")
    lines += ["", "| figure | recipe / plain (medians) | beyond noise? |", "|---|---|---|"]
    for figure, name in (("wall_seconds", "wall"), ("train_runtime", "train_runtime")):
        a, b = ([r[figure] for r in runs[way]] for way in WAYS)
        apart = max(a) < min(b) or min(a) > max(b)
        verdict = ("cannot tell from one run each" if min(len(a), len(b)) < 2
                   else "yes: the ranges do not overlap" if apart else "no: the ranges overlap")
        lines.append(f"| {name} | {statistics.median(b) / statistics.median(a):.3f} | {verdict} |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
