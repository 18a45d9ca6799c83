"""A run's output folder (output_dir): which run it belongs to, what a rerun resumes, and when a
finished run's files are replaced.

A rerun into an existing output_dir (docs/runs-and-results.md, "Reruns", says the same):
  - new or empty folder: the run starts there;
  - files that no run of this project made, or a run of another recipe: refused, nothing touched;
  - the same recipe with the same settings (every setting except where output goes and how progress
    is shown, plus the contents of the data, eval and init-adapter files: see run_settings):
      finished (result.json status ok): nothing to do, nothing touched;
      unfinished: resumes from its last complete checkpoint (one cut short while being saved is
      removed, with a line saying so), or starts when there is none; a checkpoint at the run's last
      step has nothing left to train (harness.run.training.train_from finishes the run from it);
  - other settings, with a checkpoint or a finished run there: refused, naming what changed;
  - --resume false: starts over; the checkpoints already there are moved to superseded-<time>/
    (kept, never picked up again).
A finished run's files (adapter or model, tokenizer, result.json) are replaced only when a new run
in the folder finishes ok: the new files are written to a staging folder and moved in at the very
end, with result.json, as one journaled unit (harness.run.swap: a stop half-way is completed by the next start,
and readers refuse the folder meanwhile). A run that fails, is interrupted or refused meanwhile writes its record to last_attempt.json.
Two runs at once in one folder: the second is refused (a lock is held while a run lives).
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import errno
import fcntl
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.data.reading import data_identity, data_source
from harness.errors import UserError
from harness.files import write_json_atomic
from harness.run import distributed
from harness.run.distributed import fingerprint_part
from harness.run.swap import pending_record, plain_names, roll_forward, swap_in

RESULT_FILE = "result.json"
LAST_ATTEMPT_FILE = "last_attempt.json"
RUN_MARKER = "recipe_run.json"
SEAL_FILE = "checkpoint_complete.json"  # written into a checkpoint once everything else in it is
LOCK_FILE = ".run.lock"
CHECKPOINT_PREFIX = "checkpoint-"  # transformers' PREFIX_CHECKPOINT_DIR
STAGING_PREFIX = ".staging-"
SUPERSEDED_PREFIX = "superseded-"
MARKER_SCHEMA = 2

# Settings that cannot change what a run trains: where its files go, how progress is shown, how
# evaluation batches are cut. Every other setting is part of the run's fingerprint, so a setting
# added later is covered without anyone remembering to list it.
NOT_FINGERPRINTED = frozenset({
    "output_dir", "resume", "run_name", "report_to", "disable_tqdm", "logging_dir", "logging_steps",
    "logging_strategy", "logging_first_step", "logging_nan_inf_filter", "log_level", "log_level_replica",
    "log_on_each_node", "save_total_limit", "per_device_eval_batch_size", "eval_accumulation_steps",
    "dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers",
    "dataloader_prefetch_factor", "memory_budget_gb", "memory_check", "push_to_hub",
    "objective",  # the recipe's own; a DPO or GRPO run differs from an SFT one by its TRL settings anyway
    # How batches are laid out, not what trains: the same tokens carry the same loss, padded, padded to a multiple
    # or flattened (tests/test_packing.py: equal loss and gradients), so a rerun may change them and still resume.
    "padding_free", "pad_to_multiple_of",
})


def run_settings(cfg) -> dict[str, Any]:
    """What decides a run's weights: its settings, minus NOT_FINGERPRINTED, plus the sha256 of every
    input file (data_file, eval_file, forgetting_file, the init_adapter's weights): an edited data file is another run.
    A recipe's own extra settings (e.g. alpaca100's judge and decoding grid) act after training and
    reach it only through its data file, so they are left out."""
    settings = fingerprinted(dataclasses.replace(cfg, extras=()).to_dict())
    settings.update(input_hashes(cfg))
    settings.update(fingerprint_part())  # under several processes, their number
    return settings


# Settings added after runs were recorded, at the value that changes nothing: left out of the fingerprint at that
# value, so a run recorded before them keeps its fingerprint (a rerun finds it finished, or resumes it).
ADDED_LATER = {"dataset_name": None, "dataset_config": None, "dataset_split": "train", "column_mapping": None}


def fingerprinted(config: dict[str, Any]) -> dict[str, Any]:
    kept = {k: v for k, v in config.items() if k not in NOT_FINGERPRINTED and not k.startswith("hub_")}
    added = {**ADDED_LATER, **(_sft_settings_added() if config.get("objective", "sft") == "sft" else {})}
    return {k: v for k, v in kept.items() if k not in added or v != added[k]}


def _sft_settings_added() -> dict[str, Any]:
    """The settings supervised runs took from TRL's SFTConfig (beyond transformers' TrainingArguments), with the
    values a run records when they are left unset (JSON-safe, as RunConfig.to_dict writes them)."""
    from transformers import TrainingArguments
    from trl import SFTConfig

    # trust_remote_code: the model's own setting (--trust_remote_code), recorded long before.
    base = {f.name for f in dataclasses.fields(TrainingArguments)} | {"trust_remote_code"}
    added = {f.name: f.default for f in dataclasses.fields(SFTConfig) if f.name not in base}
    # SFTConfig resolves "auto" to None off Neuron; the recipes' SFTSettings leave max_length unset (the window
    # is --max_seq_length).
    return json.loads(json.dumps({**added, "pad_to_multiple_of": None, "max_length": None}, default=str))


def input_hashes(cfg) -> dict[str, str | None]:
    files = {"data_file": data_source(cfg.data), "eval_file": cfg.data.eval_file}
    if cfg.data.forgetting_file and cfg.data.forgetting_samples:
        files["forgetting_file"] = cfg.data.forgetting_file
    if cfg.run.init_adapter:
        files["init_adapter"] = str(Path(cfg.run.init_adapter) / "adapter_model.safetensors")
    return {f"{name}_sha256": data_identity(path)["data_sha256"] for name, path in files.items()}


def fingerprint_of(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class RunFolder:
    path: Path
    recipe: str
    settings: dict[str, Any]
    fingerprint: str
    resume_from: str | None = None  # the last complete checkpoint of these settings
    finished: dict[str, Any] | None = None  # the record of a finished run with exactly these settings
    # The main process's: under several processes every one saves through the same staging folder.
    staging_name: str = dataclasses.field(default_factory=lambda: f"{STAGING_PREFIX}{os.getpid()}")

    @property
    def resume_step(self) -> int | None:
        """The global step of the checkpoint this run resumes (its name, checkpoint-N, says it), or None."""
        return int(Path(self.resume_from).name[len(CHECKPOINT_PREFIX):]) if self.resume_from else None

    @property
    def staging(self) -> Path:
        """Where this run's final files are written before they are moved into place."""
        return self.path / self.staging_name

    def write_record(self, record: dict[str, Any]) -> Path:
        """result.json, unless the record is not ok and result.json holds a finished run: that stays,
        and this record goes to last_attempt.json."""
        target = self.path / RESULT_FILE
        if record.get("status") != "ok" and (_read_json(target) or {}).get("status") == "ok":
            target = self.path / LAST_ATTEMPT_FILE
        write_json_atomic(target, record)
        return target

    def finish(self, record: dict[str, Any]) -> None:
        """Swap the staged final files in for the previous finished run's (its files that this run did not write
        are removed) and write the record, as one journaled unit (harness.run.swap). Called with signals deferred."""
        previous = _read_json(self.path / RESULT_FILE) or {}
        listed = previous.get("files") if previous.get("status") == "ok" else None
        # Plain names of final files only: a record edited by hand must not make this delete anything else.
        old_files = [n for n in plain_names(listed) if not n.startswith(".")
                     and n not in (RESULT_FILE, LAST_ATTEMPT_FILE, RUN_MARKER) and not n.startswith(CHECKPOINT_PREFIX)]
        swap_in(self.path, self.staging, record, old_files)

