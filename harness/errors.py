"""Errors the user can fix, reported as one line instead of a traceback, and how signals end a run."""
from __future__ import annotations

import argparse
import contextlib
import errno
import os
import signal
import sys
import threading

from harness.processes import is_main


class UserError(Exception):
    """Bad input or an impossible setting. The message names the problem and the fix."""


class RunFailed(Exception):
    """A run that cannot succeed as it is (its training diverged, the disk is full): the message names what
    happened and what to do. Recorded as failed, reported as one line, exit EXIT_RUN_FAILED."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler, `kill`, a closing notebook): handled exactly like Ctrl-C."""


EXIT_USER_ERROR = 2
EXIT_OOM = 3
EXIT_RUN_FAILED = 4  # RunFailed, or a full disk
EXIT_INTERRUPTED = 130

INTERRUPTED_NOTE = "files already written are kept"


@contextlib.contextmanager
def reported_as_one_line(program: str = "error", interrupted_note: str = INTERRUPTED_NOTE):
    """Turn UserError, out-of-memory, Ctrl-C and SIGTERM into a one-line message and an exit code.

    Anything else is a bug in this project and keeps its traceback.
    """
    with sigterm_as_interrupt():
        try:
            yield
        except UserError as exc:
            if is_main():  # under accelerate launch every process refuses alike: said once
                _say(f"{program}: {exc}")
            sys.exit(EXIT_USER_ERROR)
        except KeyboardInterrupt as exc:
            how = "stopped by SIGTERM" if isinstance(exc, Terminated) else "interrupted"
            if is_main():  # the launcher stops every process alike
                _say(f"{program}: {how}; {interrupted_note}")
            sys.exit(EXIT_INTERRUPTED)
        except RunFailed as exc:
            if is_main():  # a diverged run diverges in every process
                _say(f"{program}: {exc}")
            sys.exit(EXIT_RUN_FAILED)
        except MemoryError as exc:  # torch.OutOfMemoryError is not a MemoryError; see is_out_of_memory
            _say(f"{program}: out of memory ({exc}); {OOM_HINT}")
            sys.exit(EXIT_OOM)
        except Exception as exc:
            if is_disk_full(exc):  # outside a run's record, which says where (harness.run.record)
                where = f" in {os.path.dirname(exc.filename)}" if getattr(exc, "filename", None) else ""
                _say(f"{program}: no space left on device{where}: free space and rerun the same command")
                sys.exit(EXIT_RUN_FAILED)
            if not is_out_of_memory(exc):
                raise
            _say(f"{program}: out of GPU memory; {OOM_HINT}")
            sys.exit(EXIT_OOM)


def _say(message: str) -> None:
    """One line on stderr, starting on a line of its own even when a progress bar was being drawn."""
    _close_progress_bars()
    sys.stdout.flush()
    print(" ".join(message.split()), file=sys.stderr, flush=True)  # a message never spans lines


def _close_progress_bars() -> None:
    tqdm_module = sys.modules.get("tqdm")
    if tqdm_module is None:
        return
    for bar in list(getattr(tqdm_module.tqdm, "_instances", ())):
        with contextlib.suppress(Exception):  # a bar half torn down already: nothing to finish
            bar.close()  # draws its last state and ends its line


# SIGTERMs received inside sigterm_as_interrupt. The handler's exception can be lost: raised while Python runs a
# __del__, a weakref finalizer or a gc callback, it is printed as "Exception ignored" and the run goes on (a test
# saw a run train 2 minutes past its SIGTERM). raise_if_terminated, called at every optimizer step's end, raises
# it again.
_TERMINATED: list[int] = []


def _raise_terminated(signum, frame):
    _TERMINATED.append(signum)
    raise Terminated()


def raise_if_terminated() -> None:
    """Raise Terminated if a SIGTERM came and its exception was lost on the way (see _TERMINATED)."""
    if _TERMINATED:
        raise Terminated()


@contextlib.contextmanager
def sigterm_as_interrupt():
    """While inside, SIGTERM raises Terminated (a KeyboardInterrupt): the run records itself as
    interrupted and keeps its checkpoints, as it does on Ctrl-C. Only the main thread gets signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        if previous is not _raise_terminated:  # the outermost scope: a SIGTERM lost in an inner one still counts
            _TERMINATED.clear()  # handled, or the scope is over: a later run of this process starts clean


@contextlib.contextmanager
def signals_deferred():
    """Hold Ctrl-C and SIGTERM back for a few file operations that must all happen or none (moving a
    finished run's files into place and writing its record); raise them once those are done."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: caught.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if caught:
        raise Terminated() if caught[0] == signal.SIGTERM else KeyboardInterrupt()


OOM_HINT = (
    "try --quantization 4bit, a smaller --per_device_train_batch_size (raise "
    "--gradient_accumulation_steps to keep the effective batch), a shorter --max_seq_length, "
    "or --gradient_checkpointing true"
)


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "CUDA out of memory" in str(exc)


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(exc: BaseException | None) -> bool:
    """ENOSPC or EDQUOT anywhere in the exception's chain; safetensors' error says it only in its text."""
    said = [os.strerror(code) for code in DISK_FULL] + [f"(os error {code})" for code in DISK_FULL]
    for _ in range(8):  # a chain is short; a cycle must not loop
        if exc is None:
            return False
        if (isinstance(exc, OSError) and exc.errno in DISK_FULL) or any(text in str(exc) for text in said):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def first_line(exc: BaseException) -> str:
    """The first non-blank line of an exception's message (at most 300 characters), or its type's name: what a
    one-line refusal quotes of a library's error."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:300]


def raise_usage_error(message: str):
    """For argparse's `parser.error`: argparse prints its whole usage block before the message and
    exits; a UserError becomes the usual one line under `reported_as_one_line`."""
    raise UserError(f"{message} (see --help)")


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, with bad flags reported as one line (parse inside `reported_as_one_line`)."""

    def error(self, message):
        raise_usage_error(message)
