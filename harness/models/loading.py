"""Loading the base model and tokenizer: where from, in which dtype, quantized or not, on which device."""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch

from harness.errors import UserError
from harness.models.offline import resolve_offline_model
from harness.run.config import ModelArguments
from harness.run.distributed import device_map, launched_processes, strategy

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_model(name: str) -> str:
    """An offline model name, a local folder, or (left as is) a Hub id."""
    if not str(name).strip():
        raise UserError("--model is empty; pass a Hub id (e.g. Qwen/Qwen2-7B-Instruct), a local folder or --model stories260k")
    offline = resolve_offline_model(name)
    if offline is not None:
        return str(offline)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"model folder {name} has no config.json; point --model at a transformers model folder")
        return str(path)
    if path.exists():  # a file (config.json, model.safetensors, ...) given for its folder
        raise UserError(f"model folder {name} is a file, not a folder; pass the folder that holds config.json "
                        "(or a Hub id, or an offline name such as stories260k)")
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UserError(f"model folder {name} not found; use a Hub id, a local folder or --model stories260k")
    return name


def _hub_error(name: str, exc: Exception) -> UserError:
    return UserError(
        f"cannot load model {name!r}: it is not an offline model or local folder, and the Hugging Face Hub "
        f"could not provide it ({type(exc).__name__}); check the id and your network, or use "
        "--model stories260k (offline) or a local folder"
    )


@contextlib.contextmanager
def hub_warnings_silenced():
    """huggingface_hub logs a warning for every failed request before raising; the raised error is
    what gets reported (as one line), so its log lines are only noise above it."""
    from huggingface_hub.utils import logging as hub_logging

    previous = hub_logging.get_verbosity()
    hub_logging.set_verbosity_error()
    try:
        yield
    finally:
        hub_logging.set_verbosity(previous)


@contextlib.contextmanager
def quiet_libraries():
    """Library warnings (deprecations, PEFT's notes) while a model is only looked at (a plan, an adapter tried on a
    weightless base) are not the user's concern; errors still surface."""
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.set_verbosity(verbosity)


def _from_source(args: ModelArguments, what: str, load):
    """load(source) for the model's folder or Hub id; an unreadable folder or an unreachable Hub is one line."""
    source = resolve_model(args.model)
    check_remote_code(args, source)
    try:
        with hub_warnings_silenced():
            return load(source)
    except (OSError, ValueError) as exc:
        if _asks_for_remote_code(exc):  # custom code check_remote_code could not see (a tokenizer's own)
            raise remote_code_refusal(args.model, "its files name classes transformers does not have") from None
        if Path(source).is_dir():
            raise UserError(f"cannot load the {what} in {source}: {str(exc).splitlines()[0]}") from None
        raise _hub_error(args.model, exc) from None


def check_remote_code(args: ModelArguments, source: str | None = None) -> None:
    """Refuse, before anything loads and before transformers says a word, a model that needs code shipped with
    it (its config.json's auto_map names classes transformers does not have) unless --trust_remote_code was
    given. The same decision transformers makes (dynamic_module_utils.resolve_trust_remote_code), taken from
    config.json alone: no code is imported."""
    if args.trust_remote_code:
        return
    from transformers import PretrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    source = source or resolve_model(args.model)
    try:
        with hub_warnings_silenced():
            config, _ = PretrainedConfig.get_config_dict(source)
    except (OSError, ValueError):
        return  # no readable config.json: the load itself says what is wrong
    auto_map = config.get("auto_map")
    if not isinstance(auto_map, dict):
        return
    model_type = config.get("model_type")
    own = [auto_map[name] for name, built_in in (("AutoConfig", CONFIG_MAPPING_NAMES),
                                                 ("AutoModelForCausalLM", MODEL_FOR_CAUSAL_LM_MAPPING_NAMES))
           if name in auto_map and model_type not in built_in]
    if own:
        raise remote_code_refusal(args.model,
                                   f"config.json's auto_map names {own[0]}, a class in the model's own files")


def _asks_for_remote_code(exc: Exception) -> bool:
    return isinstance(exc, ValueError) and "trust_remote_code=True" in str(exc)


def remote_code_refusal(name: str, why: str, to: str = "load") -> UserError:
    """The refusal of a model that needs its own code (to load it, or for the planner to build it)."""
    return UserError(
        f"model {name} needs code shipped with it to {to} ({why}); that code is not run unless you pass "
        "--trust_remote_code: pass it only if you trust where the model comes from (the code runs as you)"
    )


def position_limit(config) -> int | None:
    """How many positions (prompt plus generated tokens) a model has, where its config says so plainly:
    max_position_embeddings, unless RoPE scaling stretches the positions beyond it (then None: unknown)."""
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        return None
    for name in ("rope_scaling", "rope_parameters"):  # transformers 5 names it rope_parameters
        rope = getattr(config, name, None)
        if not isinstance(rope, dict):
            continue
        # one per attention type (e.g. {"full_attention": {...}, "sliding_attention": {...}}), or one for all
        parts = [v for v in rope.values() if isinstance(v, dict)] or [rope]
        if any(part.get("rope_type", part.get("type")) not in (None, "default") for part in parts):
            return None
    return limit


def load_config(args: ModelArguments):
    """The model's config.json alone (from the Hub: that file only)."""
    from transformers import AutoConfig

    return _from_source(args, "model config", lambda source: AutoConfig.from_pretrained(
        source, trust_remote_code=args.trust_remote_code))


