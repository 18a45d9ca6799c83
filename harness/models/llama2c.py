"""Convert a karpathy/llama2.c checkpoint and tokenizer into a transformers model folder.

llama2.c ships tiny *pretrained* Llama-2 models (e.g. ``stories260K``, ~260K parameters, trained on
TinyStories) in its own raw float32 formats. Converting one gives the project a real, offline,
MIT-licensed causal LM whose generations are meaningful, so tests can check that a pipeline produces
the *right* text, not just *some* text.

Usage::

    python -m harness.models.llama2c --checkpoint models/llama2c/stories260K.bin \\
        --tokenizer models/llama2c/tok512.bin --out models/stories260k

The output folder holds ``config.json``, ``generation_config.json``, ``model.safetensors`` (tied
embeddings, float32), ``tokenizer.json``, ``tokenizer_config.json`` and ``chat_template.jinja``.
The conversion is byte-deterministic: converting twice gives identical files.

Formats (little-endian; see models/llama2c/SOURCES.md):

* v0 ("legacy"): 7 x int32 header ``dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size,
  seq_len`` (a negative vocab_size means the classifier is *not* shared), then float32 arrays
  tok_embeddings, rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3, rms_final, freq_cis_real,
  freq_cis_imag[, wcls].
* v1: 256-byte header (uint32 magic ``0x616b3432``, int32 version=1, the 7 params, uint8
  shared_classifier, zero padding), then rms_att, rms_ffn, rms_final, tok_embeddings, wq, wk, wv, wo,
  w1, w2, w3[, wcls]. (v2 is int8-quantised and not supported.)
* tokenizer: int32 max_token_length, then per token: float32 score, int32 length, UTF-8 bytes.
"""

from __future__ import annotations

import argparse
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# Alpaca-style chat template shared by the project's Llama-style and OPT offline models.
# - `bos_token` opens the conversation (like Llama-2/3 templates), so `apply_chat_template(tokenize=True)`,
#   which tokenizes without adding special tokens, still yields a BOS-prefixed sequence.
# - Each assistant turn ends with `eos_token`, so fine-tuning teaches the model to stop.
# - Nothing separates `eos_token` from the next "### Instruction:" on purpose: for the SentencePiece-
#   style tokenizer every text segment after a special token gets a dummy-prefix "▁", so a following
#   turn is tokenized exactly like the first one after BOS.
# - `{% generation %}` marks assistant tokens for `return_assistant_tokens_mask` / TRL's
#   `assistant_only_loss`; it renders to nothing.
ALPACA_CHAT_TEMPLATE = r"""{{- bos_token }}
{%- for message in messages %}
    {%- if message['role'] == 'system' %}
        {{- message['content'] + '\n\n' }}
    {%- elif message['role'] == 'user' %}
        {{- '### Instruction:\n' + message['content'] + '\n\n' }}
    {%- elif message['role'] == 'assistant' %}
        {{- '### Response:\n' }}
        {%- generation %}
            {{- message['content'] + eos_token }}
        {%- endgeneration %}
    {%- else %}
        {{- raise_exception('Unsupported role: ' + message['role']) }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '### Response:\n' }}
{%- endif %}
"""

_V1_MAGIC = 0x616B3432
_V1_HEADER_BYTES = 256
_F32 = np.dtype("<f4")

# llama2.c stores its special tokens with surrounding newlines (they are printed as-is by run.c);
# transformers expects the usual SentencePiece names.
_SPECIAL_PIECES = {0: "<unk>", 1: "<s>", 2: "</s>"}
_UNK_ID, _BOS_ID, _EOS_ID = 0, 1, 2
# Pieces 3..258 are SentencePiece byte-fallback pieces "<0x00>".."<0xFF>".
_FIRST_BYTE_ID, _N_BYTES = 3, 256
_SPIECE_UNDERLINE = "▁"


@dataclass(frozen=True)
class Llama2cParams:
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim


