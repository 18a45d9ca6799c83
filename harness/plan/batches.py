"""How a supervised run's tokenized rows become micro-batches, and what an average one holds: the shapes the time
planner counts a step at once the data's real lengths are known (a recipe after tokenizing, time_check).

Without them the planner counts every row at --max_seq_length (the most a batch can hold: "at most"). With them,
the run's rows are batched as SFTTrainer batches them:

    padded       each micro-batch padded to its longest row (rounded up to --pad_to_multiple_of: a multiple equal to
                 the window pads every row to it, the fixed-length baseline of harness.bench.packing_timing)
    flattened    padding-free: the micro-batch's rows laid end to end in one row, no padding
    packed       TRL's BFD packing first (trl.pack_dataset, the function SFTTrainer calls: rows of whole examples
                 of at most the window), then flattened as above

and an epoch's micro-batches are taken from a seeded shuffle of the rows, as the Trainer's random sampler takes
them (the exact shuffle of a run is not reproduced: the mean over several shuffles stands for it).

What a micro-batch costs is linear in two figures of it (harness.plan.work fits each counted quantity to them):
positions, what the model computes per micro-batch (padding included), and the attention area, the sum over its
attention blocks of length squared: a padded batch of b rows of length L has b x L^2; a flattened row of S
positions has S^2 under sdpa, which masks it block-diagonally but computes all of it, and the sum of each
example's length squared under FlashAttention-2, which takes each example apart (varlen).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

PADDED, FLATTENED, PACKED = "padded", "flattened", "packed"
# Shuffles averaged over: enough that a data set of a few hundred rows gives a stable mean (the spread of the mean
# area over 8 shuffles of 36 IMDB rows in batches of 4 is under 2%), bounded so that a million rows take one.
MAX_SHUFFLES = 8
ROWS_PER_ESTIMATE = 200_000  # rows batched in all, over the shuffles: the bound on the work here


@dataclass(frozen=True)
class MeanBatch:
    """An average micro-batch of a run, and how many the Trainer sees per epoch."""

    rows: float  # sequences per micro-batch (packed rows count once)
    positions: float  # positions the model computes, padding included
    area: float  # attention blocks' length squared, summed (see the module's docstring)
    tokens: float  # real tokens, no padding
    train_rows: int  # rows the Trainer's sampler sees: examples, or packed rows
    batching: str  # PADDED, FLATTENED or PACKED
    note: str  # how the rows were batched, in words

    def to_dict(self) -> dict:
        return {"rows_per_micro_batch": self.rows, "positions_per_micro_batch": self.positions,
                "attention_area_per_micro_batch": self.area, "tokens_per_micro_batch": self.tokens,
                "train_rows": self.train_rows, "batching": self.batching, "batching_note": self.note}


def batching_of(packing: bool, flattened: bool) -> str:
    """The run's way of batching: packed (TRL's BFD), flattened (padding-free) or padded."""
    return PACKED if packing else FLATTENED if flattened else PADDED


def packed_rows(lengths: list[int], window: int, strategy: str = "bfd") -> list[list[int]]:
    """The examples' lengths as TRL packs them: each packed row's examples' lengths (trl.pack_dataset, run on
    stand-in rows of these lengths)."""
    from datasets import Dataset
    from trl import pack_dataset

    from harness.data.formats import datasets_quiet

    kept = [n for n in lengths if n > 0]  # TRL drops empty rows
    if not kept:
        return []
    stand_in = Dataset.from_dict({"input_ids": [[0] * n for n in kept]})
    with datasets_quiet():  # its map's progress bar is not the planner's to draw
        return [list(row) for row in pack_dataset(stand_in, window, strategy)["seq_lengths"]]


def mean_batch(rows: list[list[int]], batch: int, batching: str, varlen: bool = False,
               pad_to_multiple_of: int | None = None, seed: int = 0) -> MeanBatch:
    """The average micro-batch of `batch` rows over shuffled epochs. rows: each row's examples' lengths (one
    example a row unless packed: packed_rows). varlen: attention takes each example apart (FlashAttention-2)."""
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    rows = [row for row in rows if sum(row) > 0]
    if not rows:
        raise ValueError("no rows with tokens to batch")
    totals = np.array([sum(row) for row in rows], dtype=np.float64)
    squares = np.array([sum(n * n for n in row) for row in rows], dtype=np.float64)
    shuffles = max(1, min(MAX_SHUFFLES, ROWS_PER_ESTIMATE // len(rows)))
    generator = np.random.default_rng(seed)
    count = positions = area = tokens = sizes = 0.0
    for _ in range(shuffles):  # bounded: MAX_SHUFFLES
        order = generator.permutation(len(rows))
        for start in range(0, len(rows), batch):  # bounded: the rows
            chosen = order[start:start + batch]
            size, real = len(chosen), float(totals[chosen].sum())
            if batching == PADDED:
                longest = _rounded(float(totals[chosen].max()), pad_to_multiple_of)
                positions += size * longest
                area += size * longest * longest
            else:  # one flattened row
                length = _rounded(real, pad_to_multiple_of)
                positions += length
                area += float(squares[chosen].sum()) if varlen else length * length
            tokens += real
            sizes += size
            count += 1
    note = {PADDED: "padded to each micro-batch's longest"
                    + (f" (a multiple of {pad_to_multiple_of})" if pad_to_multiple_of else ""),
            FLATTENED: "padding-free (each micro-batch one flattened row)",
            PACKED: f"packed (TRL's BFD) into {len(rows):,} rows, each micro-batch one flattened row"}[batching]
    return MeanBatch(sizes / count, positions / count, area / count, tokens / count, len(rows), batching, note)


def _rounded(length: float, multiple: int | None) -> float:
    return float(math.ceil(length / multiple) * multiple) if multiple else length


def run_batch(cfg, lengths: list[int]) -> MeanBatch:
    """The MeanBatch of the SFT run cfg (a RunConfig; its train settings the run's) on examples of these token
    lengths (cut to the window already): flattened as harness.models.methods.flattens says, except the prompt
    methods, which are never flattened (harness.objectives.sft_trainer); varlen under FlashAttention-2."""
    from harness.models.methods import UNPACKABLE_METHODS, flattens

    targs = cfg.train
    flattened = flattens(targs) and cfg.method.method not in UNPACKABLE_METHODS
    varlen = str(cfg.model.attn_implementation or "").startswith("flash_attention")
    packing = bool(targs.packing) and flattened
    if packing:
        rows = packed_rows(lengths, cfg.data.max_seq_length, str(targs.packing_strategy or "bfd"))
    else:
        rows = [[n] for n in lengths]
    return mean_batch(rows, targs.per_device_train_batch_size, batching_of(packing, flattened), varlen,
                      targs.pad_to_multiple_of, int(targs.seed or 0))


def data_lengths(cfg) -> tuple[list[int], int]:
    """(token lengths of the training examples, held-out examples scored) of an SFT run's data, tokenized as its
    recipe tokenizes them (harness.data.encoding.prepare, the model's own tokenizer; cut to the window). Only where
    both are here: a local data file and an offline model or a model folder; else a UserError says why (nothing is
    downloaded)."""
    import contextlib
    import io
    from pathlib import Path

    from harness.data import reading
    from harness.data.encoding import prepare
    from harness.data.formats import datasets_quiet
    from harness.errors import UserError
    from harness.models.loading import load_tokenizer
    from harness.models.offline import resolve_offline_model

    data, model = cfg.data, cfg.model.model
    if data.dataset_name and not Path(data.dataset_name).exists():
        raise UserError(f"Hub dataset {data.dataset_name}: its rows are not here")
    if resolve_offline_model(model) is None and not Path(model).is_dir():
        raise UserError(f"the tokenizer of {model} is not here (a Hub model)")
    # The reader's notes and datasets' progress bars are for a run; a plan prints only its own lines.
    with contextlib.redirect_stdout(io.StringIO()), datasets_quiet():
        loaded, held_out = reading.load_records(data), reading.load_eval_records(data)
        train, evaluation = reading.split_records(loaded.rows, data, held_out)
        prepared = prepare(train, evaluation, data, load_tokenizer(cfg.model))
    lengths = [len(ids) for ids in prepared.train["input_ids"]]
    return lengths, len(prepared.eval) if prepared.eval is not None else 0
