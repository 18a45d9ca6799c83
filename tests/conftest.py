"""Shared test setup: offline, CPU, tiny models built once per session. The harness is importable through the
README's set-up (an editable install)."""
from __future__ import annotations

import os
import signal
import tempfile
from pathlib import Path

# Set before transformers/huggingface_hub are imported anywhere: they read it at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not os.environ.get("FT_COOKBOOK_CACHE"):  # a cache the user gave is used as it is: no empty folder made beside it
    os.environ["FT_COOKBOOK_CACHE"] = tempfile.mkdtemp(prefix="ft-cookbook-test-models-")
# No test may depend on which machine's calibration is committed in results/gpu (a CPU's there would make this
# machine's plans and reports differ from another's): the planner reads a folder that is not there (nothing made)
# unless a test names one.
os.environ["FT_COOKBOOK_CALIBRATION_DIR"] = str(Path(tempfile.gettempdir()) / f"ft-cookbook-no-calibrations-{os.getpid()}")

import pytest  # noqa: E402  (after the environment above)


def _sigint_as_default() -> None:  # runs in the child between fork and exec
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def interruptible() -> dict:
    """Popen keyword arguments that let a SIGINT reach the child as a Ctrl-C would. A shell without job
    control that starts the tests in the background (`bash -c 'pytest &'`, some CI runners) starts them
    with SIGINT ignored; children inherit that, Python then installs no KeyboardInterrupt handler, and a
    test that interrupts a run would wait for a run that never hears it."""
    return {"preexec_fn": _sigint_as_default}


@pytest.fixture
def recipe_argv(tmp_path):
    """Small, fast settings for running a recipe on a tiny model; extend with test-specific flags."""

    def make(*extra: str, model: str = "tiny-qwen2", output_dir: Path | None = None) -> list[str]:
        return [
            "--model", model,
            "--output_dir", str(output_dir or tmp_path / "run"),
            "--max_samples", "40",
            "--max_seq_length", "96",
            "--num_train_epochs", "1",
            "--gradient_accumulation_steps", "2",
            "--eval_steps", "6",
            "--save_steps", "6",
            "--disable_tqdm", "true",
            *extra,
        ]

    return make


@pytest.fixture
def one_torch_thread():
    """Run a test's tiny models on one CPU thread. They are no faster on two, and on a busy 2-core
    machine two threads waiting on each other made every forward pass ~30x slower (measured)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