def check_output_dir(cfg, with_checkpoints: bool = True) -> None:
    """The refusals `claimed` would make, made now and changing nothing, so that a bad output_dir is
    refused in seconds, before the tokenizer and data are prepared (`claimed` decides again, locked)."""
    out = Path(cfg.train.output_dir).expanduser()
    _refuse_a_file(out)
    if out.is_dir():
        settings = run_settings(cfg)
        folder = RunFolder(out, cfg.run.recipe, settings, fingerprint_of(settings))
        _decide(folder, cfg.run.resume, with_checkpoints, dry_run=True)


def _refuse_a_file(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {out} is a file, not a folder; pass a new or empty folder as --output_dir")


@contextlib.contextmanager
def claimed(cfg, with_checkpoints: bool = True):
    """Lock output_dir for this run and decide what the run does there (see the module doc).

    with_checkpoints=False is for a folder that only holds other runs' folders and reports (the
    alpaca100 flow): only the recipe is checked there; resuming happens in its stage folders.
    Under several processes (accelerate launch) the main process claims the folder and decides; the
    others follow its decision (or its refusal) and never write, lock or clean anything there."""
    if distributed.launched_processes() == 1:
        with _claimed_here(cfg, with_checkpoints) as folder:
            yield folder
        return
    distributed.barrier()  # every process has read the folder (preflight) before the main one changes it
    if not distributed.is_main():
        outcome, decision = distributed.share(None)
        if outcome == "refused":
            raise UserError(decision)
        settings = run_settings(cfg)
        yield RunFolder(Path(cfg.train.output_dir).expanduser(), cfg.run.recipe, settings, fingerprint_of(settings),
                        **decision)
        return
    with contextlib.ExitStack() as stack:
        try:
            folder = stack.enter_context(_claimed_here(cfg, with_checkpoints))
        except UserError as exc:
            distributed.share(("refused", str(exc)))
            raise
        except BaseException:
            distributed.share(("refused", "the main process stopped while claiming output_dir (see its message)"))
            raise
        distributed.share(("ok", {"resume_from": folder.resume_from, "finished": folder.finished,
                                  "staging_name": folder.staging_name}))
        yield folder


@contextlib.contextmanager
def _claimed_here(cfg, with_checkpoints: bool):
    out = Path(cfg.train.output_dir).expanduser()
    settings = run_settings(cfg)
    folder = RunFolder(out, cfg.run.recipe, settings, fingerprint_of(settings))
    created = not out.exists()
    lock = _lock(out)
    try:
        try:
            _decide(folder, cfg.run.resume, with_checkpoints)
        except BaseException:
            if created:  # refused before the run began: leave no trace of it
                os.close(lock)
                lock = None
                shutil.rmtree(out, ignore_errors=True)
            raise
        yield folder
    finally:
        if folder.staging.exists():
            shutil.rmtree(folder.staging, ignore_errors=True)
        if lock is not None:
            os.close(lock)  # releases the flock


def _lock(out: Path) -> int:
    _refuse_a_file(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise UserError(f"cannot write to output_dir {out} ({exc.strerror}); pass a writable --output_dir") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise UserError(
                f"output_dir {out} is in use by another run right now; wait for it to end or pass another --output_dir"
            ) from None
        raise
    return fd


def _decide(folder: RunFolder, resume: bool, with_checkpoints: bool, dry_run: bool = False) -> None:
    """Refuse, or settle what the run does in the folder; dry_run: only refuse, change nothing."""
    out = folder.path
    if not dry_run:
        roll_forward(out)  # a run stopped while finishing: its swap completes first, as it planned
    marker_path = out / RUN_MARKER
    if not marker_path.exists():
        foreign = sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE)
        if foreign:
            raise UserError(
                f"output_dir {out} is not empty ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}) "
                "and holds no run of this project; pass an empty or new --output_dir so nothing there is overwritten"
            )
    else:
        marker = _read_json(marker_path)
        damaged = not isinstance(marker, dict) or not isinstance(marker.get("recipe"), str)
        if not damaged and marker["recipe"] != folder.recipe:
            raise UserError(
                f"output_dir {out} holds a run of recipe {marker['recipe']!r}, not {folder.recipe!r}; "
                "pass another --output_dir or delete that folder"
            )
        if with_checkpoints and _settle_resume(folder, marker, damaged, resume, dry_run):
            return  # finished already: nothing is written
    if not dry_run:
        _remove_staging_leftovers(out)
        _write_marker(folder)


def _settle_resume(folder: RunFolder, marker: Any, damaged: bool, resume: bool, dry_run: bool) -> bool:
    """Finished, resume, refuse or start over (see the module doc). True when the run is finished."""
    out = folder.path
    record = pending_record(out) or _read_json(out / RESULT_FILE)  # a half-done swap's record is the one to come
    finished = record if isinstance(record, dict) and record.get("status") == "ok" else None
    if resume and finished is not None and finished.get("fingerprint") == folder.fingerprint:
        folder.finished = finished
        return True
    checkpoints = _checkpoints(out)
    same_settings = not damaged and marker.get("fingerprint") == folder.fingerprint
    if resume and same_settings:
        if not dry_run:
            folder.resume_from = _last_complete_checkpoint(out, checkpoints, folder.fingerprint)
    elif resume and (checkpoints or finished is not None):
        what = "a finished run" if finished is not None and not checkpoints else "a run"
        if damaged:
            why = f"its {RUN_MARKER} is damaged, so nothing tells which settings made it"
        else:
            why = f"other settings: {_changes(marker, finished, folder.settings)}"
        raise UserError(
            f"output_dir {out} holds {what} of this recipe with {why}; pass another --output_dir, or "
            "--resume false to start over in it (its checkpoints are moved aside; its finished files are "
            "replaced only when the new run finishes)"
        )
    elif not resume and checkpoints and not dry_run:
        _set_aside(out, checkpoints, "--resume false: moved the earlier run's checkpoints")
    return False


def _write_marker(folder: RunFolder) -> None:
    write_json_atomic(folder.path / RUN_MARKER, {
        "schema": MARKER_SCHEMA, "recipe": folder.recipe, "fingerprint": folder.fingerprint,
        "settings": folder.settings,
    })


def _changes(marker: dict, finished: dict | None, settings: dict[str, Any]) -> str:
    """What differs from the folder's run, named setting by setting."""
    if finished is not None and finished.get("fingerprint") != marker.get("fingerprint"):
        before = {**fingerprinted(finished.get("config") or {}), **(finished.get("inputs_sha256") or {})}
    else:
        before = marker.get("settings")
    if not isinstance(before, dict):
        return "the settings were not recorded (a run made by an older version of this project)"
    changed = [
        f"{key}: {_short(before.get(key))} -> {_short(settings.get(key))}"
        for key in sorted(set(before) | set(settings)) if before.get(key) != settings.get(key)
    ]
    if not changed:
        return "settings recorded differently (an older version of this project)"
    return "; ".join(changed[:6]) + (f"; and {len(changed) - 6} more" if len(changed) > 6 else "")


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:12] + "..."


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _checkpoints(out: Path) -> list[Path]:
    found = [p for p in out.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def seal_checkpoint(checkpoint: Path, fingerprint: str, global_step: int) -> None:
    """Mark a checkpoint complete: called once the Trainer (and every callback) has written it."""
    write_json_atomic(Path(checkpoint) / SEAL_FILE, {"fingerprint": fingerprint, "global_step": global_step})


def _sealed_by(checkpoints: list[Path], fingerprint: str) -> list[Path]:
    return [c for c in checkpoints if (_read_json(c / SEAL_FILE) or {}).get("fingerprint") == fingerprint]


def last_sealed_checkpoint(out: Path, fingerprint: str) -> Path | None:
    """The newest checkpoint in `out` sealed by a run of these settings (what a rerun resumes); changes nothing."""
    complete = _sealed_by(_checkpoints(Path(out)), fingerprint)
    return complete[-1] if complete else None


def _last_complete_checkpoint(out: Path, checkpoints: list[Path], fingerprint: str) -> str | None:
    """The newest checkpoint sealed by a run of these settings. Unsealed ones (a kill or a full disk while saving)
    are removed with a line each; ones sealed by other settings are moved aside."""
    complete = _sealed_by(checkpoints, fingerprint)
    last = complete[-1] if complete else None
    cut_short = [c for c in checkpoints if not (c / SEAL_FILE).is_file()]
    for checkpoint in cut_short:
        shutil.rmtree(checkpoint)
        print(f"{checkpoint.name} is incomplete (cut short while being saved); removed, "
              + (f"resuming from {last.name}" if last else "no complete checkpoint is left: starting from the beginning"))
    foreign = [c for c in checkpoints if c not in complete and c not in cut_short]
    if foreign:
        _set_aside(out, foreign, "Moved checkpoints made by other settings")
    return str(last) if last else None


def _set_aside(out: Path, checkpoints: list[Path], what: str) -> None:
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    destination = out / f"{SUPERSEDED_PREFIX}{stamp}"
    destination.mkdir()
    for checkpoint in checkpoints:
        checkpoint.rename(destination / checkpoint.name)
    print(f"{what} ({', '.join(c.name for c in checkpoints)}) to {destination}: kept, never resumed; "
          "delete it to free the space")


def _remove_staging_leftovers(out: Path) -> None:
    """Final files half-staged by a run that was killed: never moved into place, so never used."""
    for leftover in out.glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)
