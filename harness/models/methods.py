"""Fine-tuning methods: which PEFT config each one is, which modules it adapts, AdaLoRA's schedule."""
from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from harness.errors import UserError
from harness.models.loading import architecture
from harness.run.config import MethodArguments

LORA_FAMILY = ("lora", "dora", "rslora", "loftq")
PROMPT_LEARNING = ("prompt_tuning", "prefix_tuning", "p_tuning")
METHODS = ("none", "full", *LORA_FAMILY, "adalora", "ia3", *PROMPT_LEARNING)

# Presets by module name. Names differ across architectures (OPT calls o_proj out_proj), so a preset
# keeps only the names the model really has; all7 is the exact Llama/Qwen/Mistral set and is strict.
ATTENTION_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "qkv_proj", "c_attn", "query_key_value")
QV_NAMES = ("q_proj", "v_proj", "query", "value")
ALL7 = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PRESETS = ("all-linear", "attention", "qv", "all7")



# Methods whose virtual tokens (prompt tuning, P-tuning) or extra keys (prefix tuning) sit in front of each
# sequence: a packed or flattened row is one sequence to them, so every example after the first would see the
# first one's virtual tokens at the wrong positions and attend across examples.
UNPACKABLE_METHODS = ("prompt_tuning", "prefix_tuning", "p_tuning")


def flattens(targs) -> bool:
    """Whether batches are one flattened row with position_ids marking where each example starts (padding-free, or
    TRL's BFD packing, which implies it) instead of padded rows with an attention mask."""
    return bool(targs.padding_free or (targs.packing and targs.packing_strategy in ("bfd", "bfd_split")))


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Leaf names of every linear layer (quantized ones included) except the output head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not head  # bnb's Linear4bit/8bitLt subclass Linear
    }
    return sorted(names)


def resolve_target_modules(spec: str, model: torch.nn.Module) -> list[str]:
    available = linear_module_names(model)
    if spec == "all-linear":
        chosen = available
    elif spec == "attention":
        chosen = [n for n in ATTENTION_NAMES if n in available]
    elif spec == "qv":
        chosen = [n for n in QV_NAMES if n in available]
    elif spec == "all7":
        missing = [n for n in ALL7 if n not in available]
        if missing:
            raise UserError(
                f"--target_modules all7 needs {', '.join(missing)}, which this model does not have; "
                f"use all-linear or name modules from: {', '.join(available)}"
            )
        chosen = list(ALL7)
    else:
        chosen = [n.strip() for n in spec.split(",") if n.strip()]
        unknown = [n for n in chosen if n not in available]
        if unknown:
            raise UserError(
                f"--target_modules: this model has no linear layer named {', '.join(unknown)}; "
                f"it has {', '.join(available)} (or use a preset: {', '.join(PRESETS)})"
            )
    if not chosen:
        raise UserError(
            f"--target_modules {spec} matches no layer of this model; it has {', '.join(available)}"
        )
    return chosen


# ---------------------------------------------------------------------------- AdaLoRA schedule

@dataclass(frozen=True)
class AdaLoraSchedule:
    total_step: int
    tinit: int
    tfinal: int
    deltaT: int


# Fractions of the optimizer steps used when tinit/tfinal/deltaT are not given (the Kaggle script's).
TINIT_FRACTION, TFINAL_FRACTION, DELTA_T_FRACTION = 0.2, 0.6, 0.05


