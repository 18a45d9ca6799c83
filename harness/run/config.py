"""Every setting a recipe has, as dataclasses, and how they are filled in (the checks every value passes on its
way in are harness.run.parsing's).

Precedence, lowest first: the dataclass defaults here < the recipe's DEFAULTS <
a YAML/JSON file given with --config < flags on the command line.
Training settings are TRL's own configs under their usual names: SFTConfig for supervised runs (transformers'
TrainingArguments plus --packing, --padding_free, --completion_only_loss, ...), DPOConfig and GRPOConfig for the
others; adapter settings use PEFT's names (--r, --lora_alpha, --init_r, --target_r, ...).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from transformers import TrainingArguments

from harness.locations import REPO_ROOT
from harness.models.offline import OFFLINE_MODELS


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class ModelArguments:
    model: str = field(
        default="stories260k",
        metadata=_help(
            "Hub id (e.g. Qwen/Qwen2-7B-Instruct), a local folder, or an offline model name: "
            f"{', '.join(OFFLINE_MODELS)}."
        ),
    )
    quantization: str = field(
        default="none",
        metadata=_help("none | 4bit | 8bit. 4bit (NF4) cuts a 7B model's weights from ~15 GB to ~5.5 GB."),
    )
    bnb_4bit_quant_type: str = field(default="nf4", metadata=_help("nf4 | fp4. NF4 suits normally distributed weights."))
    bnb_4bit_use_double_quant: bool = field(
        default=True, metadata=_help("Quantize the quantization constants too: saves ~0.4 bit/param.")
    )
    dtype: str = field(
        default="auto",
        metadata=_help(
            "auto | bfloat16 | float16 | float32. auto: bf16 on GPUs that support it, fp16 on older ones "
            "(T4, V100), float32 on CPU. Also sets the 4-bit compute dtype and mixed precision."
        ),
    )
    device_map: str | None = field(
        default=None,
        metadata=_help(
            "Leave unset to keep the whole model on one device (cuda:0 or cpu). 'auto' spreads it over "
            "all GPUs, which AdaLoRA's orthogonal regularisation does not support."
        ),
    )
    attn_implementation: str | None = field(
        default=None, metadata=_help("sdpa | eager | flash_attention_2. Unset: transformers' default.")
    )
    trust_remote_code: bool = field(
        default=False,
        metadata=_help("Run Python code shipped with the model repo. Only for repos you trust."),
    )
    backend: str = field(
        default="peft",
        metadata=_help(
            "peft: transformers + PEFT. unsloth: Unsloth's FastLanguageModel (NVIDIA GPU and "
            "requirements-unsloth.txt; LoRA, rsLoRA, LoftQ). auto: unsloth where it can run, else peft."
        ),
    )


@dataclass
class DataArguments:
    data_file: str = field(
        default="data/imdb_samples_2000.csv",
        metadata=_help("CSV, JSON or JSONL file. Relative paths are tried from the current folder, then the repo."),
    )
    dataset_name: str | None = field(
        default=None,
        metadata=_help(
            "A Hub dataset id (org/name) or a local dataset folder, read with datasets.load_dataset instead of "
            "--data_file."
        ),
    )
    dataset_config: str | None = field(default=None, metadata=_help("The --dataset_name's configuration (subset)."))
    dataset_split: str = field(default="train", metadata=_help("The --dataset_name's split to train on."))
    column_mapping: str | None = field(
        default=None,
        metadata=_help(
            "LLaMA-Factory's dataset_info entry for the data, as JSON (or a .json file holding it), when its columns "
            'or roles have other names: {"formatting": "sharegpt", "columns": {"messages": "conversations"}, '
            '"tags": {"role_tag": "from", "content_tag": "value", ...}}.'
        ),
    )
    task: str = field(
        default="classification",
        metadata=_help(
            "classification: text + label columns, the model learns to answer with the label. instruction: "
            "supervised data in any format detected from its rows: Alpaca (instruction/input/output, system, "
            "history), ShareGPT (conversations), OpenAI messages, TRL prompt/completion, or plain text."
        ),
    )
    text_column: str = field(default="text", metadata=_help("Column holding the text to classify."))
    label_column: str = field(default="label", metadata=_help("Column holding the label."))
    labels: str = field(
        default="positive,negative",
        metadata=_help("Comma-separated label set; a row with any other label is an error."),
    )
    instruction: str = field(
        default="Determine the sentiment of the following movie review (positive or negative).",
        metadata=_help("Instruction placed before the text in classification prompts."),
    )
    prompt_format: str = field(
        default="human_assistant",
        metadata=_help(
            "human_assistant: 'Human: ...\\nAssistant: <answer>' as plain text (instruction data keeps "
            "the Alpaca layout). chat_template: the tokenizer's own chat template. alpaca: Stanford "
            "Alpaca's '### Instruction / ### Input / ### Response' text. auto: the chat template when "
            "the tokenizer has one, else alpaca."
        ),
    )
    max_samples: int | None = field(
        default=None, metadata=_help("Use only the first N rows of the file (before the split).")
    )
    validation_split: float = field(
        default=0.1, metadata=_help("Fraction of rows held out for evaluation (never trained on).")
    )
    split_seed: int = field(
        default=42, metadata=_help("Seed of the train/validation split; fixed so every run sees the same split.")
    )
    eval_file: str | None = field(
        default=None,
        metadata=_help(
            "Evaluate on this file's records instead of a split of data_file (which then trains whole), "
            "e.g. records held out before a data selection."
        ),
    )
    max_seq_length: int = field(
        default=512,
        metadata=_help("Longest tokenized example. Longer inputs lose the end of their text, never the answer."),
    )
    eval_max_samples: int | None = field(
        default=None, metadata=_help("Score at most the first N held-out examples (--eval_file's or the validation "
                                     "split's): eval loss and task metrics alike (None: all).")
    )
    forgetting_file: str | None = field(
        default="data/alpaca_en_demo.json",
        metadata=_help(
            "General text for the forgetting figure: the model's loss on these records' responses before and "
            "after training (records whose text the run trains on are skipped). Empty: not measured."
        ),
    )
    forgetting_samples: int = field(
        default=32, metadata=_help("Responses from the end of --forgetting_file to measure forgetting on (0: off).")
    )


@dataclass
class MethodArguments:
    method: str = field(
        default="lora",
        metadata=_help(
            "full | lora | dora | rslora | loftq | adalora | ia3 | prompt_tuning | prefix_tuning | p_tuning | "
            "none (trains nothing: the untrained model's scores, the baseline every method must beat)"
        ),
    )
    target_modules: str = field(
        default="all-linear",
        metadata=_help(
            "Preset (all-linear: every linear layer but the output head; attention: q,k,v,o; qv: q,v; "
            "all7: q,k,v,o,gate,up,down) or a comma-separated list of module names."
        ),
    )
    r: int = field(default=8, metadata=_help("LoRA rank. Trainable params grow linearly with it."))
    lora_alpha: int = field(default=16, metadata=_help("LoRA scaling numerator: the update is scaled by alpha / r."))
    lora_dropout: float = field(default=0.05, metadata=_help("Dropout on the LoRA input."))
    init_r: int = field(default=12, metadata=_help("AdaLoRA: starting rank of every module."))
    target_r: int = field(default=4, metadata=_help("AdaLoRA: average rank left after pruning."))
    tinit: int | None = field(
        default=None, metadata=_help("AdaLoRA: warm-up steps before pruning (unset: 20%% of total steps).")
    )
    tfinal: int | None = field(
        default=None, metadata=_help("AdaLoRA: final steps with ranks frozen (unset: 60%% of total steps).")
    )
    deltaT: int | None = field(
        default=None, metadata=_help("AdaLoRA: steps between reallocations (unset: 5%% of total steps, at least 1).")
    )
    beta1: float = field(default=0.85, metadata=_help("AdaLoRA: EMA factor of the sensitivity."))
    beta2: float = field(default=0.85, metadata=_help("AdaLoRA: EMA factor of the uncertainty."))
    orth_reg_weight: float = field(default=0.5, metadata=_help("AdaLoRA: weight of the orthogonality penalty."))
    num_virtual_tokens: int = field(default=20, metadata=_help("Prompt/prefix/P-tuning: number of virtual tokens."))
    encoder_hidden_size: int = field(default=128, metadata=_help("P-tuning: hidden size of the prompt encoder."))
    loftq_bits: int = field(default=4, metadata=_help("LoftQ: bits of the quantization LoftQ initialises against."))

# The objectives a recipe may have (harness.objectives.registry maps each to its settings and steps) and the
# --task each one's data is read as (harness.data.reading.load_records).
OBJECTIVES = ("sft", "dpo", "grpo")
TASKS = {"sft": ("classification", "instruction"), "dpo": ("preference",), "grpo": ("math",)}


@dataclass
class RecipeArguments:
    """Settings of the run itself rather than of the model, data or method."""

    recipe: str = field(default="custom", metadata=_help("Name recorded in result.json (set by the recipe)."))
    objective: str = field(
        default="sft",
        metadata=_help(
            "Set by the recipe: sft (supervised, TRL's SFTTrainer), dpo (TRL's DPOTrainer, preference pairs) or grpo "
            "(TRL's GRPOTrainer, reward functions). Its training settings are TRL's SFTConfig / DPOConfig / GRPOConfig."
        ),
    )
    resume: bool = field(
        default=True, metadata=_help("Resume from the last checkpoint in output_dir when there is one.")
    )
    budget_seconds: float | None = field(
        default=None, metadata=_help("Stop training after this many seconds of training (eval excluded).")
    )
    budget_tokens: int | None = field(
        default=None, metadata=_help("Stop training after this many non-padding input tokens.")
    )
    memory_budget_gb: float | None = field(
        default=None,
        metadata=_help(
            "Cap the memory this run may use, in GiB, e.g. 16 to emulate a T4 on a bigger GPU. CUDA: the "
            "allocator's per-process memory fraction (the CUDA context and paged-optimizer memory are outside "
            "it); going past it is an out-of-memory error. CPU: not enforced (harness.bench checks peak RSS)."
        ),
    )
    memory_check: bool = field(
        default=True,
        metadata=_help(
            "Before loading, plan the run's peak memory (python -m harness.plan) and stop with what would fit when "
            "it exceeds the GPU's free memory or --memory_budget_gb. false: print the plan, run anyway."
        ),
    )
    init_adapter: str | None = field(
        default=None,
        metadata=_help(
            "Start from the weights of a saved adapter folder (e.g. an earlier curriculum stage) instead of "
            "a fresh adapter; it must have this run's method, rank and target modules."
        ),
    )


ARGUMENT_CLASSES = (ModelArguments, DataArguments, MethodArguments, RecipeArguments, TrainingArguments)


@dataclass
class RunConfig:
    model: ModelArguments
    data: DataArguments
    method: MethodArguments
    run: RecipeArguments
    train: TrainingArguments
    argv: list[str] = field(default_factory=list)  # the command-line arguments these came from
    extras: tuple = ()  # instances of a recipe's own argument classes (parse_args' extra_classes), in order
    reward_funcs: tuple = ()  # GRPO: the recipe's reward functions (code, not settings: run_recipe passes them)

    def to_dict(self) -> dict[str, Any]:
        """Every setting, flat, JSON-safe: what result.json records as the run's config."""
        out: dict[str, Any] = {}
        for part in (self.model, self.data, self.method, self.run, *self.extras):
            out.update(dataclasses.asdict(part))
        train = {f.name: getattr(self.train, f.name) for f in dataclasses.fields(self.train) if f.init}
        out.update({k: v for k, v in train.items() if not k.startswith("_") and k not in _NOISY_TRAINING_FIELDS})
        return json.loads(json.dumps(out, default=str))

    def user_set(self, name: str) -> bool:
        """Whether the user gave setting `name` (on the command line or in the --config file), rather than
        leaving it to the recipe's DEFAULTS."""
        flags = {f"--{name}", f"--{name.replace('_', '-')}"}
        if any(arg.split("=", 1)[0] in flags for arg in self.argv):
            return True
        if "--config" in self.argv[:-1]:  # a file check_config_file already read as a mapping
            path = Path(self.argv[self.argv.index("--config") + 1])
            return name in (yaml.safe_load(path.read_text(encoding="utf-8")) or {})
        return False


