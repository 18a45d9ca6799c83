"""Offline models: the converted llama2.c stories260k model and the tiny random-weight models.

CPU only, no network (HF_HUB_OFFLINE=1). Whole file: ~15 s, most of it importing transformers.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from pathlib import Path

# huggingface_hub reads this when first imported, so set it before transformers is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from harness.locations import LLAMA2C_DIR  # noqa: E402
from harness.locations import STORIES260K_DIR as STORIES_DIR
from harness.models import offline as offline_models  # noqa: E402
from harness.models.llama2c import convert, read_llama2c_checkpoint, read_llama2c_tokenizer  # noqa: E402
from harness.models.offline import OFFLINE_MODELS, build_offline_model, resolve_offline_model  # noqa: E402

TINY_MODELS = ["tiny-qwen2", "tiny-llama", "tiny-opt"]
EXPECTED_ARCH = {"tiny-qwen2": "Qwen2ForCausalLM", "tiny-llama": "LlamaForCausalLM", "tiny-opt": "OPTForCausalLM"}

# Ordinary text (must round-trip through encode/decode) covering the usual tokenizer pitfalls.
TEXTS = [
    "Once upon a time, there was a little girl named Lily.",
    " leading space",
    "   three leading spaces and trailing ones   ",
    "line one\nline two\n\n\tindented with a tab",
    'Punctuation: "quotes", (parens), [brackets]; semi-colons: 3.14 - 42% $5 #tag @user!?',
    "Unicode: café naïve Zürich — “smart quotes” … 你好，世界",
    "Emoji fall back to bytes: 😀👍🏽🚀",
    "\u00a0non-breaking space and ideographic\u3000space",
    "",
]
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hi."},
    {"role": "assistant", "content": "Hi."},
    {"role": "user", "content": "Again?"},
]


@pytest.fixture(autouse=True)
def _hub_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="module")
def _single_torch_thread():
    # These models are far too small to gain from intra-op threads, and on a busy 2-core machine
    # the extra OpenMP thread made the 200-token generate ~9x slower (8 s instead of 0.9 s).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """A fresh conversion of the shipped llama2.c files (never /work/shared)."""
    return convert(LLAMA2C_DIR / "stories260K.bin", LLAMA2C_DIR / "tok512.bin", tmp_path_factory.mktemp("converted"))


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    """Each tiny model, built once through resolve_offline_model into a private cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FT_COOKBOOK_CACHE", str(tmp_path_factory.mktemp("cache")))
        return {name: resolve_offline_model(name) for name in TINY_MODELS}


def _file_digests(folder: str | Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir()) if p.is_file()}


def _reference_text() -> str:
    markdown = (STORIES_DIR / "REFERENCE.md").read_text(encoding="utf-8")
    return re.search(r"```text\n(.*?)\n```", markdown, re.DOTALL).group(1)


def _llama2c_encode(text: str) -> list[int]:
    """Python port of llama2.c run.c's encode() (no BOS/EOS), independent of the converter's code."""
    data = (LLAMA2C_DIR / "tok512.bin").read_bytes()
    pieces, scores, offset = [], [], 4
    while offset < len(data):
        score, length = struct.unpack_from("<fi", data, offset)
        pieces.append(data[offset + 8 : offset + 8 + length].decode("utf-8"))
        scores.append(score)
        offset += 8 + length
    lookup = {piece: i for i, piece in enumerate(pieces)}
    ids = [lookup[" "]] if text else []  # dummy prefix
    for char in text:
        ids.extend([lookup[char]] if char in lookup else [byte + 3 for byte in char.encode("utf-8")])
    while True:  # merge the best-scoring adjacent pair until none merges
        best = max(
            ((scores[lookup[pieces[a] + pieces[b]]], -i, lookup[pieces[a] + pieces[b]])
             for i, (a, b) in enumerate(zip(ids, ids[1:])) if pieces[a] + pieces[b] in lookup),
            default=None,
        )  # fmt: skip
        if best is None:
            return ids
        i = -best[1]
        ids[i : i + 2] = [best[2]]