def count_optimizer_steps(n_train: int, batch_size: int, accumulation: int, epochs: float, max_steps: int) -> int:
    """Optimizer steps the Trainer will take: the same arithmetic as Trainer.set_initial_training_values."""
    if max_steps > 0:
        return max_steps
    batches = math.ceil(n_train / batch_size)
    per_epoch = max(batches // accumulation + int(batches % accumulation > 0), 1)
    return math.ceil(epochs * per_epoch)


def adalora_schedule(args: MethodArguments, total_step: int) -> AdaLoraSchedule:
    """tinit/tfinal/deltaT from the real number of steps, refused when no budgeting can happen."""
    if args.init_r < 1 or args.target_r < 1 or args.target_r > args.init_r:
        raise UserError(
            f"AdaLoRA needs 1 <= --target_r <= --init_r, got target_r {args.target_r}, init_r {args.init_r}"
        )
    tinit = args.tinit if args.tinit is not None else int(total_step * TINIT_FRACTION)
    tfinal = args.tfinal if args.tfinal is not None else max(1, int(total_step * TFINAL_FRACTION))
    delta = args.deltaT if args.deltaT is not None else max(1, int(total_step * DELTA_T_FRACTION))
    if tinit < 0:
        raise UserError(f"AdaLoRA: --tinit must be >= 0 (warm-up steps before pruning), got {tinit}")
    if delta < 1:
        raise UserError(f"AdaLoRA: --deltaT must be >= 1 (steps between reallocations), got {delta}")
    problem = None
    if total_step < 2:
        problem = f"only {total_step} optimizer step(s)"
    elif tfinal < 1:
        problem = "tfinal must be >= 1, or the final rank allocation never happens"
    elif tinit >= total_step - tfinal:
        problem = f"tinit {tinit} + tfinal {tfinal} leave no budgeting phase in {total_step} steps"
    if problem:
        raise UserError(
            f"impossible AdaLoRA schedule: {problem}; train for more steps (--num_train_epochs, --max_steps, "
            "more data or a smaller --gradient_accumulation_steps) or lower --tinit/--tfinal"
        )
    return AdaLoraSchedule(total_step, tinit, tfinal, delta)


# ---------------------------------------------------------------------------- PEFT configs

def peft_config(args: MethodArguments, model: torch.nn.Module, schedule: AdaLoraSchedule | None = None):
    """The PEFT config for the chosen method, or None for full fine-tuning and for none."""
    import peft

    method = args.method
    loaded_in_4bit = getattr(model, "is_loaded_in_4bit", False)
    if method in ("full", "none"):
        return None
    if method in LORA_FAMILY:
        return peft.LoraConfig(
            task_type="CAUSAL_LM",
            r=args.r,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            target_modules=resolve_target_modules(args.target_modules, model),
            bias="none",
            use_dora=method == "dora",
            use_rslora=method == "rslora",
            # On a 16-bit base, LoftQ quantizes it itself; on a 4-bit one, initialise_loftq runs afterwards.
            init_lora_weights="loftq" if method == "loftq" and not loaded_in_4bit else True,
            loftq_config=peft.LoftQConfig(loftq_bits=args.loftq_bits) if method == "loftq" and not loaded_in_4bit else {},
        )
    if method == "adalora":
        assert schedule is not None, "AdaLoRA needs its schedule"
        return peft.AdaLoraConfig(
            task_type="CAUSAL_LM",
            init_r=args.init_r,
            target_r=args.target_r,
            beta1=args.beta1,
            beta2=args.beta2,
            tinit=schedule.tinit,
            tfinal=schedule.tfinal,
            deltaT=schedule.deltaT,
            total_step=schedule.total_step,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            orth_reg_weight=args.orth_reg_weight,
            target_modules=resolve_target_modules(args.target_modules, model),
        )
    if method == "ia3":
        # PEFT knows each architecture's attention and feed-forward modules for IA3; an explicit
        # list would also need feedforward_modules, so only the default is offered.
        return peft.IA3Config(task_type="CAUSAL_LM")
    # Virtual tokens are prepended to the input embeddings, so they take the embeddings' width. PEFT would take the
    # config's hidden_size, which is another width where a projection follows the embeddings (OPT-350m: 512 wide
    # embeddings, 1024 hidden): the recipe would fail at its first forward on the real model.
    token_dim = model.get_input_embeddings().embedding_dim if method in ("prompt_tuning", "p_tuning") else None
    if method == "prompt_tuning":
        return peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=args.num_virtual_tokens,
                                       token_dim=token_dim)
    if method == "prefix_tuning":
        return peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=args.num_virtual_tokens)
    if method == "p_tuning":
        return peft.PromptEncoderConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=args.num_virtual_tokens,
            encoder_hidden_size=args.encoder_hidden_size,
            token_dim=token_dim,
        )
    raise UserError(f"unknown --method {method!r}; choose one of {', '.join(METHODS)}")


def check_method(args: MethodArguments, quantization: str, gradient_checkpointing: bool = False,
                 this_machine: bool = True) -> None:
    """Refuse impossible combinations before anything heavy is loaded. this_machine=False leaves out what
    only the machine running it decides (a GPU, scipy): the memory planner plans runs for other machines."""
    if args.method not in METHODS:
        raise UserError(f"unknown --method {args.method!r}; choose one of {', '.join(METHODS)}")
    if args.method == "prefix_tuning" and gradient_checkpointing:
        # The prefix is fed in as the key/value cache, which each layer extends in place; recomputing
        # a layer in the backward pass would extend it again. PEFT refuses it too, less clearly.
        raise UserError("prefix tuning cannot be combined with gradient checkpointing: pass --activation_checkpointing false")
    if args.method == "full" and quantization != "none":
        raise UserError("full fine-tuning cannot update quantized weights; use --quantization none or a LoRA method")
    if args.method == "loftq":
        if quantization == "8bit":
            raise UserError(
                "LoftQ works on a 4-bit base or a 16-bit one, not 8-bit: use --quantization 4bit, "
                "or none (LoftQ then quantizes the base itself, --loftq_bits 4 or 8)"
            )
        if quantization == "4bit" and args.loftq_bits != 4:
            raise UserError(f"on a 4-bit base LoftQ needs --loftq_bits 4 (got {args.loftq_bits}); or use --quantization none")
        if this_machine and quantization == "none" and importlib.util.find_spec("scipy") is None:
            raise UserError("LoftQ on a 16-bit base needs scipy (PEFT requires it): pip install scipy, or use --quantization 4bit")
        if this_machine and not torch.cuda.is_available():
            raise UserError(
                "LoftQ needs an NVIDIA GPU: PEFT computes its initialisation with CUDA; run it on a GPU "
                "machine, or use --method lora here"
            )
    if args.method in LORA_FAMILY and args.r < 1:
        raise UserError(f"--r must be at least 1, got {args.r}")


ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"


