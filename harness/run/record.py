"""A run's record, result.json: the fields every objective writes, its provenance (command, device, versions,
git state, peak memory), and writing it however the run ends."""
from __future__ import annotations

import contextlib
import datetime as dt
import shutil
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from harness.data.reading import data_source
from harness.errors import RunFailed, UserError, is_disk_full, is_out_of_memory, signals_deferred
from harness.models.offline import OFFLINE_MODELS
from harness.run.config import RunConfig
from harness.run.distributed import describe, is_main
from harness.run.folder import RunFolder
from harness.run.measure import Stopwatch, command_line, device_name, git_state, peak_rss_mb, versions

if TYPE_CHECKING:  # only a type here: the objectives (above this module) make Workloads
    from harness.objectives.protocol import Workload

RESULT_SCHEMA = 1


@dataclass
class RunStart:
    """Taken when a run starts: its clock, its UTC start time and the code it runs (git state now,
    not what the tree holds when the run ends)."""

    clock: Any
    started_at: str
    git: dict[str, Any]

    @classmethod
    def now(cls) -> "RunStart":
        return cls(Stopwatch(), dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), git_state())


@contextlib.contextmanager
def recorded_run(folder: RunFolder, cfg: RunConfig, start: RunStart, memory=None, extra: dict[str, Any] | None = None):
    """Yield the run's record to fill in; write it however the run ends: status ok (after the staged
    final files are moved into place), or failed / oom / interrupted / refused with the error, always
    with its provenance. A record that is not ok never replaces a finished run's result.json."""
    record: dict[str, Any] = {"status": "running"}
    try:
        yield record
    except BaseException as exc:
        disk_full = _disk_full(exc, folder.path)
        record["status"] = (
            "oom" if is_out_of_memory(exc)
            else "interrupted" if isinstance(exc, KeyboardInterrupt)
            else "refused" if isinstance(exc, UserError)
            else "failed"
        )
        record["error"] = (f"RunFailed: {disk_full}; {type(exc).__name__}: {exc}" if disk_full
                           else f"{type(exc).__name__}: {exc}")[:2000]
        record["traceback_tail"] = "".join(traceback.format_exception(exc))[-4000:]
        if is_main():  # the other processes may be gone or stuck: this process's own figures only
            record.update({**_provenance(cfg, start, folder, memory, every_process=False), **(extra or {})})
            try:
                folder.write_record(_ordered(record))
            except OSError as unwritten:
                if not (disk_full and is_disk_full(unwritten)):
                    raise
                # The disk is still full: the one line is all that can be said.
        if disk_full:
            raise RunFailed(disk_full) from exc
        raise
    # Every process: under several, their peak memory is gathered here (a collective step).
    record.update({"status": "ok", **_provenance(cfg, start, folder, memory), **(extra or {})})
    if not is_main():
        return
    with signals_deferred():  # the files and the record that describes them change together
        ordered = _ordered({**record, "files": []})  # "files" in its place among the fields; finish() fills it in
        try:
            folder.finish(ordered)
        except Exception as exc:  # a swap journaled before the disk filled is completed by the next run
            if disk_full := _disk_full(exc, folder.path):
                raise RunFailed(disk_full) from exc
            raise
        record.clear()
        record.update(ordered)


# PyTorch's writer (torch.save: the optimizer's state in a checkpoint) fails without saying why ("unexpected pos
# 576 vs 534", "file write failed"); with almost nothing left on the disk, that is why.
_TORCH_WRITER_FAILED = ("inline_container", "PytorchStreamWriter", "file write failed")
_ALMOST_FULL_BYTES = 64 << 20


def _disk_full(exc: BaseException, out: Path) -> str | None:
    """The one line for a run stopped by a full disk (the exception's own errno, or PyTorch's writer failing on a
    disk that is full); None for any other failure."""
    writer_failed = isinstance(exc, RuntimeError) and any(text in str(exc) for text in _TORCH_WRITER_FAILED)
    if not is_disk_full(exc) and not (writer_failed and _free_bytes(out) < _ALMOST_FULL_BYTES):
        return None
    return f"no space left on device in {out}: free space and rerun the same command to resume"


def _free_bytes(path: Path) -> int:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return _ALMOST_FULL_BYTES  # unknown: not taken for full