# --------------------------------------------------------------------------------------------------
# stories260k


def test_stories260k_greedy_generation_matches_llama2c_reference():
    path = resolve_offline_model("stories260k")
    assert Path(path) == STORIES_DIR
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        out = model.generate(torch.tensor([[tokenizer.bos_token_id]]), max_new_tokens=200, do_sample=False)
    assert out.shape == (1, 201)
    assert tokenizer.decode(out[0], skip_special_tokens=True) == _reference_text()


def test_converter_is_deterministic_and_reproduces_shipped_model(converted, tmp_path):
    again = convert(LLAMA2C_DIR / "stories260K.bin", LLAMA2C_DIR / "tok512.bin", tmp_path)
    assert _file_digests(again) == _file_digests(converted)  # byte-deterministic

    shipped = load_file(STORIES_DIR / "model.safetensors")
    fresh = load_file(converted / "model.safetensors")
    assert shipped.keys() == fresh.keys()
    assert "lm_head.weight" not in fresh  # tied to model.embed_tokens.weight
    for name, tensor in shipped.items():
        assert torch.equal(tensor, fresh[name]), name

    def config(folder):
        cfg = json.loads((Path(folder) / "config.json").read_text())
        cfg.pop("transformers_version")
        return cfg

    assert config(converted) == config(STORIES_DIR)
    shipped_tok, fresh_tok = AutoTokenizer.from_pretrained(STORIES_DIR), AutoTokenizer.from_pretrained(converted)
    for text in TEXTS:
        assert shipped_tok(text).input_ids == fresh_tok(text).input_ids, text


def test_v1_checkpoint_reads_like_v0(tmp_path):
    params, v0 = read_llama2c_checkpoint(LLAMA2C_DIR / "stories260K.bin")
    # Re-pack the same weights in llama2.c's "version 1" layout (see harness/models/llama2c.py).
    header = struct.pack(
        "<Ii7iB", 0x616B3432, 1, params.dim, params.hidden_dim, params.n_layers, params.n_heads,
        params.n_kv_heads, params.vocab_size, params.seq_len, 1,
    )  # fmt: skip
    order = ["rms_att", "rms_ffn", "rms_final", "tok_embeddings", "wq", "wk", "wv", "wo", "w1", "w2", "w3"]
    v1_file = tmp_path / "stories260K_v1.bin"
    v1_file.write_bytes(header.ljust(256, b"\0") + b"".join(v0[name].numpy().tobytes() for name in order))

    params_v1, v1 = read_llama2c_checkpoint(v1_file)
    assert params_v1 == params
    assert set(v1) == set(order)  # v1 has no RoPE tables
    for name in order:
        assert torch.equal(v1[name], v0[name]), name


def test_stories_tokenizer_matches_llama2c_and_round_trips():
    tokenizer = AutoTokenizer.from_pretrained(STORIES_DIR)
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.pad_token_id == 0 and len(tokenizer) == 512  # pad reuses <unk>; nothing added
    assert tokenizer.convert_ids_to_tokens([3, 13, 258, 259]) == ["<0x00>", "<0x0A>", "<0xFF>", "▁t"]
    for text in TEXTS:
        ids = tokenizer(text).input_ids
        assert ids == [1, *_llama2c_encode(text)], text
        assert tokenizer.decode(ids, skip_special_tokens=True) == text

    rendered = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<s>You are terse.\n\n### Instruction:\nSay hi.\n\n### Response:\nHi.</s>"
        "### Instruction:\nAgain?\n\n### Response:\n"
    )
    # Assistant turns (content + EOS) are marked for assistant-only loss.
    chat = tokenizer.apply_chat_template(MESSAGES[:3], return_dict=True, return_assistant_tokens_mask=True)
    masked = [i for i, keep in zip(chat["input_ids"], chat["assistant_masks"]) if keep]
    assert tokenizer.decode(masked) == "Hi.</s>"


# --------------------------------------------------------------------------------------------------
# tiny random-weight models


