"""Shared machinery for the fine-tuning recipes in recipes/: one folder a concern, lower layers never
import upper ones (tests/test_architecture.py holds it).

  errors       - UserError and the one-line reporting every entry point uses; Ctrl-C / SIGTERM
  run/         - the run: settings (config), their checks, the output folder, the flow every recipe runs,
                 its record (result.json), measuring it, several processes (distributed), shared presets
  models/      - loading and quantizing models, PEFT methods, backends (transformers + PEFT or Unsloth),
                 trained adapter folders, offline models and the llama2.c converter
  data/        - data files and Hub datasets, their formats, chat templates and which tokens train,
                 tokenizing; the task readers (classification, instructions, preference pairs, GSM8K)
  evaluation/  - held-out scores, the forgetting probe, generation over a decoding grid, the LLM judge
  objectives/  - what a run optimises: SFT (TRL's SFTTrainer), DPO, GRPO
  plan/        - the memory planner (`python -m harness.plan`)
  bench/       - benchmark sweeps (`python -m harness.bench`) and the timing comparisons
  reporting/   - the benchmark log, tables and plots (`python -m harness.report`), one run's summary
  alpaca100/   - the "100 best Alpaca" experiment: select, curriculum, decode, judge
  infer, merge - `python -m harness.infer|merge`: an adapter's answers, or merged into its base
  report, summary, select - `python -m` doors to reporting/ and alpaca100/
"""

import logging as _logging

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