def read_llama2c_checkpoint(path: str | Path) -> tuple[Llama2cParams, dict[str, torch.Tensor]]:
    """Read a llama2.c v0 (legacy) or v1 float32 checkpoint.

    Returns the hyper-parameters and the weights under llama2.c's names (``tok_embeddings``,
    ``rms_att``, ``wq``, ... stacked over layers; ``wcls`` only when the classifier is not shared).
    """
    data = Path(path).read_bytes()
    (magic,) = struct.unpack_from("<I", data, 0)
    if magic == _V1_MAGIC:
        (version,) = struct.unpack_from("<i", data, 4)
        if version != 1:
            raise ValueError(f"{path}: llama2.c format version {version} is not supported (only v0 and v1)")
        header = struct.unpack_from("<7i", data, 8)
        shared = bool(data[8 + 7 * 4])
        offset = _V1_HEADER_BYTES
    else:
        header = struct.unpack_from("<7i", data, 0)
        # v0 encodes "classifier is separate" as a negative vocab size.
        shared = header[5] > 0
        header = (*header[:5], abs(header[5]), header[6])
        offset = 7 * 4
    p = Llama2cParams(*header, shared_classifier=shared)
    if p.dim % p.n_heads or p.n_heads % p.n_kv_heads:
        raise ValueError(f"{path}: inconsistent header {p}")

    L, D, H, V = p.n_layers, p.dim, p.hidden_dim, p.vocab_size
    shapes = {
        "tok_embeddings": (V, D),
        "rms_att": (L, D),
        "rms_ffn": (L, D),
        "rms_final": (D,),
        "wq": (L, D, D),
        "wk": (L, p.kv_dim, D),
        "wv": (L, p.kv_dim, D),
        "wo": (L, D, D),
        "w1": (L, H, D),
        "w2": (L, D, H),
        "w3": (L, H, D),
        # Precomputed RoPE tables, v0 only; transformers recomputes them from rope_theta.
        "freq_cis_real": (p.seq_len, p.head_dim // 2),
        "freq_cis_imag": (p.seq_len, p.head_dim // 2),
        "wcls": (V, D),
    }
    if magic == _V1_MAGIC:
        order = ["rms_att", "rms_ffn", "rms_final", "tok_embeddings", "wq", "wk", "wv", "wo", "w1", "w2", "w3"]
    else:
        order = ["tok_embeddings", "rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3", "rms_final",
                 "freq_cis_real", "freq_cis_imag"]  # fmt: skip
    if not shared:
        order.append("wcls")

    weights: dict[str, torch.Tensor] = {}
    for name in order:
        count = int(np.prod(shapes[name]))
        if offset + count * _F32.itemsize > len(data):
            raise ValueError(f"{path}: truncated checkpoint while reading {name!r}")
        array = np.frombuffer(data, dtype=_F32, count=count, offset=offset).reshape(shapes[name])
        weights[name] = torch.from_numpy(array.astype(np.float32))  # copy: the buffer is read-only
        offset += count * _F32.itemsize
    if offset != len(data):
        raise ValueError(f"{path}: {len(data) - offset} unexpected trailing bytes (not a llama2.c v0/v1 float32 file?)")
    return p, weights


def read_llama2c_tokenizer(path: str | Path) -> list[tuple[str, float]]:
    """Read a llama2.c ``tokenizer.bin``: one ``(piece, score)`` per token id, pieces decoded as UTF-8."""
    data = Path(path).read_bytes()
    offset = 4  # skip max_token_length
    pieces: list[tuple[str, float]] = []
    while offset < len(data):
        if offset + 8 > len(data):
            raise ValueError(f"{path}: truncated tokenizer at byte {offset}")
        score, length = struct.unpack_from("<fi", data, offset)
        offset += 8
        if length < 0 or offset + length > len(data):  # a negative length would never advance: refuse, not spin
            raise ValueError(f"{path}: damaged tokenizer (piece {len(pieces)} claims {length} bytes)")
        pieces.append((data[offset : offset + length].decode("utf-8"), score))
        offset += length
    return pieces


def _permute_for_half_rotation(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of a q/k projection from interleaved-pair RoPE to half-split RoPE.

    llama2.c rotates pairs (x0, x1), (x2, x3), ... of each head; transformers' Llama rotates
    (x_i, x_{i + head_dim/2}). Moving even rows to the first half of each head and odd rows to the
    second half makes both compute the same attention scores (the same permutation as transformers'
    ``convert_llama_weights_to_hf.py``).
    """
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def llama2c_to_hf_state_dict(p: Llama2cParams, w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map llama2.c weights to ``LlamaForCausalLM`` parameter names (``lm_head`` included, possibly tied)."""
    sd = {
        "model.embed_tokens.weight": w["tok_embeddings"],
        "model.norm.weight": w["rms_final"],
        "lm_head.weight": w["tok_embeddings"] if p.shared_classifier else w["wcls"],
    }
    for i in range(p.n_layers):
        pre = f"model.layers.{i}."
        sd[pre + "input_layernorm.weight"] = w["rms_att"][i]
        sd[pre + "post_attention_layernorm.weight"] = w["rms_ffn"][i]
        sd[pre + "self_attn.q_proj.weight"] = _permute_for_half_rotation(w["wq"][i], p.n_heads)
        sd[pre + "self_attn.k_proj.weight"] = _permute_for_half_rotation(w["wk"][i], p.n_kv_heads)
        sd[pre + "self_attn.v_proj.weight"] = w["wv"][i]
        sd[pre + "self_attn.o_proj.weight"] = w["wo"][i]
        sd[pre + "mlp.gate_proj.weight"] = w["w1"][i]
        sd[pre + "mlp.down_proj.weight"] = w["w2"][i]
        sd[pre + "mlp.up_proj.weight"] = w["w3"][i]
    return {k: v.contiguous() for k, v in sd.items()}


def build_llama2c_tokenizer(pieces: list[tuple[str, float]], *, model_max_length: int):
    """Build a fast (``tokenizers``) tokenizer that encodes and decodes exactly like llama2.c's run.c.

    llama2.c's encoder is SentencePiece BPE: prepend a space ("dummy prefix"), split into code
    points, replace unknown code points by their UTF-8 byte pieces, then repeatedly merge the
    adjacent pair whose concatenation is the highest-scoring piece. A ``tokenizers`` BPE model does
    the same when its merges are ranked by the score of the merged piece (``generate_merges``, the
    helper transformers uses to convert SentencePiece BPE models).

    Why a normalizer (Prepend "▁" + Replace " " -> "▁") rather than a Metaspace pre-tokenizer:
    Metaspace does not prepend "▁" when the text already starts with a space, so " one" would encode
    differently from llama2.c and decode back without its leading space. The normalizer form (the
    one Llama-2's own tokenizer.json used) always adds the dummy prefix, like SentencePiece.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast
    from transformers.tokenization_utils_base import generate_merges

    vocab: dict[str, int] = {}
    scores: dict[str, float] = {}
    for idx, (piece, score) in enumerate(pieces):
        name = _SPECIAL_PIECES.get(idx, piece.replace(" ", _SPIECE_UNDERLINE))
        if name in vocab:
            raise ValueError(f"duplicate piece {name!r} (ids {vocab[name]} and {idx})")
        vocab[name] = idx
        scores[name] = score
    byte_pieces = [f"<0x{b:02X}>" for b in range(_N_BYTES)]
    if [p for p, i in vocab.items() if _FIRST_BYTE_ID <= i < _FIRST_BYTE_ID + _N_BYTES] != byte_pieces:
        raise ValueError("expected byte-fallback pieces <0x00>..<0xFF> at ids 3..258")

    # Only real text pieces take part in merges; special and byte pieces are never merge results.
    mergeable = {p: s for p, s in scores.items() if vocab[p] >= _FIRST_BYTE_ID + _N_BYTES}
    merges = generate_merges(vocab, mergeable, skip_tokens=set(_SPECIAL_PIECES.values()) | set(byte_pieces))

    backend = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    backend.normalizer = normalizers.Sequence(
        [normalizers.Prepend(_SPIECE_UNDERLINE), normalizers.Replace(" ", _SPIECE_UNDERLINE)]
    )
    backend.pre_tokenizer = None
    # Strip(left=1) drops the dummy-prefix space again, as llama2.c does for the first piece after BOS.
    backend.decoder = decoders.Sequence(
        [decoders.Replace(_SPIECE_UNDERLINE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", _BOS_ID)]
    )
    # normalized=False: the special strings are matched in raw text before the "▁" normalizer runs.
    backend.add_special_tokens([AddedToken(_SPECIAL_PIECES[i], normalized=False, special=True) for i in range(3)])

    # tokenizer_class "TokenizersBackend" (what PreTrainedTokenizerFast saves in transformers 5) makes
    # AutoTokenizer load tokenizer.json verbatim. The "LlamaTokenizer" class would rebuild the
    # pipeline with a Metaspace pre-tokenizer and change ids for text with leading spaces.
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        # Padding reuses <unk> (id 0) instead of adding a token, so the vocabulary (and the embedding
        # matrix) stays at 512. Padded positions are masked out by attention_mask / labels=-100,
        # and a real <unk> never occurs because byte fallback covers every input.
        pad_token="<unk>",
        add_bos_token=True,
        add_eos_token=False,
        model_max_length=model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
        chat_template=ALPACA_CHAT_TEMPLATE,
    )


def convert(checkpoint: str | Path, tokenizer: str | Path, out_dir: str | Path) -> Path:
    """Convert ``checkpoint`` + ``tokenizer`` (llama2.c files) into a transformers folder ``out_dir``."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    p, weights = read_llama2c_checkpoint(checkpoint)
    pieces = read_llama2c_tokenizer(tokenizer)
    if len(pieces) != p.vocab_size:
        raise ValueError(f"tokenizer has {len(pieces)} pieces but the checkpoint expects {p.vocab_size}")

    config = LlamaConfig(
        vocab_size=p.vocab_size,
        hidden_size=p.dim,
        intermediate_size=p.hidden_dim,
        num_hidden_layers=p.n_layers,
        num_attention_heads=p.n_heads,
        num_key_value_heads=p.n_kv_heads,
        max_position_embeddings=p.seq_len,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=p.shared_classifier,
        bos_token_id=_BOS_ID,
        eos_token_id=_EOS_ID,
        pad_token_id=_UNK_ID,
        dtype="float32",
    )
    # Random init is immediately overwritten; fork_rng keeps the caller's RNG stream untouched.
    with torch.random.fork_rng(devices=[]):
        model = LlamaForCausalLM(config)
    model.load_state_dict(llama2c_to_hf_state_dict(p, weights), strict=True)
    model.generation_config = GenerationConfig(bos_token_id=_BOS_ID, eos_token_id=_EOS_ID, pad_token_id=_UNK_ID)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)  # transformers 5 writes safetensors only
    build_llama2c_tokenizer(pieces, model_max_length=p.seq_len).save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="llama2.c checkpoint (.bin, v0 or v1 float32)")
    parser.add_argument("--tokenizer", required=True, help="llama2.c tokenizer (.bin)")
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    args = parser.parse_args(argv)
    print(f"wrote {convert(args.checkpoint, args.tokenizer, args.out)}")


if __name__ == "__main__":
    main()
