"""A model's architecture without its weights: a config, from which the planner builds the model on the
meta device. The recipes' own models are built in, so planning them needs no network."""
from __future__ import annotations

from pathlib import Path

from harness.errors import UserError, first_line
from harness.models.offline import resolve_offline_model

# The memory-relevant fields of each published config.json (Hugging Face Hub, main branch).
BUILT_IN: dict[str, dict] = {
    "Qwen/Qwen2-7B-Instruct": dict(
        model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768,
        rope_theta=1000000.0, rms_norm_eps=1e-06, tie_word_embeddings=False, hidden_act="silu"),
    "Qwen/Qwen2.5-0.5B-Instruct": dict(
        model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
        rope_theta=1000000.0, rms_norm_eps=1e-06, tie_word_embeddings=True, hidden_act="silu"),
    "meta-llama/Llama-2-7b-hf": dict(
        model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096,
        rms_norm_eps=1e-05, tie_word_embeddings=False, hidden_act="silu"),
    "facebook/opt-350m": dict(
        model_type="opt", hidden_size=1024, ffn_dim=4096, num_hidden_layers=24, num_attention_heads=16,
        vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=512, do_layer_norm_before=False,
        activation_function="relu", enable_bias=True),
    # The anchors' models (docs/will-it-fit.md: the planner beside their published figures)
    "meta-llama/Llama-3.2-3B": dict(
        model_type="llama", hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
        num_attention_heads=24, num_key_value_heads=8, head_dim=128, vocab_size=128256,
        max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-05, tie_word_embeddings=True,
        hidden_act="silu"),
    "meta-llama/Llama-3.1-8B": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
        max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-05, tie_word_embeddings=False,
        hidden_act="silu"),
}


def model_config(name: str, trust_remote_code: bool = False):
    """The transformers config for a built-in model, an offline model, a local folder or a Hub id (only its
    config.json is fetched)."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    from harness.models.loading import remote_code_refusal  # imported here like transformers: --help stays light

    if name in BUILT_IN:
        fields = dict(BUILT_IN[name])
        return AutoConfig.for_model(fields.pop("model_type"), **fields)
    source = resolve_offline_model(name) or name
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except StrictDataclassError as exc:  # transformers' own validation of the config's values
        cause = exc.__cause__ or exc
        raise UserError(f"model {name!r} has an impossible config ({first_line(cause)}); "
                        "fix its config.json or pass another --model") from None
    except (OSError, ValueError) as exc:
        if not trust_remote_code and "trust_remote_code" in str(exc):
            raise remote_code_refusal(name, "config.json's auto_map names it", to="be built") from None
        where = "in that folder" if Path(source).is_dir() else "on the Hub (or the Hub cannot be reached)"
        raise UserError(
            f"no model config for {name!r} {where}: {first_line(exc)}; built in without network: "
            f"{', '.join(BUILT_IN)}"
        ) from None
    check_sizes(config, name)
    return config


# The sizes the planner builds the model from; each must be a whole number >= 1 where the config has it.
SIZES = ("hidden_size", "intermediate_size", "ffn_dim", "num_hidden_layers", "num_attention_heads",
         "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "word_embed_proj_dim")


def check_sizes(config, name: str) -> None:
    """Refuse sizes no model can have (0, negative, fractional, heads that do not divide), which transformers'
    own validation lets through for some architectures and which would otherwise surface as a traceback
    from deep inside the model's constructor (a division by zero, a tensor of negative size)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for field in SIZES:
        value = getattr(text, field, None)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"model {name!r} has an impossible config: {field} is {value!r}, and every size must be "
                            "a whole number >= 1; fix its config.json or pass another --model")
    hidden, heads = getattr(text, "hidden_size", None), getattr(text, "num_attention_heads", None)
    kv_heads = getattr(text, "num_key_value_heads", None)
    if hidden and heads and getattr(text, "head_dim", None) is None and hidden % heads:
        raise UserError(f"model {name!r} has an impossible config: hidden_size {hidden} is not a multiple of "
                        f"num_attention_heads {heads}; fix its config.json or pass another --model")
    if heads and kv_heads and heads % kv_heads:
        raise UserError(f"model {name!r} has an impossible config: num_attention_heads {heads} is not a multiple of "
                        f"num_key_value_heads {kv_heads}; fix its config.json or pass another --model")


def text_config(config):
    """The language model's part of a config (a multimodal config nests it)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def with_layers(config, layers: int):
    """A copy of the config with only its first `layers` decoder layers: the planner counts a model whose layers
    are all alike on one and two of them and extrapolates (harness.plan.memory, harness.plan.work)."""
    import copy

    config = copy.deepcopy(config)
    text = text_config(config)
    text.num_hidden_layers = layers
    if isinstance(getattr(text, "layer_types", None), list):
        text.layer_types = text.layer_types[:layers]
    return config