def run_record(cfg: RunConfig, trainer, clock, outcome, counts: tuple[int, int], folder: RunFolder, work: Workload,
               stats: dict[str, Any], planned_steps: int | None, stopped_by: str | None,
               scores: dict[str, Any]) -> dict[str, Any]:
    """The fields every objective's result.json has (scores: eval_loss, eval, before_training, ... in
    between, as the objective has them). The final files are already in folder.staging."""

    trainable, total = counts
    return {
        "global_step": trainer.state.global_step,
        "planned_steps": planned_steps,
        "stopped_by": stopped_by,
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "resumed_from": folder.resume_from,
        "resumed_at_step": folder.resume_step,
        # This process's: 0 when the checkpoint resumed was already at the run's last step.
        "steps_trained": trainer.state.global_step - (folder.resume_step or 0),
        "train_seconds": round(clock.seconds, 3),
        "tokens_trained": clock.tokens,
        "tokens_per_second": round(clock.tokens / clock.seconds, 1) if clock.seconds > 0 else None,
        # SFT: input positions computed, padding included (this process's; under several, not recorded)
        **({"positions_trained": trainer.positions_trained}
           if hasattr(trainer, "positions_trained") and trainer.accelerator.num_processes == 1 else {}),
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": round(100 * trainable / total, 6),
        **_saved_weights_bytes(folder.staging),
        # The mean loss of the steps this process trained, as transformers reports it (after a resume: since then).
        "train_loss": round(outcome.training_loss, 6) if outcome is not None and outcome.global_step else None,
        **scores,
        "data": {"data_file": data_source(cfg.data), "data_sha256": folder.settings["data_file_sha256"],  # hashed once
                 **stats, "rows_left_out": work.left_out()},
        "log_history": trainer.state.log_history,
    }


def _saved_weights_bytes(output_dir: Path) -> dict[str, int]:
    """Size of what was saved: the adapter, or after full fine-tuning the whole model (model_bytes;
    there is no adapter then, so no adapter_bytes)."""
    adapter = output_dir / "adapter_model.safetensors"
    if adapter.is_file():
        return {"adapter_bytes": adapter.stat().st_size}
    shards = list(output_dir.glob("model*.safetensors"))
    return {"model_bytes": sum(f.stat().st_size for f in shards)} if shards else {}


def _provenance(cfg: RunConfig, start: RunStart, folder: RunFolder, memory=None,
                every_process: bool = True) -> dict[str, Any]:
    """every_process: under several processes, gather every one's peak memory (each must be here too)."""

    measured = memory.read() if memory is not None else {"process_peak_rss_mb": round(peak_rss_mb(), 1)}

    return {
        "recipe": cfg.run.recipe,
        "objective": cfg.run.objective,
        "method": cfg.method.method,
        "backend": cfg.model.backend,
        "model": cfg.model.model,
        # What an offline model's weights are (random, or smollm2's Q4_1-dequantized ones): a reader of the
        # record must not mistake them for the Hub's originals.
        **({"model_weights": OFFLINE_MODELS[cfg.model.model]} if cfg.model.model in OFFLINE_MODELS else {}),
        "quantization": cfg.model.quantization,
        "device": device_name(),
        # The threads torch computed with: a CPU run's speed depends on them (harness.plan.time_check compares
        # a run with a calibration made at a known number)
        **({"cpu_threads": torch.get_num_threads()} if not torch.cuda.is_available() else {}),
        **describe(measured, device_name(), every_process),
        "total_seconds": round(start.clock.seconds(), 3),
        "seed": cfg.train.seed,
        "started_at": start.started_at,
        "versions": versions(),
        "git": start.git,
        "command": command_line(cfg.run.recipe, cfg.argv),
        "config": cfg.to_dict(),
        # What a rerun compares to decide between "nothing to do", resume and refuse (harness.run.folder).
        "fingerprint": folder.fingerprint,
        "inputs_sha256": {k: v for k, v in folder.settings.items() if k.endswith("_sha256")},
        "schema": RESULT_SCHEMA,
    }


_FIRST_KEYS = (
    "status", "recipe", "objective", "method", "backend", "model", "quantization", "device", "peak_memory_mb", "peak_memory_kind",
    "train_seconds", "total_seconds", "tokens_per_second", "trainable_params", "total_params",
    "adapter_bytes", "model_bytes", "train_loss", "eval_loss", "eval", "adalora", "seed",
)


def _ordered(record: dict[str, Any]) -> dict[str, Any]:
    """Headline fields first, so result.json reads well; log_history last."""
    head = {k: record[k] for k in _FIRST_KEYS if k in record}
    rest = {k: v for k, v in record.items() if k not in head and k != "log_history"}
    return {**head, **rest, **({"log_history": record["log_history"]} if "log_history" in record else {})}
