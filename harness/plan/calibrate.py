"""Calibration: how fast this device really multiplies matrices and moves memory, and how long real training
steps of the recipes' shapes take on it and how much memory they hold, measured, so that the time planner can
use achieved figures in place of a data sheet's peaks and its modelled constants (harness.plan.speeds).

Why this module is long: its docstring is the command's manual and the record's schema, which whoever runs it
or reads its files needs in one place; the code is about 340 lines.

    python -m harness.plan.calibrate                  # this machine's GPU (its CPU where there is none)
    python -m harness.plan.calibrate --small          # seconds, small shapes: what the tests run on the CPU
    python -m harness.plan.calibrate --device cpu     # the CPU even where there is a GPU
    ... --output DIR (default results/gpu), --overwrite to replace an existing file, --repeats N,
        --threads N (CPU threads torch uses; default torch's current number), --no_steps (no step grid)

On a GPU the whole command takes at most 8 minutes: about half a minute of matmuls and bandwidth, then the
training-step grid (harness.plan.calibrate_steps) within its time budget. The grid trains, for a few steps each,
random-init models of the recipes' real shapes built from their config on the GPU (nothing is downloaded):
Qwen2-7B in 16 bits with LoRA r8 and r64, DoRA, IA3 and prompt tuning, in 4-bit NF4 with QLoRA r16 and AdaLoRA,
LoRA at 512 and 2048 tokens and with packing on and off, and full fine-tuning of Qwen2.5-0.5B; each point's
step seconds and peak allocated/reserved memory beside the memory plan and the predicted step time. --small runs
the same code on a tiny shape in seconds (what the tests run on the CPU). A GPU that lacks the memory for a
point records it as out of memory. To contribute a calibration of your card: run the command on an idle GPU
(with CUDA_VISIBLE_DEVICES set to one of several) and open a pull request with results/gpu/calibration-<gpu>.json
and its .md: the planner then uses it for that GPU.

Each matmul and bandwidth figure is the median of --repeats timed repeats (min and max kept), after a warm-up,
with torch.cuda.synchronize before every clock read on a GPU:
- matmul FLOP/s in the compute dtype (bf16 where the GPU has it, fp16 on T4/V100, fp32 on a CPU; --dtype
  to choose) for the products a training step makes: for each linear layer's shape (attention projections,
  MLP up and down, the LM head: hidden x vocab), its forward product (tokens x in by W^T) and the two of its
  backward as autograd makes them for torch.nn.functional.linear (grad_input = grad_out @ W, tokens x out by
  out x in; grad_weight = X^T @ grad_out, in x tokens by tokens x out: the token count is the inner
  dimension). Plus a LoRA-rank-skinny forward product (bound by bandwidth: reported, left out of the
  achievable figure). On a GPU the shapes are the recipes' 7B and 0.5B models' at 8192 / 4096 tokens; on a
  CPU the 135M model's that this project trains there, at 512 tokens (the recipes' batch, 4 x 128). --small
  divides them by 8 (GPU) or 4 (CPU).
  The achievable matmul figure is the step-weighted rate of the training rows: sum(count x flops) /
  sum(count x median seconds), count being how many products of that shape one step makes (layers x
  projections of that shape; 1 for the LM head), so that a shape is weighted by the FLOPs it takes in a step.
- memory bandwidth: a large float32 tensor copied (2 x its bytes moved) and added to another (3 x).

It writes results/gpu/calibration-<device>.json and a markdown table beside it (.md), <device> being a listed
GPU's name ("h200", "a100-80"), else torch's name for the GPU, else "cpu-<model>". JSON, schema 1:
  schema, mode ("full" or "small"), dtype,
  device {kind, name, gpu (the planner's name or null), slug, memory_bytes, ...},
  provenance {date, commit, dirty, versions, threads, command},
  matmul [{name, shape, pass ("forward", "grad_input", "grad_weight"), m, k, n (an m x k by k x n product),
           role ("training" or "skinny"), count (such products per step), flops, calls,
           seconds {median, min, max}, flops_per_second {median, min, max}}],
  bandwidth [{name, bytes_moved, calls, seconds {...}, bytes_per_second {...}}],
  achievable {matmul_flops_per_second (sum(count x flops) / sum(count x median seconds) over the training
              rows), bandwidth_bytes_per_second (the better of copy and add)},
  data_sheet {matmul_flops_per_second, bandwidth_bytes_per_second, source} or null,
  steps [one per grid point: name, tip, model, weights "random-init", flags (the recipe settings), rows,
         status ("measured", "out of memory", "failed", "skipped") and reason, step_seconds {median, min, max,
         all}, warm_up_seconds, real_tokens, computed_tokens, tokens_per_second, peak_allocated_bytes,
         peak_reserved_bytes (null on a CPU), measured_peak_bytes (reserved + context), kind, planned_peak_bytes,
         predicted_step_seconds and measured_over_predicted {"data sheet", "calibration"}] ([] with --no_steps),
  step_grid {mode, weights, dtype, trainer, warm_up_steps, timed_steps, budget_seconds, seconds,
             context_bytes, context_how} or null, and then steps_not_measured (why: --no_steps; a CPU in full
             mode, the grid's shapes being a GPU's).
Readers take the keys they know and ignore the rest (an older file without a grid still loads).
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

from harness.errors import OneLineArgumentParser, UserError, reported_as_one_line
from harness.files import write_json_atomic, write_text_atomic
from harness.plan.gpus import gpu_from_device_name
from harness.plan.speeds import (
    CALIBRATE_COMMAND,
    CALIBRATION_DIR,
    CALIBRATION_DIR_ENV,
    CALIBRATION_SCHEMA,
    Device,
    calibration_dir,
    load_calibration,
)

# (name, tokens, in features, out features, role, count): a linear layer's shape, its forward a (tokens x in)
# by (in x out) matmul; count: layers of that shape in one step of its model (layers x projections).
GPU_SHAPES = (
    ("7B attention projection", 8192, 4096, 4096, "training", 32 * 4),  # Llama-2-7B: q, k, v, o
    ("7B MLP gate/up", 8192, 4096, 11008, "training", 32 * 2),
    ("7B MLP down", 8192, 11008, 4096, "training", 32),
    ("7B LM head", 8192, 4096, 32000, "training", 1),
    ("0.5B attention projection", 4096, 896, 896, "training", 24 * 2),  # Qwen2.5-0.5B: q, o
    ("LoRA A at rank 16", 8192, 4096, 16, "skinny", 1),
)
CPU_SHAPES = (  # smollm2-135m (30 layers, hidden 576, 3 key-value heads of 64, MLP 1536, vocab 49152)
    ("135M attention q/o projection", 512, 576, 576, "training", 30 * 2),
    ("135M attention k/v projection", 512, 576, 192, "training", 30 * 2),
    ("135M MLP gate/up", 512, 576, 1536, "training", 30 * 2),
    ("135M MLP down", 512, 1536, 576, "training", 30),
    ("135M LM head", 512, 576, 49152, "training", 1),
    ("LoRA A at rank 8", 512, 576, 8, "skinny", 1),
)
SMALL_DIVISOR = {"cuda": 8, "cpu": 4}
RANK_LIKE = 64  # dimensions this small (a LoRA rank) are kept in --small mode
BANDWIDTH_MIB = {("cuda", "full"): 1024, ("cuda", "small"): 64, ("cpu", "full"): 256, ("cpu", "small"): 16}
# Seconds: warm-up per measurement, and how long each timed repeat runs (enough calls to last that long).
WARM_UP_S = {"full": 0.2, "small": 0.01}
REPEAT_S = {("cuda", "full"): 0.1, ("cuda", "small"): 0.005, ("cpu", "full"): 0.25, ("cpu", "small"): 0.005}
FIRST_WARM_UP_S = {("cuda", "full"): 2.0}  # a GPU's clocks ramp up under load
MAX_CALLS = 10_000  # per repeat or warm-up: bounds a loop whatever the clock says
DTYPES = ("bfloat16", "float16", "float32")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    with reported_as_one_line("calibrate"):
        args = _parse(argv)
        kind, index = _device_wanted(args.device)
        folder = _output_folder(args.output)
        import torch

        if args.threads is not None:
            torch.set_num_threads(args.threads)
        dev = _resolve(torch, kind, index)
        dtype = _dtype(torch, args.dtype, dev)
        paths = [folder / f"calibration-{dev.slug}{suffix}" for suffix in (".json", ".md")]
        existing = [path for path in paths if path.exists()]
        if existing and not args.overwrite:
            raise UserError(f"{existing[0]} exists; pass --overwrite to replace it, or --output DIR to write elsewhere")
        _make(folder)
        record = measure(torch, dev, _where(torch, dev, index), dtype, "small" if args.small else "full", args.repeats,
                         steps=not args.no_steps)
        record["provenance"]["command"] = shlex.join(["python", "-m", "harness.plan.calibrate", *argv])
        write_json_atomic(paths[0], record)
        write_text_atomic(paths[1], markdown(record))
        spec = dev.name if dev.kind == "cuda" else f"cpu {dev.name}"
        calibration = load_calibration(spec, folder)  # what the planner will read: the file must read back
        print(f"wrote {paths[0]} and {paths[1].name}: matmul {_flops(calibration.matmul_flops_per_second)}, "
              f"bandwidth {_bytes_per_s(calibration.bandwidth_bytes_per_second)}")
    return 0


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = OneLineArgumentParser(prog="python -m harness.plan.calibrate",
                                   description="Measure this device's matmul FLOP/s and memory bandwidth, then time "
                                               "a grid of short training steps on random-init models of the "
                                               "recipes' shapes (7B LoRA r8/r64, QLoRA, DoRA, AdaLoRA, IA3, prompt "
                                               "tuning, 0.5B full fine-tuning, 512/2048 tokens, packing on/off) "
                                               "beside the planned memory and time. At most 8 minutes on a GPU; "
                                               "writes results/gpu/calibration-<gpu>.json and .md, which the "
                                               "planner uses for that GPU: contribute yours by pull request.")
    parser.add_argument("--device", default="auto", help="auto (the GPU if torch sees one, else the CPU), cpu, "
                                                         "cuda or cuda:N")
    parser.add_argument("--small", action="store_true", help="small shapes, seconds: a check, not a calibration")
    parser.add_argument("--dtype", default="auto", choices=("auto", *DTYPES),
                        help="the matmuls' dtype; auto: bfloat16 where the GPU has it, float16 on older GPUs, "
                             "float32 on a CPU")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per figure (3 to 100)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads torch uses (default: its current "
                                                                  "number); give the number the runs use")
    parser.add_argument("--output", default=None, metavar="DIR", help=f"where to write (default {CALIBRATION_DIR}, or the folder {CALIBRATION_DIR_ENV} names)")
    parser.add_argument("--overwrite", action="store_true", help="replace this device's existing calibration")
    parser.add_argument("--no_steps", action="store_true", help="matmuls and bandwidth only, without the grid of "
                                                                "training steps (random-init models, minutes)")
    args = parser.parse_args(argv)
    if not 3 <= args.repeats <= 100:
        raise UserError(f"--repeats {args.repeats}: give 3 to 100 (a median of fewer says little)")
    if args.threads is not None and not 1 <= args.threads <= 1024:
        raise UserError(f"--threads {args.threads}: give 1 to 1024 (the CPU threads the training runs use)")
    return args


def _device_wanted(text: str) -> tuple[str | None, int | None]:
    """("cuda", 0) / ("cpu", None) / (None, None) for auto, before torch is imported."""
    found = re.fullmatch(r"\s*(auto|cpu|cuda)(?::(\d+))?\s*", text.lower())
    if not found or (found.group(2) is not None and found.group(1) != "cuda"):
        raise UserError(f"--device {text!r}: use cpu, cuda or cuda:N (N a GPU's number as torch counts them), "
                        "or leave it out to measure the GPU if there is one, else the CPU")
    kind = None if found.group(1) == "auto" else found.group(1)
    return kind, int(found.group(2)) if found.group(2) is not None else (0 if kind == "cuda" else None)


def _output_folder(text: str | None) -> Path:
    """The folder to write in, checked (not yet made: a later refusal leaves no empty folder behind)."""
    folder = Path(text).expanduser() if text else calibration_dir()
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--output {folder}: is a file, not a folder; give a folder to write the calibration in")
    existing = next(p for p in (folder, *folder.absolute().parents) if p.exists())  # "/" at the latest
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--output {folder}: cannot write in {existing}; give a folder you can write to")
    return folder


def _make(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--output {folder}: cannot create it ({exc.strerror}); give a folder you can write to"
                        ) from None


def _resolve(torch, kind: str | None, index: int | None) -> Device:
    cuda = torch.cuda.is_available()
    if kind == "cuda" and not cuda:
        raise UserError("--device cuda: torch sees no CUDA GPU on this machine; use --device cpu (or leave "
                        "--device out) to measure the CPU")
    if kind == "cuda" and index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise UserError(f"--device cuda:{index}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}")
    if kind == "cpu" or not cuda:
        from harness.run.measure import cpu_model

        return Device("cpu", cpu_model(), None)
    name = torch.cuda.get_device_name(index or 0)
    return Device("cuda", name, gpu_from_device_name(name))


def _dtype(torch, wanted: str, dev: Device) -> str:
    if wanted == "auto":
        if dev.kind == "cpu":
            return "float32"
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if wanted == "bfloat16" and dev.kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"--dtype bfloat16: {dev.name} has no bf16 (it came with Ampere); use float16")
    return wanted


def _where(torch, dev: Device, index: int | None):
    return torch.device("cuda", index or 0) if dev.kind == "cuda" else torch.device("cpu")


def measure(torch, dev: Device, where, dtype: str, mode: str, repeats: int, steps: bool = True) -> dict:
    """Every figure of one calibration on torch device `where`, as the JSON record (see the module's docstring);
    steps=False leaves out the training-step grid (harness.plan.calibrate_steps)."""
    cuda = dev.kind == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(where)

    generator = torch.Generator(device=where).manual_seed(0)
    warm, repeat_s = WARM_UP_S[mode], REPEAT_S[(dev.kind, mode)]
    first_warm = FIRST_WARM_UP_S.get((dev.kind, mode), warm)
    timing = {"sync": sync, "repeats": repeats, "repeat_s": repeat_s}
    matmuls = [row for n, shape in enumerate(_shapes(dev.kind, mode))
               for row in _matmul(torch, shape, getattr(torch, dtype), where, generator,
                                  warm_up_s=first_warm if n == 0 else warm, **timing)]
    bandwidth = _bandwidth(torch, _bandwidth_elements(torch, dev, where, mode), where, generator, warm_up_s=warm,
                           **timing)
    achievable = {"matmul_flops_per_second": step_weighted_rate(matmuls),
                  "bandwidth_bytes_per_second": max(row["bytes_per_second"]["median"] for row in bandwidth)}
    record = {"schema": CALIBRATION_SCHEMA, "mode": mode, "dtype": dtype, "device": _describe(torch, dev, where),
              "provenance": _provenance(torch, cuda, repeats), "matmul": matmuls, "bandwidth": bandwidth,
              "achievable": achievable, "data_sheet": _data_sheet(dev, dtype), "steps": [], "step_grid": None}
    if not steps:
        record["steps_not_measured"] = "--no_steps"
    else:
        from harness.plan import calibrate_steps

        speeds = calibrate_steps.grid_speeds(torch, record, dev, where)
        record["steps"], record["step_grid"] = calibrate_steps.run_grid(
            torch, where, calibrate_steps.grid(mode, where.type), mode, speeds, sync)
    return record


def step_weighted_rate(matmuls: list[dict]) -> float:
    """FLOP/s of a step's products: the training rows' FLOPs over their time, each row counted as often as a
    step makes it (so the LM head, once a step, does not outweigh thirty layers' projections)."""
    training = [row for row in matmuls if row["role"] == "training"]
    return (sum(row["count"] * row["flops"] for row in training)
            / sum(row["count"] * row["seconds"]["median"] for row in training))


def _matmul(torch, shape, dtype, where, generator, **timing) -> list[dict]:
    """One linear layer shape's rows: its forward product and, for a training shape, the two of its backward,
    each as autograd computes it for torch.nn.functional.linear (y = x @ W^T, W stored out x in). Its tensors
    are freed on return (the next shape may need the memory)."""
    name, tokens, fan_in, fan_out, role, count = shape
    x = torch.randn(tokens, fan_in, dtype=dtype, device=where, generator=generator)
    weight = torch.randn(fan_out, fan_in, dtype=dtype, device=where, generator=generator)
    grad_out = torch.randn(tokens, fan_out, dtype=dtype, device=where, generator=generator)
    products = [("forward", x, weight.t(), torch.empty(tokens, fan_out, dtype=dtype, device=where))]
    if role == "training":
        products += [("grad_input", grad_out, weight, torch.empty(tokens, fan_in, dtype=dtype, device=where)),
                     ("grad_weight", x.t(), grad_out, torch.empty(fan_in, fan_out, dtype=dtype, device=where))]
    rows = []
    for pass_, a, b, c in products:
        seconds, calls = _timed(lambda: torch.matmul(a, b, out=c), **timing)
        (m, k), n_ = a.shape, b.shape[1]
        flops = 2 * m * k * n_
        rows.append({"name": f"{name}, {pass_}", "shape": name, "pass": pass_, "m": m, "k": k, "n": n_,
                     "role": role, "count": count, "flops": flops, "calls": calls, "seconds": _spread(seconds),
                     "flops_per_second": _rates(flops, seconds)})
        print(f"matmul {rows[-1]['name']} ({m} x {k} by {k} x {n_}, {str(dtype).removeprefix('torch.')}): "
              f"{_flops(rows[-1]['flops_per_second']['median'])}")
    return rows


def _bandwidth(torch, elements: int, where, generator, **timing) -> list[dict]:
    """A float32 tensor copied (read once, written once) and added to another (two reads, one write)."""
    x = torch.rand(elements, device=where, generator=generator)
    y = torch.rand(elements, device=where, generator=generator)
    z = torch.empty(elements, device=where)
    rows = []
    for name, moved, op in (("copy", 2, lambda: z.copy_(x)), ("add", 3, lambda: torch.add(x, y, out=z))):
        seconds, calls = _timed(op, **timing)
        size = moved * x.nbytes
        rows.append({"name": f"{name} of {x.nbytes / 2**20:g} MiB float32", "bytes_moved": size, "calls": calls,
                     "seconds": _spread(seconds), "bytes_per_second": _rates(size, seconds)})
        print(f"bandwidth {rows[-1]['name']}: {_bytes_per_s(rows[-1]['bytes_per_second']['median'])}")
    return rows


def _shapes(kind: str, mode: str) -> list[tuple[str, int, int, int, str, int]]:
    shapes = GPU_SHAPES if kind == "cuda" else CPU_SHAPES
    if mode == "full":
        return list(shapes)
    divisor = SMALL_DIVISOR[kind]
    return [(name, *(d if d <= RANK_LIKE else d // divisor for d in dims), role, count)
            for name, *dims, role, count in shapes]


def _bandwidth_elements(torch, dev: Device, where, mode: str) -> int:
    """float32 elements per tensor: the size this mode asks for, halved until three fit in half the free GPU
    memory (a smaller card or a busy one)."""
    size = BANDWIDTH_MIB[(dev.kind, mode)] * 2**20
    if dev.kind == "cuda":
        free, _ = torch.cuda.mem_get_info(where)
        while 3 * size > free / 2 and size > 2**24:
            size //= 2
    return size // 4


def _timed(fn, sync, repeats: int, warm_up_s: float, repeat_s: float) -> tuple[list[float], int]:
    """Seconds per call, one figure per repeat, and the calls each repeat made: a warm-up first, then enough
    calls per repeat to last about repeat_s (so that a clock read and a launch are small beside it)."""
    start = time.perf_counter()
    for _ in range(MAX_CALLS):
        fn()
        sync()
        if time.perf_counter() - start >= warm_up_s:
            break
    start = time.perf_counter()
    fn()
    sync()
    once = max(time.perf_counter() - start, 1e-9)
    calls = max(1, min(MAX_CALLS, round(repeat_s / once)))
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        seconds.append((time.perf_counter() - start) / calls)
    return seconds, calls


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _rates(amount: float, seconds: list[float]) -> dict[str, float]:
    """Work per second: the median repeat's, and the slowest and fastest repeats'."""
    return {"median": amount / statistics.median(seconds), "min": amount / max(seconds), "max": amount / min(seconds)}


def _describe(torch, dev: Device, where) -> dict:
    described = {"kind": dev.kind, "name": dev.name, "gpu": dev.gpu.name if dev.gpu else None, "slug": dev.slug}
    if dev.kind == "cuda":
        props = torch.cuda.get_device_properties(where)
        return {**described, "index": where.index, "memory_bytes": props.total_memory,
                "capability": f"{props.major}.{props.minor}", "multiprocessors": props.multi_processor_count}
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not every platform names these
        memory = None
    return {**described, "memory_bytes": memory, "cores": os.cpu_count()}


def _provenance(torch, cuda: bool, repeats: int) -> dict:
    from harness.run.measure import git_state, versions

    git = git_state()
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": git["commit"] or "unknown", "dirty": git["dirty"], "versions": versions(),
            "threads": torch.get_num_threads(), "repeats": repeats,
            "allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32) if cuda else None}


def _data_sheet(dev: Device, dtype: str) -> dict | None:
    speed = dev.gpu.speed if dev.gpu else None
    if speed is None:
        return None
    return {"gpu": dev.gpu.name, "matmul_flops_per_second": speed.matmul(dtype),
            "bandwidth_bytes_per_second": speed.bandwidth, "source": speed.source, "dense": True}


def markdown(record: dict) -> str:
    """The record as a short page: what was measured, each figure's median and spread, and its share of the
    data sheet's peak where the GPU is listed."""
    dev, prov, sheet = record["device"], record["provenance"], record["data_sheet"] or {}
    peak_flops, peak_bw = sheet.get("matmul_flops_per_second"), sheet.get("bandwidth_bytes_per_second")
    lines = [f"# Calibration: {dev['name']} ({record['dtype']}, {record['mode']} mode)", "",
             f"Measured by `{prov.get('command') or CALIBRATE_COMMAND}` on {prov['date']}; commit {prov['commit']}"
             f"{' (with uncommitted changes)' if prov.get('dirty') else ''}; "
             f"{', '.join(f'{k} {v}' for k, v in prov['versions'].items())}; {prov['threads']} CPU thread(s). "
             f"Each figure is the median of {prov['repeats']} timed repeats, slowest and fastest beside it.", ""]
    if sheet:
        lines += [f"Data sheet, dense: {_flops(peak_flops) if peak_flops else 'none for ' + record['dtype']}, "
                  f"{_bytes_per_s(peak_bw)} ({sheet['source']}).", ""]
    lines += ["| what | median | slowest - fastest | of the data sheet's peak |", "|---|---|---|---|"]
    for row in record["matmul"]:
        rate = row["flops_per_second"]
        lines.append(f"| matmul {row['name']}: {row['m']} x {row['k']} by {row['k']} x {row['n']}"
                     f"{' (skinny: bandwidth-bound)' if row['role'] == 'skinny' else ''} | {_flops(rate['median'])} | "
                     f"{_flops(rate['min'])} - {_flops(rate['max'])} | {_share(rate['median'], peak_flops)} |")
    for row in record["bandwidth"]:
        rate = row["bytes_per_second"]
        lines.append(f"| {row['name']} | {_bytes_per_s(rate['median'])} | {_bytes_per_s(rate['min'])} - "
                     f"{_bytes_per_s(rate['max'])} | {_share(rate['median'], peak_bw)} |")
    achieved = record["achievable"]
    lines += ["", f"**Achievable**, what the time planner uses: matmul "
                  f"{_flops(achieved['matmul_flops_per_second'])} (the training rows' FLOPs over their time, each "
                  f"row as often as a step makes it), bandwidth "
                  f"{_bytes_per_s(achieved['bandwidth_bytes_per_second'])} (the better of copy and add).", "",
              *_steps_markdown(record)]
    return "\n".join(lines)


def _steps_markdown(record: dict) -> list[str]:
    if not record.get("step_grid"):
        return [f"Training steps: not measured ({record.get('steps_not_measured', '--no_steps')}).", ""]
    from harness.plan.calibrate_steps import markdown as grid_markdown  # imports transformers: only with a grid

    return grid_markdown(record)


def _flops(value: float) -> str:
    return f"{value / 1e12:,.1f} TFLOP/s" if value >= 1e12 else f"{value / 1e9:,.1f} GFLOP/s"


def _bytes_per_s(value: float) -> str:
    return f"{value / 1e9:,.1f} GB/s"


def _share(value: float, peak: float | None) -> str:
    return f"{100 * value / peak:.0f}%" if peak and math.isfinite(value) else "-"


if __name__ == "__main__":
    sys.exit(main())
