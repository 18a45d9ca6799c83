"""Merge a LoRA-family / IA3 / AdaLoRA adapter into its base model and save a plain model.

    python -m harness.merge --base Qwen/Qwen2.5-0.5B-Instruct --adapter outputs/qwen2_5_0_5b_lora --out merged/qwen2_5_lora
    python -m harness.merge --adapter outputs/llama2_7b_lora --out merged/llama2_lora --dequantize --dtype float16

The merged model (safetensors + tokenizer) loads with AutoModelForCausalLM alone and runs as fast
as the base. Before anything is written, the saved model is loaded back and its logits on a probe
text are compared with the adapter model's; the folder appears only when they agree within the
tolerance (merge_info.json in it records the check).

Refused, with the reason: prompt-learning adapters (prompt/prefix/P-tuning add virtual tokens and
have no weights to merge) and adapters trained on a 4/8-bit base or a pre-quantized base, unless
--dequantize: merging into quantized weights would round them again, so the merge is done into
16-bit weights instead, and the result differs slightly from the quantized model that was trained.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from harness.errors import OneLineArgumentParser, UserError, reported_as_one_line

MERGE_INFO = "merge_info.json"
PROBE_TEXT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nExplain in two sentences why the sky is blue.\n\n### Response:\n"
)
# Largest logit difference allowed, relative to the largest logit: merging reorders float sums, and in
# 16-bit the merged weights are rounded once more.
DEFAULT_RTOL = {"float32": 1e-4, "half": 5e-2}


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog="python -m harness.merge", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--base", help="Hub id, local folder or offline model name (default: the one the adapter's run recorded)")
    add("--adapter", required=True, help="folder holding adapter_config.json (a recipe's output_dir)")
    add("--out", required=True, help="new (or empty) folder for the merged model")
    add("--dequantize", action="store_true",
        help="allow adapters trained on a 4/8-bit base: merge into 16-bit weights instead")
    add("--dtype", default="auto",
        help="dtype of the merged weights: auto (bf16/fp16 on GPU, fp32 on CPU) | bfloat16 | float16 | float32")
    add("--rtol", type=float,
        help="allowed logit difference relative to the largest logit (default 1e-4 in float32, 5e-2 in 16-bit)")
    add("--trust_remote_code", action="store_true", help="run code shipped with the model repo (only for repos you trust)")
    return parser


def _check_out(out: Path) -> None:
    """--out must be a new or empty folder, outside any run's folder, that can be written; checked (with a
    folder made and removed again) before anything loads."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder; pass a new folder for the merged model")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(
            f"--out {out} already exists and is not an empty folder; pass a new folder so nothing is overwritten"
        )
    absolute = out.absolute()
    run = next((p for p in absolute.parents if _holds_a_run(p)), None)
    if run is not None:
        raise UserError(
            f"--out {out} is inside the run folder {run}: a rerun there replaces the run's files and would leave "
            f"this merged model beside an adapter it was not made from; pass a folder outside it, e.g. {run}-merged"
        )
    existing = next(p for p in absolute.parents if p.exists())  # the root always does
    if not existing.is_dir():
        raise UserError(f"--out {out} cannot be created: {existing} is a file, not a folder; pass a folder you can "
                        "write to")
    try:  # os.access says yes to root even where the file system is read-only: try it
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".merge-write-test-"))
    except OSError as exc:
        raise UserError(f"--out {out} cannot be created: {existing} cannot be written ({exc.strerror}); pass a "
                        "folder you can write to") from None


def _unwritable(out: Path, exc: OSError) -> UserError:
    return UserError(f"the merged model could not be written next to {out} ({exc.strerror or exc}); nothing was "
                     f"written to {out}: free space or pass --out somewhere you can write to")