def architecture(args: ModelArguments):
    """The model's layers without its weights (on the meta device: no memory, and from the Hub only its
    config.json), to check settings that name layers before the real load."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = load_config(args)
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config, trust_remote_code=args.trust_remote_code)


def compute_dtype(requested: str) -> torch.dtype:
    """auto: bf16 where the GPU supports it, fp16 on older GPUs (T4, V100), fp32 on CPU."""
    if requested != "auto":
        if requested not in DTYPES:
            raise UserError(f"unknown --dtype {requested!r}; use auto, {', '.join(DTYPES)}")
        return DTYPES[requested]
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_tokenizer(args: ModelArguments):
    from transformers import AutoTokenizer

    tokenizer = _from_source(args, "tokenizer", lambda source: AutoTokenizer.from_pretrained(
        source, trust_remote_code=args.trust_remote_code))
    if tokenizer.pad_token is None:
        # Padding positions are masked out of the loss by label -100, so reusing EOS is safe.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def check_quantization(args: ModelArguments) -> None:
    """Refuse 4/8-bit where bitsandbytes cannot run, before anything is loaded."""
    if args.quantization == "none":
        return
    if args.quantization not in ("4bit", "8bit"):
        raise UserError(f"unknown --quantization {args.quantization!r}; use none, 4bit or 8bit")
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # a broken CUDA setup raises all sorts of errors on import
        raise UserError(
            f"--quantization {args.quantization} needs bitsandbytes, which cannot be used here "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "install it with pip install bitsandbytes or use --quantization none"
        ) from None
    if not torch.cuda.is_available() and torch.backends.mps.is_available():
        raise UserError("bitsandbytes does not support Apple GPUs; use --quantization none")


def device_map_for(args: ModelArguments, method: str):
    """One device unless the user asked otherwise (AdaLoRA with --device_map auto over several GPUs is
    refused before this: harness.run.distributed.check_launch). Under accelerate launch each process loads
    onto its own GPU (DDP), or on the CPU for FSDP to shard."""
    if launched_processes() > 1:
        return device_map()
    if args.device_map is not None:
        return args.device_map
    if torch.cuda.is_available():
        if torch.cuda.device_count() > 1:
            print(f"Keeping the whole model on cuda:{torch.cuda.current_device()} (single device); "
                  "pass --device_map auto to spread it over GPUs, or run one process per GPU "
                  "(accelerate launch: docs/several-gpus.md).")
        return {"": torch.cuda.current_device()}
    return {"": "cpu"}


def load_model(args: ModelArguments, method: str, gradient_checkpointing: bool, for_training: bool = True):
    """The base model, quantized if asked, ready for an adapter (or for full fine-tuning, or inference)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig


    sharded = strategy() == "fsdp"
    dtype = compute_dtype(args.dtype)
    if method == "full" and args.dtype == "auto" and for_training:
        # Trained weights stay float32 (mixed precision computes in 16-bit): Adam's updates of ~lr are
        # below bf16's resolution for most weights and would be rounded away; fp16 weights cannot train.
        dtype = torch.float32
    quantization_config = None
    if args.quantization == "4bit":
        quantization_config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=args.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=args.bnb_4bit_use_double_quant,
            bnb_4bit_compute_dtype=dtype,
            # FSDP shards float tensors only: the packed 4-bit weights are stored as the compute dtype
            # (bitsandbytes' FSDP-QLoRA guide); otherwise bitsandbytes' default uint8.
            **({"bnb_4bit_quant_storage": dtype} if sharded else {}),
        )
    elif args.quantization == "8bit":
        quantization_config = BitsAndBytesConfig(load_in_8bit=True)
    source = resolve_model(args.model)
    check_remote_code(args, source)
    kwargs = {}
    if args.attn_implementation:
        kwargs["attn_implementation"] = args.attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source,
            dtype=dtype,
            quantization_config=quantization_config,
            device_map=device_map_for(args, method),
            trust_remote_code=args.trust_remote_code,
            use_safetensors=True,  # never unpickle .bin weights
            **kwargs,
        )
    except (OSError, ValueError) as exc:
        if _asks_for_remote_code(exc):
            raise remote_code_refusal(args.model, "its files name classes transformers does not have") from None
        if isinstance(exc, ValueError):
            raise  # any other rejected setting is a bug of this project: its traceback is kept
        if Path(source).is_dir():
            raise UserError(f"cannot load the model in {source}: {str(exc).splitlines()[0]}") from None
        raise _hub_error(args.model, exc) from None
    if quantization_config is not None and for_training and sharded:
        # As TRL does for sharded QLoRA: no prepare_model_for_kbit_training, whose float32 casts would leave
        # FSDP mixed dtypes to flatten; only what it does for checkpointing.
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
    elif quantization_config is not None and for_training:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
        _keep_cpu_4bit_trainable(model)
    return model


def _keep_cpu_4bit_trainable(model) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights for inference on the first no-grad
    forward (evaluation), after which every training step fails with an in-place error on a leaf
    view. Turning the fast path off keeps evaluation and training interleavable. CUDA is unaffected."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def print_parameter_counts(model) -> tuple[int, int]:
    """parameter_counts, and the line every run prints of them."""
    trainable, total = parameter_counts(model)
    print(f"Trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.4f}%)")
    return trainable, total


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total). PEFT counts 4-bit weights as the parameters they stand for, not packed bytes."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
