"""Where the project's files are: the checkout's folders (data/, models/, recipes/, results/) and the cache that
built offline models go to. One place, so that a move or an installed copy changes one file."""
from __future__ import annotations

import os
from pathlib import Path

# The checkout this package sits in (an editable install, `pip install -e .`, keeps it there).
REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "data"
RECIPES_DIR = REPO_ROOT / "recipes"
RESULTS_DIR = REPO_ROOT / "results"
OUTPUTS_DIR = REPO_ROOT / "outputs"
STORIES260K_DIR = REPO_ROOT / "models" / "stories260k"
LLAMA2C_DIR = REPO_ROOT / "models" / "llama2c"

# The offline models' build version, part of their cache folder's name: bump it when a build recipe
# (harness.models.builders) changes, so stale caches are never reused.
BUILD_VERSION = 2


def offline_cache_dir() -> Path:
    """Folder holding built offline models: ``$FT_COOKBOOK_CACHE`` or ``~/.cache/ft-cookbook/offline_models``."""
    env = os.environ.get("FT_COOKBOOK_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ft-cookbook" / "offline_models"
