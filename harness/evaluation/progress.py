"""Progress bars for the project's own long loops (scoring the held-out set, the forgetting probe, generation, the
judge), in the Trainer's style: tqdm on stderr, with counts and a rate, gone when done; quiet under --disable_tqdm
and in every process but the main one under `accelerate launch`."""
from __future__ import annotations

import contextlib

_enabled = True
MIN_INTERVAL = 0.1  # seconds between redraws, tqdm's default


def configure(disable: bool) -> None:
    """Set once per run from its settings (harness.run.flow.train): --disable_tqdm, or not the main process."""
    global _enabled
    _enabled = not disable


@contextlib.contextmanager
def bar(total: int, desc: str, unit: str = "example"):
    """A bar to .update(n) as a loop goes; a do-nothing one when bars are off or there is nothing to count."""
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True, mininterval=MIN_INTERVAL,
              disable=not _enabled or total <= 0) as progress:
        yield progress
