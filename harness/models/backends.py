"""Where the trainable model comes from: plain transformers + PEFT, or Unsloth's FastLanguageModel.

The two backends take the same settings and hand the same kind of object (a PEFT model) to the same
Trainer, so a recipe can switch with --backend and its result.json records which one ran.

Unsloth needs an NVIDIA GPU and its own environment (requirements-unsloth.txt: it pins other
versions of torch, transformers and trl than the CPU install). It is only imported when chosen.
This module imports neither torch nor transformers at load time, so a recipe can call
`import_unsloth_first()` before they are imported.
"""
from __future__ import annotations

import importlib.util
import sys

from harness.errors import UserError
from harness.models.loading import compute_dtype, resolve_model
from harness.models.methods import resolve_target_modules
from harness.run.distributed import launched_processes

BACKENDS = ("peft", "unsloth", "auto")
# Unsloth's get_peft_model builds LoRA only; rsLoRA and LoftQ are options of it.
UNSLOTH_METHODS = ("lora", "rslora", "loftq")
UNSLOTH_FIX = (
    "on a machine with an NVIDIA GPU, install it in its own environment "
    "(pip install -r requirements-unsloth.txt), or pass --backend peft to run this recipe on plain PEFT"
)


def import_unsloth_first() -> None:
    """Import unsloth before transformers/peft/trl, as it asks, so all of its patches apply.

    Does nothing where unsloth is not installed, transformers is already imported, or the command
    line picks another backend; a failing import is reported properly later by check_backend.
    """
    if "transformers" in sys.modules or _backend_on_command_line() not in (None, "unsloth", "auto"):
        return
    if importlib.util.find_spec("unsloth") is None:
        return
    try:
        import unsloth  # noqa: F401
    except Exception:  # no GPU, broken install: check_backend explains it in one line
        pass


def _backend_on_command_line() -> str | None:
    args = sys.argv[1:]
    for i, arg in enumerate(args):
        if arg == "--backend" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--backend="):
            return arg.split("=", 1)[1]
    return None


def resolve_backend(backend: str, method: str) -> str:
    """auto: Unsloth where it can run this method (one NVIDIA GPU, package installed), plain PEFT otherwise."""
    if backend != "auto":
        return backend
    import torch


    if launched_processes() > 1:
        print("Backend auto -> peft (several processes: this project runs Unsloth on one GPU only)")
        return "peft"
    usable = torch.cuda.is_available() and importlib.util.find_spec("unsloth") is not None
    chosen = "unsloth" if usable and method in UNSLOTH_METHODS else "peft"
    print(f"Backend auto -> {chosen}" + ("" if usable else " (Unsloth needs an NVIDIA GPU and requirements-unsloth.txt)"))
    return chosen


def check_backend(backend: str, method: str, quantization: str) -> None:
    """Refuse a backend that cannot run here, before anything heavy is loaded."""
    if backend not in BACKENDS:
        raise UserError(f"unknown --backend {backend!r}; use {' or '.join(BACKENDS)}")
    if backend == "peft":
        return
    import torch

    missing = []
    if not torch.cuda.is_available():
        missing.append("no NVIDIA GPU is visible")
    if importlib.util.find_spec("unsloth") is None:
        missing.append("the unsloth package is not installed")
    if missing:
        raise UserError(f"the unsloth backend cannot run here ({' and '.join(missing)}): {UNSLOTH_FIX}")
    if method not in UNSLOTH_METHODS:
        raise UserError(
            f"the unsloth backend trains {', '.join(UNSLOTH_METHODS)}, not {method}; "
            "pass --backend peft for this method"
        )
    if method == "loftq" and quantization != "none":
        raise UserError("Unsloth's LoftQ initialises from a 16-bit base: pass --quantization none")
    try:
        import unsloth  # noqa: F401
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"unsloth is installed but cannot be imported ({first_line}); {UNSLOTH_FIX}") from None


def unsloth_model(model_args, method_args, max_seq_length: int, gradient_checkpointing: bool, seed: int):
    """FastLanguageModel with LoRA attached, as Unsloth's own notebooks build it."""
    import torch
    from peft import LoftQConfig
    from unsloth import FastLanguageModel


    model, _tokenizer = FastLanguageModel.from_pretrained(
        model_name=resolve_model(model_args.model),
        max_seq_length=max_seq_length,
        dtype=compute_dtype(model_args.dtype),
        load_in_4bit=model_args.quantization == "4bit",
        load_in_8bit=model_args.quantization == "8bit",
        device_map={"": torch.cuda.current_device()},
        trust_remote_code=model_args.trust_remote_code,
    )
    method = method_args.method
    return FastLanguageModel.get_peft_model(
        model,
        r=method_args.r,
        target_modules=resolve_target_modules(method_args.target_modules, model),
        lora_alpha=method_args.lora_alpha,
        lora_dropout=method_args.lora_dropout,  # 0 lets Unsloth use its fused kernels
        bias="none",
        # Unsloth's own checkpointing offloads activations to CPU RAM: less memory than transformers'.
        use_gradient_checkpointing="unsloth" if gradient_checkpointing else False,
        random_state=seed,
        use_rslora=method == "rslora",
        init_lora_weights="loftq" if method == "loftq" else True,
        loftq_config=LoftQConfig(loftq_bits=method_args.loftq_bits) if method == "loftq" else {},
    )
