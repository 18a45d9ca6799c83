"""Errors the user can fix, reported as one line instead of a traceback."""
from __future__ import annotations

import argparse
import contextlib
import sys


class UserError(Exception):
    """Bad input or an impossible setting. The message names the problem and the fix."""


EXIT_USER_ERROR = 2
EXIT_OOM = 3
EXIT_INTERRUPTED = 130


@contextlib.contextmanager
def reported_as_one_line(program: str = "error"):
    """Turn UserError, out-of-memory and Ctrl-C into a one-line message and an exit code.

    Anything else is a bug in this project and keeps its traceback.
    """
    try:
        yield
    except UserError as exc:
        print(f"{program}: {exc}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print(f"{program}: interrupted; checkpoints already written are kept", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except MemoryError as exc:  # torch.OutOfMemoryError is not a MemoryError; see is_out_of_memory
        print(f"{program}: out of memory ({exc}); {OOM_HINT}", file=sys.stderr)
        sys.exit(EXIT_OOM)
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        print(f"{program}: out of GPU memory; {OOM_HINT}", file=sys.stderr)
        sys.exit(EXIT_OOM)


OOM_HINT = (
    "try --quantization 4bit, a smaller --per_device_train_batch_size (raise "
    "--gradient_accumulation_steps to keep the effective batch), a shorter --max_seq_length, "
    "or --gradient_checkpointing true"
)


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "CUDA out of memory" in str(exc)


def raise_usage_error(message: str):
    """For argparse's `parser.error`: argparse prints its whole usage block before the message and
    exits; a UserError becomes the usual one line under `reported_as_one_line`."""
    raise UserError(f"{message} (see --help)")


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, with bad flags reported as one line (parse inside `reported_as_one_line`)."""

    def error(self, message):
        raise_usage_error(message)
