"""A model's architecture without its weights: a config, from which the planner builds the model on the
meta device. The recipes' own models are built in, so planning them needs no network."""
from __future__ import annotations

from pathlib import Path

from harness.errors import UserError
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
    from transformers import AutoConfig


    if name in BUILT_IN:
        fields = dict(BUILT_IN[name])
        return AutoConfig.for_model(fields.pop("model_type"), **fields)
    source = resolve_offline_model(name) or name
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        where = "in that folder" if Path(source).is_dir() else "on the Hub (or the Hub cannot be reached)"
        raise UserError(
            f"no model config for {name!r} {where}: {str(exc).splitlines()[0]}; built in without network: "
            f"{', '.join(BUILT_IN)}"
        ) from None
