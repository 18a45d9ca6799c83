"""Shared machinery for the fine-tuning recipes in recipes/.

One module per concern:
  config      - dataclass arguments, recipe defaults, YAML/JSON config files, CLI parsing
  errors      - UserError, the one-line error reporting used by every entry point, Ctrl-C / SIGTERM
  checks      - every setting's range, checked before any data or model is loaded
  rundir      - output_dir: which run it holds, resume / refuse / start over, never losing a finished run
  offline_models, convert_llama2c - models that work without the Hub
  models      - model/tokenizer loading, quantization, device placement
  data        - reading data files, prompt formats, tokenization with loss masks
  methods     - PEFT method configs, target-module presets, the AdaLoRA schedule
  training    - Trainer construction and callbacks (AdaLoRA allocation, timing)
  evaluation  - answer-token accuracy and task scores (label likelihood classification)
  measure     - peak memory, timers, provenance, result.json
  recipe      - the end-to-end flow every recipe runs
  backends    - where the trainable model comes from: transformers + PEFT, or Unsloth (GPU, optional)
  adapters    - a trained adapter folder: checks, its run record, attaching it to a base model
  infer, merge - `python -m` entry points: generation / chat with an adapter, merging it into the base
  select      - picking the k most valuable instruction records (`python -m harness.select`)
  curriculum  - easy / medium / hard buckets and stage-by-stage training from the previous adapter
  generation  - answering prompts over a temperature x top_p grid, ROUGE-L
  judge       - LLM judge (OpenAI-compatible endpoint or local model), its cache and score tables
  select_train_judge - the select -> train -> decode -> judge flow of llama2_7b_lora_alpaca100.py
  bench/      - benchmark sweeps (`python -m harness.bench`): plan, trial, executors (one at a time,
                --parallel, --gpus), ray_executor (--executor ray), sweep, cli, executor_timing
"""

import logging as _logging
from pathlib import Path as _Path

# The repository root: data/, models/, recipes/ and results/ are found from here. Defined in this light
# module so that tools which need no model (harness.report) do not import transformers to learn it.
REPO_ROOT = _Path(__file__).resolve().parent.parent


def file_sha256(path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks (data files and downloaded wheels run to 100 MB)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

# bitsandbytes logs, at import time and only on CPUs with AVX512-BF16, that an optional fast CPU
# kernel (the `kernels` package, which fetches from the Hub) is missing; it then uses its own
# kernels. Nearly every entry point imports bitsandbytes (transformers -> peft -> bitsandbytes), so
# that line landed above every message of this project's, on those CPUs only. It is dropped here,
# before anything imports bitsandbytes; its other warnings still show.
BITSANDBYTES_CPU_OPS_LOGGER = "bitsandbytes.backends.cpu.ops"
HARMLESS_LIBRARY_MESSAGES = ("Failed to load CPU gemm_4bit_forward from kernels-community",)


class _DropHarmlessLibraryMessages(_logging.Filter):
    def filter(self, record: _logging.LogRecord) -> bool:
        return not str(record.msg).startswith(HARMLESS_LIBRARY_MESSAGES)


_logging.getLogger(BITSANDBYTES_CPU_OPS_LOGGER).addFilter(_DropHarmlessLibraryMessages())
