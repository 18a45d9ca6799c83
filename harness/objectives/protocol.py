"""What a run optimises, as the shared flow (harness.run.flow.train) sees it: the Workload a preflight finds and
the three steps an Objective supplies."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Workload:
    """What a run will train on and for how long, known before any model or tokenizer is loaded."""

    data: Any  # harness.data.reading.RecordFile of data_file
    eval_data: Any  # ... of eval_file, or None
    train_rows: list[dict[str, Any]]
    eval_rows: list[dict[str, Any]]
    targs: Any  # TrainingArguments, adjusted (no evaluation without eval rows)
    schedule: Any  # AdaLoraSchedule or None
    forgetting: Any = None  # RecordFile of forgetting_file, or None when not measured

    def left_out(self) -> dict[str, Any]:
        """Rows left out for having no text, per file, for result.json."""
        files = {"data_file": self.data, "eval_file": self.eval_data}
        return {name: part.report() for name, part in files.items() if part is not None}

    def left_out_lines(self) -> list[str]:
        return [part.summary() for part in (self.data, self.eval_data) if part is not None and part.left_out]


@dataclass(frozen=True)
class Objective:
    """The three steps a run's objective supplies to the shared flow of train()."""

    preflight: Any  # (cfg, output_dir) -> Workload: every check that needs no model or tokenizer
    prepare: Any  # (cfg, work, tokenizer) -> data with .stats: every check that needs the tokenizer
    train_and_evaluate: Any  # (cfg, work, tokenizer, prepared, folder, memory) -> the record's fields
