"""A trained adapter folder (a recipe's output_dir): checking it, reading how it was trained,
and attaching it to a base model. Shared by `python -m harness.infer` and `python -m harness.merge`."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import UserError, first_line
from harness.models.loading import quiet_libraries
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
    if folder.exists() and not folder.is_dir():
        raise UserError(f"adapter folder {path} is a file, not a folder; pass --adapter with the output_dir of a "
                        "finished run (the folder that holds adapter_config.json)")
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


def _mismatch(adapter: AdapterFolder, base_name: str, reason: str) -> UserError:
    trained_on = adapter.run.get("model")
    hint = f" ({trained_on})" if trained_on and trained_on != base_name else ""
    return UserError(
        f"the adapter in {adapter.path} does not fit base model {base_name} ({reason}); "
        f"pass the --base it was trained on{hint}"
    )


def _saved_shapes(adapter: AdapterFolder) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(str(adapter.path / WEIGHTS_FILE), framework="pt") as f:
        return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}


def _placement_problem(adapter: AdapterFolder, with_adapter) -> str | None:
    """Why the saved tensors do not fit the adapter built on this base, or None. Every adapter tensor must be in
    the file; the file may also hold the embedding layers (saved when they were trained or resized), nothing else.
    PEFT loads leniently: a base with the same layer shapes but fewer layers takes part of an adapter silently."""
    from peft.utils import get_peft_model_state_dict

    saved = _saved_shapes(adapter)
    # AdaLoRA saves each layer's pruned rank (its rank_pattern): a dimension of init_r may be smaller there
    init_r = adapter.peft_config.get("init_r") if adapter.peft_type == "ADALORA" else None
    adapter_only = get_peft_model_state_dict(with_adapter, save_embedding_layers=False)
    # explicit True/False: "auto" would fetch the recorded base's config (from the Hub, for a Hub id) to compare
    allowed = get_peft_model_state_dict(with_adapter, save_embedding_layers=True)
    unplaced, missing = set(saved) - set(allowed), set(adapter_only) - set(saved)
    if unplaced or missing:
        return (f"{len(unplaced)} saved tensors have no place in it, "
                f"{len(missing)} of its adapter tensors are not in the file")
    wrong = sorted(key for key, shape in saved.items() if not _same_shape(shape, tuple(allowed[key].shape), init_r))
    if wrong:
        return f"{len(wrong)} saved tensors have other shapes than its layers take, e.g. {wrong[0]} {saved[wrong[0]]}"
    return None


def _same_shape(saved: tuple[int, ...], built: tuple[int, ...], init_r: int | None) -> bool:
    return saved == built or (init_r is not None and len(saved) == len(built)
                              and all(s == b or (b == init_r and s <= b) for s, b in zip(saved, built)))


def check_fits(adapter: AdapterFolder, model_args, base_name: str) -> None:
    """Refuse an adapter that does not fit the base before any weights load (so before any loading bar): the
    adapter is built on the base's layers without their weights (meta device, from its config alone) and the
    saved tensors' names and shapes are held against it. Anything else the trial run cannot judge is left to
    the check after loading (attach)."""
    from peft import PeftConfig, PeftModel

    from harness.models.loading import architecture

    with quiet_libraries():
        try:
            skeleton = architecture(model_args)
        except UserError:
            raise  # a base that cannot be had: its one line
        except Exception:  # noqa: BLE001 - a base the weightless build cannot make: loading it says why
            return
        config = PeftConfig.from_pretrained(str(adapter.path))
        config.inference_mode = True
        if hasattr(config, "init_lora_weights"):
            config.init_lora_weights = True  # PiSSA / LoftQ / EVA start from the weights; the shapes do not
        if getattr(config, "rank_pattern", None) and adapter.peft_type == "ADALORA":
            config.rank_pattern = None  # built at init_r: _same_shape allows the pruned ranks
        try:
            with_adapter = PeftModel(skeleton, config, low_cpu_mem_usage=True)
        except (ValueError, KeyError) as exc:  # PEFT: target modules not found in the base
            raise _mismatch(adapter, base_name, first_line(exc)) from None
        except Exception:  # noqa: BLE001 - an adapter kind the weightless trial cannot build: attach checks it
            return
        problem = _placement_problem(adapter, with_adapter)
    if problem:
        raise _mismatch(adapter, base_name, problem)


def attach(model, adapter: AdapterFolder, base_name: str):
    """The base model with the adapter loaded (frozen, for inference)."""
    from peft import PeftModel

    try:
        with quiet_libraries():  # PEFT's notes and deprecations; what matters is checked below
            with_adapter = PeftModel.from_pretrained(model, str(adapter.path))
    except (RuntimeError, ValueError, KeyError) as exc:  # shape mismatches, missing modules
        raise _mismatch(adapter, base_name, first_line(exc)) from None
    with quiet_libraries():
        problem = _placement_problem(adapter, with_adapter)
    if problem:
        raise _mismatch(adapter, base_name, problem)
    return with_adapter