PEFT_TYPES = {**dict.fromkeys(LORA_FAMILY, "LORA"), "adalora": "ADALORA", "ia3": "IA3",
              "prompt_tuning": "PROMPT_TUNING", "prefix_tuning": "PREFIX_TUNING", "p_tuning": "P_TUNING"}


def check_init_adapter(path: str | None, args: MethodArguments) -> None:
    """Refuse an --init_adapter that cannot be used, before the model is loaded: no adapter there, or
    one of another method or rank (its target modules are compared once they are known: check_targets)."""
    if not path:
        return
    if args.method in ("full", "none"):
        raise UserError(f"--init_adapter starts an adapter from saved weights; --method {args.method} has no adapter")
    _require_adapter_weights(path)
    saved = _saved_adapter_config(path)
    problems = []
    if saved.get("peft_type") != PEFT_TYPES[args.method]:
        problems.append(f"it is a {saved.get('peft_type')} adapter, this run trains {PEFT_TYPES[args.method]}")
    elif args.method in LORA_FAMILY:
        if saved.get("r") != args.r:
            problems.append(f"its rank is {saved.get('r')}, this run's --r is {args.r}")
        if bool(saved.get("use_dora")) != (args.method == "dora"):
            problems.append("DoRA on one side only")
    elif args.method == "adalora" and saved.get("init_r") != args.init_r:
        problems.append(f"its init_r is {saved.get('init_r')}, this run's --init_r is {args.init_r}")
    if problems:
        raise UserError(
            f"--init_adapter {path} does not fit this run's adapter ({'; '.join(problems)}); use the --method, "
            "--r and --target_modules it was trained with"
        )


def _require_adapter_weights(path: str | Path) -> None:
    if not (Path(path) / ADAPTER_WEIGHTS_FILE).is_file():
        raise UserError(f"--init_adapter {path} holds no adapter ({ADAPTER_WEIGHTS_FILE}); pass the output_dir of a finished PEFT run")