# Fields that only describe the local machine or are deprecated aliases: recording them adds noise.
_NOISY_TRAINING_FIELDS = {"logging_dir", "hub_token", "push_to_hub_token", "local_rank"}

# Settings every recipe starts from; a recipe's DEFAULTS override them.
BASE_TRAINING_DEFAULTS: dict[str, Any] = {
    "report_to": "none",
    "logging_steps": 10,
    "eval_strategy": "steps",
    "eval_steps": 50,
    "save_strategy": "steps",
    "save_steps": 50,
    "save_total_limit": 2,  # best + last: a Kaggle disk fills up fast with 7B checkpoints
    "load_best_model_at_end": True,
    "metric_for_best_model": "eval_loss",
    "remove_unused_columns": False,
    "per_device_eval_batch_size": 4,
    # Mixed precision follows the model's dtype (harness.run.flow) unless --bf16/--fp16 is given; TRL's configs
    # would otherwise default to bf16 everywhere, CPUs and T4s included.
    "bf16": False,
}


def find_file(path: str) -> Path | None:
    """A data/config path as given, or relative to the repo root (so recipes run from any folder)."""
    candidate = Path(path).expanduser()
    if candidate.exists():
        return candidate
    in_repo = REPO_ROOT / path
    return in_repo if in_repo.exists() else None