@pytest.mark.parametrize("name", TINY_MODELS)
def test_tiny_model_loads_runs_and_tokenizer_round_trips(name, tiny_models, tmp_path):
    path = tiny_models[name]
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert type(model).__name__ == EXPECTED_ARCH[name]
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (64, 2)
    assert model.config.vocab_size == len(tokenizer)
    assert tokenizer.pad_token_id is not None and tokenizer.eos_token_id is not None
    assert model.config.pad_token_id == tokenizer.pad_token_id

    # transformers may rebuild a tokenizer's pipeline from its class defaults instead of reading
    # tokenizer.json verbatim; ids must equal those of the saved pipeline, also after a re-save.
    raw = Tokenizer.from_file(str(Path(path) / "tokenizer.json"))
    tokenizer.save_pretrained(tmp_path)
    resaved = AutoTokenizer.from_pretrained(tmp_path, config=model.config)
    for text in TEXTS:
        ids = tokenizer(text).input_ids
        assert ids == raw.encode(text).ids == resaved(text).input_ids, text
        assert tokenizer.decode(ids, skip_special_tokens=True) == text

    prompt = tokenizer.apply_chat_template(MESSAGES[1:2], tokenize=False, add_generation_prompt=True)
    assert "Say hi." in prompt
    batch = tokenizer(
        [tokenizer.apply_chat_template(MESSAGES, tokenize=False), prompt],
        padding=True, add_special_tokens=False, return_tensors="pt",
    )  # fmt: skip
    assert (batch.input_ids[1] == tokenizer.pad_token_id).any()  # padding happened
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    out = model(**batch, labels=labels)
    assert out.logits.shape == (*batch.input_ids.shape, len(tokenizer))
    assert torch.isfinite(out.loss)
    out.loss.backward()


@pytest.mark.parametrize("name", TINY_MODELS)
def test_tiny_model_build_is_deterministic(name, tiny_models, tmp_path):
    rebuilt = build_offline_model(name, tmp_path / name)
    assert _file_digests(rebuilt) == _file_digests(tiny_models[name])


def test_resolve_unknown_name_returns_none():
    assert resolve_offline_model("Qwen/Qwen2-0.5B") is None
    assert resolve_offline_model("tiny-gpt5") is None
    assert set(OFFLINE_MODELS) == {"stories260k", "smollm2-135m", *TINY_MODELS}


def test_resolve_builds_once_and_survives_losing_a_build_race(monkeypatch, tmp_path):
    monkeypatch.setenv("FT_COOKBOOK_CACHE", str(tmp_path))
    target = tmp_path / f"tiny-opt-v{offline_models.BUILD_VERSION}"
    real_build, calls = offline_models.build_offline_model, []

    def racing_build(name, out_dir):
        # Simulate another process that renames its finished build into place while ours runs.
        calls.append(out_dir)
        real_build(name, out_dir)
        real_build(name, target)
        return Path(out_dir)

    monkeypatch.setattr(offline_models, "build_offline_model", racing_build)
    assert resolve_offline_model("tiny-opt") == str(target)
    assert resolve_offline_model("tiny-opt") == str(target)
    assert len(calls) == 1  # second call reused the cache
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # our temp build was cleaned up
    AutoModelForCausalLM.from_pretrained(target)


@pytest.mark.parametrize("length", [-8, 10_000])
def test_a_damaged_tokenizer_is_refused_not_read_forever(tmp_path, length):
    """A negative piece length once left the reader's offset standing still: a loop without end."""
    damaged = tmp_path / "tokenizer.bin"
    damaged.write_bytes(struct.pack("<i", 8) + struct.pack("<fi", 0.0, 1) + b"a" + struct.pack("<fi", 0.0, length) + b"bc")
    with pytest.raises(ValueError, match=f"claims {length} bytes"):
        read_llama2c_tokenizer(damaged)
    good = tmp_path / "good.bin"
    good.write_bytes(struct.pack("<i", 8) + struct.pack("<fi", -1.5, 2) + b"ab")
    assert read_llama2c_tokenizer(good) == [("ab", -1.5)]