def _saved_adapter_config(path: str | Path) -> dict[str, Any]:
    try:
        saved = json.loads((Path(path) / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise UserError(f"--init_adapter {path} has no readable adapter_config.json; pass the output_dir of a finished PEFT run") from None
    return saved if isinstance(saved, dict) else {}


def check_targets(args: MethodArguments, model_args, init_adapter: str | None = None) -> None:
    """--target_modules against the model's layers (its architecture alone, weights not loaded), and
    against the layers an --init_adapter was trained on."""
    if args.method not in (*LORA_FAMILY, "adalora"):
        return
    targets = resolve_target_modules(args.target_modules, architecture(model_args))
    if init_adapter:
        saved = _saved_adapter_config(init_adapter).get("target_modules") or []
        saved = [saved] if isinstance(saved, str) else saved
        if sorted(saved) != sorted(targets):
            raise UserError(
                f"--init_adapter {init_adapter} was trained on {', '.join(sorted(saved))}, this run targets "
                f"{', '.join(sorted(targets))}; pass the --target_modules it was trained with"
            )


def load_adapter_weights(model, directory: str | Path) -> None:
    """Warm start: copy a saved adapter's weights into this run's freshly built adapter.

    The run keeps its own PEFT config; the saved adapter must have the same method, rank and
    target modules, or nothing is loaded and the mismatch is reported."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    directory = Path(directory)
    _require_adapter_weights(directory)
    if is_adalora(model):  # saved pruned to its kept ranks: put back at full size
        load_adalora_checkpoint(model, directory)
        return
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    try:
        result = set_peft_model_state_dict(model, load_file(str(directory / ADAPTER_WEIGHTS_FILE)),
                                           adapter_name=model.active_adapter)
        problem = (
            f"unexpected {result.unexpected_keys[0]}" if result.unexpected_keys
            else next((f"missing {k}" for k in result.missing_keys if k in trainable), None)
        )
    except (RuntimeError, ValueError) as exc:  # size mismatches: another rank or model
        problem = str(exc).strip().splitlines()[0][:300]
    if problem:
        raise UserError(
            f"the adapter in {directory} does not fit this run's adapter ({problem}); use the --method, --r and "
            "--target_modules it was trained with"
        )


def initialise_loftq(peft_model, model_source: str) -> None:
    """LoftQ for a base already loaded in 4-bit: every LoRA pair starts at the best rank-r fit of its
    layer's quantization error, from the 16-bit weights in the model's safetensors files (read one
    layer at a time, so the 16-bit model never has to fit in memory)."""
    from peft import replace_lora_weights_loftq

    # A local folder is passed as is; for a Hub id PEFT finds the files from_pretrained cached.
    replace_lora_weights_loftq(peft_model, model_path=model_source if Path(model_source).is_dir() else None)


def final_adalora_ranks(model) -> dict[str, int]:
    """Rank each AdaLoRA module keeps: from the rank pattern once pruning has run, else its full size.

    Pattern keys are parameter names of the wrapped model ("model.layers.0.self_attn.q_proj.lora_E[.default]").
    """
    adapter = model.active_adapter
    pattern = model.peft_config[adapter].rank_pattern or {}
    kept = {key.split(".lora_E")[0]: int(sum(bool(x) for x in mask)) for key, mask in pattern.items()}
    ranks = {}
    for name, module in model.named_modules():
        lora_E = getattr(module, "lora_E", None)
        if lora_E is None or adapter not in lora_E:
            continue
        short = name.removeprefix("base_model.model.")
        ranks[short] = kept.get(short, int(lora_E[adapter].shape[0]))
    return ranks


def is_adalora(model) -> bool:
    config = getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", None))
    return getattr(config, "peft_type", None) == "ADALORA"


def load_adalora_checkpoint(model, checkpoint_dir: str | Path) -> None:
    """Load a saved AdaLoRA adapter into a model that is still training, at full init_r size.

    PEFT saves AdaLoRA adapters cut down to the ranks they kept, and loading one into a
    full-size model (as the Trainer does to resume or to restore the best checkpoint) fails
    with a size mismatch, or resizes the live model to the wrong pattern. Here the kept ranks
    are put back at their positions and the pruned ones zeroed, which is exactly the masked
    state AdaLoRA trains in, and the checkpoint's rank pattern becomes the model's.
    """
    from safetensors.torch import load_file

    checkpoint_dir = Path(checkpoint_dir)
    adapter = model.active_adapter
    saved = json.loads((checkpoint_dir / "adapter_config.json").read_text(encoding="utf-8"))
    pattern = saved.get("rank_pattern") or {}
    kept = {key.split(".lora_E")[0]: torch.tensor(mask, dtype=torch.bool) for key, mask in pattern.items()}
    modules = dict(model.named_modules())
    with torch.no_grad():
        for key, tensor in load_file(checkpoint_dir / "adapter_model.safetensors").items():
            module_name, _, param = key.rpartition(".")
            target = getattr(modules[module_name], param)[adapter]
            rows = kept.get(module_name.removeprefix("base_model.model."))
            tensor = tensor.to(device=target.device, dtype=target.dtype)
            if rows is None or target.shape == tensor.shape:
                target.copy_(tensor)
            elif param == "lora_B":  # (out, r): ranks are columns
                target.zero_()
                target[:, rows.to(target.device)] = tensor
            else:  # lora_A (r, in) and lora_E (r, 1): ranks are rows
                target.zero_()
                target[rows.to(target.device)] = tensor
    model.peft_config[adapter].rank_pattern = pattern or None


ALLOCATOR_FILE = "adalora_allocator.safetensors"
_ALLOCATOR_STATE = ("ipt", "exp_avg_ipt", "exp_avg_unc")


def save_adalora_allocator(model, directory: str | Path) -> None:
    """AdaLoRA's importance averages are training state like the optimizer's: a resumed run needs
    them to allocate ranks as the uninterrupted run would."""
    from safetensors.torch import save_file

    allocator = model.base_model.rankallocator
    tensors = {
        f"{kind}/{name}": tensor.detach().contiguous()
        for kind in _ALLOCATOR_STATE
        for name, tensor in getattr(allocator, kind).items()
    }
    if tensors:
        save_file(tensors, str(Path(directory) / ALLOCATOR_FILE))


def load_adalora_allocator(model, directory: str | Path) -> bool:
    from safetensors.torch import load_file

    path = Path(directory) / ALLOCATOR_FILE
    if not path.is_file():
        return False
    allocator = model.base_model.rankallocator
    device = next(model.parameters()).device
    for key, tensor in load_file(str(path)).items():
        kind, name = key.split("/", 1)
        getattr(allocator, kind)[name] = tensor.to(device)
    return True
