"""The wall time of one sweep run three ways: one trial at a time, `--parallel 2`, and on a local Ray.

  python -m harness.bench.executor_timing --repeats 3 -- --model stories260k --ranks 4,8 --no-baseline

Each way runs `python -m harness.bench <the sweep's arguments>` as a whole process (imports, planning,
Ray's start-up and the tables included: what a user waits for), into folders of its own under a
temporary directory, so nothing is resumed and nothing in results/runs.jsonl changes; the ways take
turns, repeat after repeat, so a slow spell of the machine falls on all of them. Writes
results/bench_executors.md (min / median / max per way, the speed-up over one at a time, whether the
ranges overlap) and bench_executors.json beside it, and checks that the three ways' tables give every
trial the same losses and scores.
"""
from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

from harness.bench.timing import commit_and_versions, run_whole
from harness.errors import OneLineArgumentParser, UserError, reported_as_one_line
from harness.files import write_json_atomic, write_text_atomic
from harness.locations import RESULTS_DIR
from harness.reporting.page import model_note
from harness.reporting.runs import RUNS_FILE, read_records
from harness.reporting.tables import latest_per_trial, ok_rows
from harness.run.measure import device_name, git_state, versions

WAYS = {  # name -> extra harness.bench arguments
    "one at a time": [],
    "--parallel 2": ["--parallel", "2"],
    f"a new local Ray ({os.cpu_count()} CPUs)": ["--executor", "ray", "--ray-address", "local"],
}
# What depends on timing or on where a trial ran, left out when the three tables are compared.
MEASURED = ("peak", "memory", "RSS", "(s)", "tokens/s", "MFU", "CUDA", "NVML", "planned", "measured", "device")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog="python -m harness.bench.executor_timing",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="Runs of each way (they take turns).")
    parser.add_argument("--out", default=str(RESULTS_DIR / "bench_executors.md"),
                        help="The table; its .json goes beside it.")
    parser.add_argument("sweep", nargs=argparse.REMAINDER, help="After --: the harness.bench arguments of the sweep.")
    return parser


def comparable_rows(records: list[dict]) -> list[dict]:
    """A sweep's table rows without what depends on timing or on where a trial ran."""
    rows = ok_rows(latest_per_trial(records))
    kept = [{k: v for k, v in row.items() if not k.startswith("_") and not any(m in k for m in MEASURED)}
            for row in rows]
    return sorted(kept, key=str)


def run_way(extra: list[str], sweep_args: list[str], folder: Path) -> tuple[float, Path]:
    results = folder / "results"
    command = [sys.executable, "-m", "harness.bench", *sweep_args, *extra, "--name", "timing", "--quiet",
               "--results-dir", str(results), "--output-root", str(folder / "outputs")]
    wall = run_whole(command, f"the sweep `{shlex.join(['python', '-m', 'harness.bench', *sweep_args, *extra])}`")
    return wall, results


def main(argv: list[str] | None = None) -> int:
    from importlib.metadata import version


    argv = list(sys.argv[1:] if argv is None else argv)
    with reported_as_one_line("executor_timing"):
        args = build_parser().parse_args(argv)
        sweep_args = args.sweep[1:] if args.sweep[:1] == ["--"] else args.sweep
        if not sweep_args:
            raise UserError("give the sweep after --, e.g. -- --model stories260k --ranks 4,8 --no-baseline")
        if args.repeats < 1:
            raise UserError(f"--repeats must be at least 1, got {args.repeats}")
        walls: dict[str, list[float]] = {way: [] for way in WAYS}
        trial_walls: dict[str, list[float]] = {way: [] for way in WAYS}
        models: set[str] = set()
        tables: dict[str, list] = {}
        with tempfile.TemporaryDirectory(prefix="executor-timing-") as tmp:
            for repeat in range(args.repeats):
                for i, (way, extra) in enumerate(WAYS.items()):
                    wall, results = run_way(extra, sweep_args, Path(tmp) / f"r{repeat}-{i}")
                    records = read_records(results / RUNS_FILE)
                    walls[way].append(round(wall, 1))
                    tables.setdefault(way, comparable_rows(records))
                    trial_walls[way] += [r["wall_seconds"] for r in records if r.get("wall_seconds")]
                    models.update(r["model"] for r in records)
                    print(f"repeat {repeat + 1}/{args.repeats}, {way}: {wall:.1f} s", flush=True)
        same = all(rows == tables["one at a time"] for rows in tables.values())
        command = shlex.join(["python", "-m", "harness.bench.executor_timing", *argv])
        data = {"command": command, "sweep": shlex.join(["python", "-m", "harness.bench", *sweep_args]),
                "device": device_name(), "git": git_state(), "versions": {**versions(), "ray": version("ray")},
                "models": sorted(models), "wall_seconds": walls, "trial_wall_seconds": trial_walls,
                "trials": len(tables["one at a time"]), "same_scores_every_way": same}
        out = Path(args.out)
        write_json_atomic(out.with_suffix(".json"), data)
        write_text_atomic(out, render(data))
        print(f"Wrote {out} and {out.with_suffix('.json').name}", flush=True)
        return 0 if same else 1


def render(data: dict) -> str:
    walls = data["wall_seconds"]
    serial = walls["one at a time"]
    git = data["git"] or {}
    lines = [
        "# One sweep, three ways to run it: wall time",
        "",
        "Made with (from the repository root):",
        "",
        "```",
        data["command"],
        "```",
        "",
        f"- **The sweep**: `{data['sweep']}`, {data['trials']} trials, each way into folders of its own (nothing "
        "resumed); the wall time is the whole `python -m harness.bench` process: imports, planning, Ray's start-up, "
        "the trials and the tables. The ways took turns, repeat after repeat.",
        f"- **Device**: {data['device']}.",
        f"- **Model**: {', '.join(model_note(m) for m in data['models'])}.",
        *commit_and_versions(git, data["versions"]),
        f"- **Same results every way**: {'yes' if data['same_scores_every_way'] else '**no**'} (every trial's "
        "losses, scores and parameter counts in the three tables).",
        "",
        "| way | runs | wall min (s) | wall median (s) | wall max (s) | speed-up over one at a time (median) | beyond noise? "
        "| a trial's own wall, mean (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for way, values in walls.items():
        median = statistics.median(values)
        if way == "one at a time":
            speedup, verdict = "(baseline)", ""
        else:
            speedup = f"{statistics.median(serial) / median:.2f}x"
            apart = max(values) < min(serial) or min(values) > max(serial)
            if min(len(values), len(serial)) < 2:
                verdict = "cannot tell from one run each"
            else:
                verdict = "yes: the ranges do not overlap" if apart else "no: the ranges overlap"
        own = data["trial_wall_seconds"][way]
        lines.append(f"| {way} | {len(values)} | {min(values):.1f} | {median:.1f} | {max(values):.1f} | {speedup} "
                     f"| {verdict} | {statistics.mean(own):.1f} over {len(own)} |")
    lines += [
        "",
        "The wall time is the whole sweep; *a trial's own wall* is each trial's process from start to exit, "
        "averaged over every trial of every run of that way: where it grows, trials running at once slowed each "
        "other down (shared cores, caches and memory bandwidth), so compare methods' timings within one way of "
        "running, not across. What the trials do not explain is the sweep's own start-up and tables, and for Ray "
        "starting a local Ray and its workers.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