def _holds_a_run(folder: Path) -> bool:
    """A recipe's output_dir: its marker, or a record of this project (a result.json naming its recipe)."""
    from harness.run.folder import RESULT_FILE, RUN_MARKER

    if (folder / RUN_MARKER).is_file():
        return True
    try:
        record = json.loads((folder / RESULT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and "recipe" in record


def _prequantized(source: str, trust_remote_code: bool) -> bool:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return False  # load_model reports an unloadable base properly
    return getattr(config, "quantization_config", None) is not None


def _probe_logits(model, tokenizer):
    import torch

    inputs = tokenizer(PROBE_TEXT, return_tensors="pt").to(next(model.parameters()).device)
    with torch.no_grad():
        return model(**inputs).logits.float().cpu()


def merge(args) -> dict:
    # imported here, not at the top: --help and one-line refusals answer without importing torch
    from harness.files import write_json_atomic
    from harness.models.adapters import attach, check_fits, open_adapter
    from harness.models.loading import compute_dtype, load_model, load_tokenizer, resolve_model
    from harness.run.config import ModelArguments
    from harness.run.measure import versions

    if args.rtol is not None and not args.rtol >= 0:  # also catches nan
        raise UserError(f"--rtol must be >= 0 (a fraction of the largest logit), got {args.rtol}")
    compute_dtype(args.dtype)  # an unknown --dtype is refused now, not after the merge
    adapter = open_adapter(args.adapter)
    if adapter.is_prompt_learning:
        raise UserError(
            f"a {adapter.peft_type} adapter cannot be merged: it adds virtual tokens to the input instead of "
            f"changing weights; use it as it is (python -m harness.infer --adapter {args.adapter})"
        )
    out = Path(args.out).expanduser()
    _check_out(out)
    base = adapter.base_model(args.base)
    model_args = ModelArguments(model=base, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    prequantized = _prequantized(resolve_model(base), args.trust_remote_code)
    quantized = adapter.trained_quantization if adapter.trained_quantization != "none" else None
    if (quantized or prequantized) and not args.dequantize:
        what = f"trained on a {quantized} base" if quantized else f"for a pre-quantized base ({base})"
        raise UserError(
            f"the adapter was {what}: merging into quantized weights would round them again, so nothing is "
            "merged unless you pass --dequantize (merges into 16-bit weights; the result differs slightly "
            "from the quantized model you trained)"
        )
    dtype = compute_dtype(args.dtype)
    rtol = args.rtol if args.rtol is not None else DEFAULT_RTOL["float32" if dtype.itemsize == 4 else "half"]

    tokenizer = load_tokenizer(model_args)
    check_fits(adapter, model_args, base)  # an adapter for another base is refused before the weights load
    model = load_model(model_args, "lora", gradient_checkpointing=False, for_training=False)
    if prequantized:
        model = model.dequantize()  # transformers turns bitsandbytes layers back into plain ones
    with_adapter = attach(model, adapter, base).eval()
    expected = _probe_logits(with_adapter, tokenizer)
    merged = with_adapter.merge_and_unload()

    # Written next to --out and renamed into place only once it has passed the check.
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    except OSError as exc:
        raise _unwritable(out, exc) from None
    try:
        merged.save_pretrained(staging)  # safetensors
        tokenizer.save_pretrained(staging)
        del merged, with_adapter, model
        gc.collect()
        reloaded = load_model(ModelArguments(model=str(staging), dtype=args.dtype,
                                             trust_remote_code=args.trust_remote_code),
                              "lora", gradient_checkpointing=False, for_training=False)
        actual = _probe_logits(reloaded.eval(), tokenizer)
        del reloaded
        difference = float((actual - expected).abs().max())
        scale = float(expected.abs().max()) or 1.0
        relative = difference / scale
        info = {
            "base": base,
            "adapter": str(adapter.path),
            "peft_type": adapter.peft_type,
            "trained_quantization": adapter.trained_quantization,
            "dequantized": bool(quantized or prequantized),
            "dtype": str(dtype).removeprefix("torch."),
            "logits_check": {
                "probe_tokens": int(expected.shape[1]),
                "max_abs_difference": difference,
                "relative_to_largest_logit": relative,
                "rtol": rtol,
                "passed": relative <= rtol,
            },
            "versions": versions(),
        }
        if relative > rtol:
            raise UserError(
                f"merge check failed: the merged model's logits differ from the adapter model's by {difference:.3g} "
                f"({relative:.3g} of the largest logit, tolerance {rtol:g}); nothing was written to {out}"
            )
        write_json_atomic(staging / MERGE_INFO, info)
        staging.chmod(0o755)  # mkdtemp's 0700 would hide the model from other users
        if out.is_dir():
            out.rmdir()  # empty, checked above
        os.replace(staging, out)
    except OSError as exc:  # disk full, permissions changed under us: the staging folder goes, --out stays as it was
        raise _unwritable(out, exc) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(
        f"Merged model written to {out} (safetensors + tokenizer). Logits check passed: max |difference| "
        f"{difference:.3g} = {relative:.3g} of the largest logit (tolerance {rtol:g}) "
        f"over {info['logits_check']['probe_tokens']} tokens."
    )
    return info


def main(argv: list[str] | None = None) -> int:
    with reported_as_one_line("merge"):
        merge(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
