"""Which process this is, from the launcher's environment (`accelerate launch`, torchrun): readable before
anything initialises, and by the lowest layer (harness.errors speaks from the main process only).
harness.run.distributed does the rest of running as several processes."""
from __future__ import annotations

import os


def rank() -> int:
    """This process's global rank, from the launcher's environment (readable before anything initialises)."""
    return int(os.environ.get("RANK", "0") or 0)


def launched_processes() -> int:
    """How many processes the launcher started (WORLD_SIZE), before the process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def is_main() -> bool:
    return rank() == 0
