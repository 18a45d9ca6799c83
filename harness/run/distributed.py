"""One run, several processes: what `accelerate launch` (or torchrun) starts, and what only the main process does.

Under `accelerate launch --config_file recipes/configs/accelerate/ddp.yaml recipes/<recipe>.py ...` every process
runs the whole recipe. The Trainer (through accelerate) wraps the model (DDP: a full copy per GPU; FSDP:
a shard per GPU), gives each process its share of every batch and all-reduces the gradients. The rest is
here: which process this is, what the run refuses to do across processes, and the few exchanges the
harness needs (the main process's decision about output_dir, every process's peak memory). Only the main
process prints, claims output_dir and writes files (result.json, the adapter, the tokenizer, checkpoint
seals); every process trains and scores.

Launched as one process (`python recipes/<recipe>.py`) none of this does anything.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any

from harness.errors import UserError
from harness.processes import is_main, launched_processes, rank  # noqa: F401  (part of this module's face)


def _state():
    """accelerate's process state; the first call joins the process group when launched distributed. It is
    shared with the Trainer's, so it is made as the Trainer would make it: on a machine without a GPU, for
    the CPU (several processes then talk over gloo; without cpu=True accelerate would see no distribution)."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    cpu = not torch.cuda.is_available() or parse_flag_from_env("ACCELERATE_USE_CPU")
    return PartialState(cpu=cpu)


def start() -> None:
    """Join the process group and take this process's GPU before anything touches CUDA or builds Trainer
    settings (a no-op alone). On a machine without a GPU the processes run on the CPU: accelerate is told
    so (ACCELERATE_USE_CPU), as its --cpu flag would, so the Trainer's state agrees with this one."""
    import torch

    if launched_processes() > 1:
        if not torch.cuda.is_available():
            os.environ["ACCELERATE_USE_CPU"] = "true"
        _state()


def strategy() -> str:
    """single, ddp, fsdp or deepspeed: what the launcher's accelerate config asked for."""
    if launched_processes() == 1:
        return "single"
    from accelerate.utils import parse_flag_from_env  # the launcher's flags, read as accelerate reads them

    if parse_flag_from_env("ACCELERATE_USE_FSDP"):
        return "fsdp"
    if parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    return "ddp"


def check_launch(cfg) -> None:
    """Refuse, before anything loads, what cannot run under this launch (one line each)."""
    import torch

    processes, how = launched_processes(), strategy()
    if processes == 1:
        if cfg.method.method == "adalora" and cfg.model.device_map == "auto" and torch.cuda.device_count() > 1:
            raise UserError(
                "AdaLoRA cannot train with the model spread over several GPUs (--device_map auto): its orthogonal "
                "regularisation adds tensors from every layer, which then sit on different devices; drop "
                "--device_map to train on one GPU, or run one process per GPU with accelerate launch "
                "--config_file recipes/configs/accelerate/ddp.yaml"
            )
        return
    launch = f"under accelerate launch ({processes} processes, {how})"
    if cfg.model.device_map is not None:
        raise UserError(
            f"--device_map {cfg.model.device_map} {launch}: each process holds its own copy of the model (DDP) or "
            "its own shard (FSDP) on its own GPU, so the model is not spread by device_map; leave --device_map unset"
        )
    if cfg.model.backend == "unsloth":
        raise UserError(
            f"--backend unsloth {launch}: this project runs Unsloth on one GPU only (its multi-GPU support is not "
            "verified here); launch the recipe with python on one GPU, or use --backend peft"
        )
    if how in ("fsdp", "deepspeed") and cfg.method.method == "adalora":
        raise UserError(
            f"AdaLoRA {launch}: its rank allocation reads every adapter's whole gradient, which {how} shards across "
            "processes; use recipes/configs/accelerate/ddp.yaml (AdaLoRA under DDP reaches the same ranks in every process)"
        )
    if how == "fsdp" and cfg.model.quantization == "8bit":
        raise UserError(
            f"--quantization 8bit {launch}: FSDP shards only 4-bit bitsandbytes weights (stored as the compute "
            "dtype); use --quantization 4bit, or recipes/configs/accelerate/ddp.yaml"
        )


def fingerprint_part() -> dict[str, Any]:
    """What a run's fingerprint adds under several processes: their number changes the effective batch,
    so a checkpoint of 2 processes is not resumed by 4 (one process adds nothing: earlier runs keep theirs)."""
    processes = launched_processes()
    return {"processes": processes} if processes > 1 else {}


def batch_factor() -> int:
    """Examples one optimizer micro-step takes from the data: per_device_train_batch_size times this."""
    return launched_processes()


def device_map():
    """Where a process loads its model: its own GPU (DDP), nowhere yet (FSDP: the launcher shards it from
    the CPU copy), or None when not launched distributed."""
    import torch

    if launched_processes() == 1:
        return None
    if strategy() in ("fsdp", "deepspeed"):
        return None
    if torch.cuda.is_available():
        return {"": _state().local_process_index}
    return {"": "cpu"}


@contextlib.contextmanager
def main_speaks():
    """Only the main process prints: the other processes' stdout goes nowhere (their errors still reach
    stderr, and a UserError is said once, by the main process: harness.errors)."""
    if is_main():
        yield
        return
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()  # loading bars are drawn on stderr by every process
    datasets.disable_progress_bars()
    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            yield
    finally:
        transformers.utils.logging.enable_progress_bar()
        datasets.enable_progress_bars()


def barrier() -> None:
    if launched_processes() > 1:
        _state().wait_for_everyone()


def share(value: Any) -> Any:
    """The main process's value, in every process."""
    if launched_processes() == 1:
        return value
    from accelerate.utils import broadcast_object_list

    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def gather(value: Any) -> list[Any]:
    """Every process's value, in process order, in every process."""
    if launched_processes() == 1:
        return [value]
    from accelerate.utils import gather_object

    return list(gather_object([value]))


def describe(memory: dict[str, Any], device: str, every_process: bool = True) -> dict[str, Any]:
    """The record's memory and launch fields: this process's peaks alone, or under several processes the
    largest peak (what the biggest GPU must hold) with every process's own. With every_process every
    process must call it; without (a run that failed), the main process's own figures only."""
    processes = launched_processes()
    launch = {"processes": processes, "strategy": strategy()}
    if processes == 1 or not every_process:
        return {**memory, "distributed": launch}
    per_process = gather({"process": rank(), "device": device, **memory})
    largest = max(per_process, key=lambda m: m["peak_memory_mb"])
    return {
        **memory,
        "peak_memory_mb": largest["peak_memory_mb"],  # the largest process's peak: what each GPU must hold
        "peak_memory_kind": largest["peak_memory_kind"],
        "distributed": {**launch, "backend": _state().backend, "per_process": per_process},
    }
