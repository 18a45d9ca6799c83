"""A trained adapter folder (a recipe's output_dir): checking it, reading how it was trained,
and attaching it to a base model. Shared by `python -m harness.infer` and `python -m harness.merge`."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import UserError
from harness.run.config import DataArguments
from harness.run.swap import refuse_while_swapping

PROMPT_LEARNING_TYPES = ("PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING")
WEIGHTS_FILE = "adapter_model.safetensors"


@dataclass
class AdapterFolder:
    path: Path
    peft_config: dict[str, Any]  # adapter_config.json
    run: dict[str, Any] = field(default_factory=dict)  # the recipe's result.json, when there is one

    @property
    def peft_type(self) -> str:
        return str(self.peft_config.get("peft_type", "unknown"))

    @property
    def is_prompt_learning(self) -> bool:
        return self.peft_type in PROMPT_LEARNING_TYPES

    @property
    def trained_quantization(self) -> str:
        """none | 4bit | 8bit: how the base was loaded in training ("none" when not recorded)."""
        return str(self.run.get("quantization") or self.run.get("config", {}).get("quantization") or "none")

    def base_model(self, given: str | None) -> str:
        """The base to load: as given, else the one the run recorded (an offline name or Hub id)."""
        base = given or self.run.get("model") or self.peft_config.get("base_model_name_or_path")
        if not base:
            raise UserError(f"{self.path} does not say which base model it was trained on; pass --base")
        return str(base)

    def data_arguments(self) -> DataArguments:
        """The prompt layout the run trained with, so generation sees prompts laid out the same way.
        Adapters without a run record get instruction prompts in the auto layout."""
        recorded = self.run.get("config", {})
        names = {f.name for f in dataclasses.fields(DataArguments)}
        known = {k: v for k, v in recorded.items() if k in names}
        return DataArguments(**known) if known else DataArguments(task="instruction", prompt_format="auto")


def open_adapter(path: str | Path) -> AdapterFolder:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise UserError(f"adapter folder {path} not found; pass --adapter with the output_dir of a finished run")
    refuse_while_swapping(folder)
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        if (folder / "config.json").is_file():
            raise UserError(f"{path} holds a full model, not an adapter: pass it as --base and leave out --adapter")
        raise UserError(f"{path} has no adapter_config.json; pass the output_dir of a finished PEFT run")
    if not (folder / WEIGHTS_FILE).is_file():
        raise UserError(f"{path} has no {WEIGHTS_FILE} (adapters are only loaded from safetensors files)")
    _check_weights_file(folder / WEIGHTS_FILE)
    try:
        peft_config = json.loads(config_file.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise UserError(f"{config_file} is not valid JSON ({exc}); the adapter folder is damaged") from None
    run: dict[str, Any] = {}
    record = folder / "result.json"
    if record.is_file():
        try:
            run = json.loads(record.read_text(encoding="utf-8"))
        except ValueError:
            run = {}  # a damaged record only loses the defaults it would have given
    return AdapterFolder(folder, peft_config, run)


def _check_weights_file(path: Path) -> None:
    """A weights file cut short or overwritten is found now, before any model is loaded."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            if not list(f.keys()):
                raise UserError(f"{path} holds no tensors; the adapter folder is damaged: retrain it or restore the file")
    except SafetensorError as exc:
        raise UserError(
            f"{path} is not a readable safetensors file ({str(exc).strip().splitlines()[0][:200]}); the adapter "
            "folder is damaged: retrain it or restore the file"
        ) from None


def attach(model, adapter: AdapterFolder, base_name: str):
    """The base model with the adapter loaded (frozen, for inference)."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open

    def mismatch(reason: str) -> UserError:
        trained_on = adapter.run.get("model")
        hint = f" ({trained_on})" if trained_on and trained_on != base_name else ""
        return UserError(
            f"the adapter in {adapter.path} does not fit base model {base_name} ({reason}); "
            f"pass the --base it was trained on{hint}"
        )

    try:
        with_adapter = PeftModel.from_pretrained(model, str(adapter.path))
    except (RuntimeError, ValueError, KeyError) as exc:  # shape mismatches, missing modules
        raise mismatch(str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__) from None
    # PEFT loads leniently: a base with the same layer shapes but fewer layers takes part of the adapter
    # without a word. Every saved tensor must have found its place, and every adapter tensor its value.
    with safe_open(str(adapter.path / WEIGHTS_FILE), framework="pt") as f:
        saved = set(f.keys())
    expected = set(get_peft_model_state_dict(with_adapter).keys())
    if saved != expected:
        raise mismatch(f"{len(saved - expected)} saved tensors have no place in it, "
                       f"{len(expected - saved)} of its adapter tensors are not in the file")
    return with_adapter
