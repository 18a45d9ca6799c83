"""The planner beside the memory figures others published (the anchors in ../shared/BENCHMARKS.md):
`python -m harness.plan --published` prints the table committed as results/plan_vs_published.md.

Each figure is data: who published it, what it measures, the settings it states as planner flags, and
the settings assumed where the source is silent (said in its note). The planner's figure is made the
way the source's was: weights as loaded; peak reserved memory without the CUDA context (a baseline
taken after CUDA init); or the whole card's memory a run needs (estimates and "minimum VRAM" tables).
"""
from __future__ import annotations

from dataclasses import dataclass

from harness.plan.architectures import model_config
from harness.plan.memory import meta_model, plan_run, quantized_linears, quantized_weight_bytes
from harness.run.command_line import parse_args

GIB = 2**30
GB = 10**9

WEIGHTS = "weights as loaded"
PEAK = "peak reserved, CUDA context excluded"
NEEDED = "memory needed, CUDA context included"


@dataclass(frozen=True)
class Published:
    source: str
    what: str  # the run, as the source names it
    figure: float
    unit: str  # "GiB" or "GB" (read as 10^9 bytes; the guides do not say which they mean)
    measures: str  # WEIGHTS, PEAK or NEEDED
    settings: tuple[str, ...]  # planner flags for the settings the source states
    compute_dtype: str = "bfloat16"
    trainable_m: float | None = None  # the trainable parameters the source reports, in millions
    note: str = ""  # settings assumed, and why the error is what it is


GUIDES = "the guides (Kaggle T4)"
PEFT = "PEFT method_comparison (L40S)"
TORCHTUNE = "torchtune (README)"
FACTORY_WIKI = "LLaMA-Factory wiki (2024)"
FACTORY_README = "LLaMA-Factory README (estimate)"
UNSLOTH = "Unsloth docs (minimum VRAM)"

_LLAMA2_T4 = ("--model", "meta-llama/Llama-2-7b-hf", "--quantization", "4bit", "--per_device_train_batch_size", "1",
              "--max_seq_length", "512", "--optim", "paged_adamw_8bit", "--activation_checkpointing", "true",
              "--target_modules", "q_proj,k_proj,v_proj,o_proj")
_GUIDE_NOTE = ("the recipe llama2_7b_lora's settings (512 tokens, paged 8-bit AdamW, checkpointing). The guide's "
               "trainable counts are those of q,v only (r x (4096 + 4096) x 2 modules x 32 layers = 2.1 M at r 4), "
               "not of the q,k,v,o it names. A higher rank adds only the adapter's own state (parameter, gradient, "
               "optimizer: ~10 bytes per parameter), as the planned rows show; the guide's figures grow far more "
               "from r 4 to r 32, which the rank alone cannot explain")
_PEFT = ("--model", "meta-llama/Llama-3.2-3B", "--dtype", "bfloat16", "--per_device_train_batch_size", "4",
         "--max_seq_length", "768", "--optim", "adamw_torch", "--activation_checkpointing", "false",
         "--target_modules", "q_proj,v_proj")
_PEFT_NOTE = ("planned at the longest sequence (768); the published peak covers the whole run, evaluation "
              "generation at batch 50 included")
_TORCHTUNE_8B = ("--model", "meta-llama/Llama-3.1-8B", "--dtype", "bfloat16", "--per_device_train_batch_size", "2",
                 "--max_seq_length", "2048", "--activation_checkpointing", "true")
_TORCHTUNE_LORA = ("--target_modules", "q_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", "--r", "8",
                   "--optim", "adamw_torch")
_TORCHTUNE_COMPILED = ("compiled, with a chunked cross-entropy that never holds the full fp32 logits the planner "
                       "counts (its 'logits and their fp32 copy' part)")
_TORCHTUNE_QLORA = ("; its 4-bit model keeps embeddings and head in bf16, where PEFT's prepare_model_for_kbit_training "
                    "(which the planner plans) casts them to fp32")
_TORCHTUNE_NOTE = "settings of torchtune's shipped single-device configs (LoRA r 8 on q,v,output and the MLP; " \
                  "checkpointing); " + _TORCHTUNE_COMPILED
_TORCHTUNE_FULL_NOTE = ("settings of torchtune's shipped single-device config (paged 8-bit AdamW, checkpointing); "
                        + _TORCHTUNE_COMPILED + "; and it steps the optimizer inside the backward pass, so the "
                        "gradients (8.0 B parameters x 2 bytes) are never all held at once: the planner counts them "
                        "all and cannot match it")
_FACTORY_WIKI = ("--model", "meta-llama/Llama-2-7b-hf", "--per_device_train_batch_size", "4", "--max_seq_length",
                 "1024", "--r", "8", "--target_modules", "q_proj,v_proj", "--optim", "adamw_torch",
                 "--activation_checkpointing", "true")
_FACTORY_WIKI_NOTE = "LLaMA-Factory's defaults of the time assumed: LoRA on q,v, checkpointing on"
_SILENT = "settings not published; planned at batch 1 x 512 tokens, checkpointing, AdamW, LoRA r 8 on q,v"
_UNSLOTH_NOTE = ("settings not published (an \"absolute minimum\"); planned at batch 1 x 512 tokens, checkpointing, "
                 "8-bit AdamW, LoRA r 16 on every projection. Unsloth's own code (a chunked cross-entropy among it) "
                 "does without some of what the planner counts for transformers + PEFT; the fp32 embeddings, head "
                 "and logits it counts weigh most with Llama-3's 128k vocabulary, where the 4-bit rows differ most")
_UNSLOTH = ("--per_device_train_batch_size", "1", "--max_seq_length", "512", "--activation_checkpointing", "true",
            "--optim", "adamw_8bit", "--r", "16", "--target_modules", "all7")

PUBLISHED: list[Published] = [
    Published(GUIDES, "Qwen2-7B-Instruct in NF4, loaded", 5.5, "GB", WEIGHTS,
              ("--model", "Qwen/Qwen2-7B-Instruct", "--quantization", "4bit"), "float16",
              note="NF4 with double quantization; embeddings and head in fp16 as loaded (before training "
                   "casts them to fp32)"),
    *(Published(GUIDES, f"Llama-2-7B QLoRA r {r}, batch 1 x 4, 100 Alpaca samples", gb, "GB", PEAK,
                (*_LLAMA2_T4, "--r", str(r)), "float16", trainable_m=m, note=_GUIDE_NOTE)
      for r, m, gb in ((4, 2, 5.9), (8, 4, 6.3), (16, 8, 6.8), (32, 16, 7.5))),
    Published(PEFT, "Llama-3.2-3B LoRA r 32 (q,v), batch 4", 20.8, "GiB", PEAK, (*_PEFT, "--r", "32"),
              trainable_m=9.2, note=_PEFT_NOTE),
    Published(PEFT, "Llama-3.2-3B DoRA r 32 (q,v), batch 4", 22.9, "GiB", PEAK,
              (*_PEFT, "--method", "dora", "--r", "32"), note=_PEFT_NOTE),
    Published(PEFT, "Llama-3.2-3B AdaLoRA 64 -> 32 (q,v), batch 4", 21.2, "GiB", PEAK,
              (*_PEFT, "--method", "adalora", "--init_r", "64", "--target_r", "32"), note=_PEFT_NOTE),
    Published(PEFT, "Llama-3.2-3B full fine-tuning, batch 4", 36.2, "GiB", PEAK, (*_PEFT, "--method", "full"),
              note=_PEFT_NOTE + "; bf16 weights and AdamW states, no fp32 master copy"),
    Published(TORCHTUNE, "Llama-3.1-8B LoRA, RTX 4090, batch 2, packed 2048", 16.2, "GiB", PEAK,
              (*_TORCHTUNE_8B, *_TORCHTUNE_LORA), note=_TORCHTUNE_NOTE),
    Published(TORCHTUNE, "Llama-3.1-8B QLoRA, RTX 4090, batch 2, packed 2048", 7.4, "GiB", PEAK,
              (*_TORCHTUNE_8B, *_TORCHTUNE_LORA, "--quantization", "4bit"), note=_TORCHTUNE_NOTE + _TORCHTUNE_QLORA),
    Published(TORCHTUNE, "Llama-3.1-8B full, RTX 4090, batch 2, packed 2048", 18.9, "GiB", PEAK,
              (*_TORCHTUNE_8B, "--method", "full", "--optim", "paged_adamw_8bit"), note=_TORCHTUNE_FULL_NOTE),
    Published(TORCHTUNE, "Llama-3.2-3B LoRA, A100, batch 2 x 4096", 8.5, "GiB", PEAK,
              ("--model", "meta-llama/Llama-3.2-3B", "--dtype", "bfloat16", "--per_device_train_batch_size", "2",
               "--max_seq_length", "4096", "--activation_checkpointing", "true", *_TORCHTUNE_LORA),
              note=_TORCHTUNE_NOTE),
    Published(TORCHTUNE, "Llama-3.2-3B QLoRA, A100, batch 2 x 4096", 4.6, "GiB", PEAK,
              ("--model", "meta-llama/Llama-3.2-3B", "--dtype", "bfloat16", "--per_device_train_batch_size", "2",
               "--max_seq_length", "4096", "--activation_checkpointing", "true", *_TORCHTUNE_LORA,
               "--quantization", "4bit"),
              note=_TORCHTUNE_NOTE + _TORCHTUNE_QLORA),
    Published(FACTORY_WIKI, "Llama-2-7B LoRA r 8, batch 4 x 1024, 16-bit", 18, "GB", PEAK, _FACTORY_WIKI,
              note=_FACTORY_WIKI_NOTE),
    Published(FACTORY_WIKI, "Llama-2-7B QLoRA r 8, batch 4 x 1024, 4-bit", 9, "GB", PEAK,
              (*_FACTORY_WIKI, "--quantization", "4bit"), note=_FACTORY_WIKI_NOTE),
    *(Published(FACTORY_README, f"7B {what}", gb, "GB", NEEDED,
                ("--model", "meta-llama/Llama-2-7b-hf", "--dtype", "bfloat16", "--per_device_train_batch_size",
                 "1", "--max_seq_length", "512", "--activation_checkpointing", "true", "--optim", "adamw_torch",
                 "--r", "8", "--target_modules", "q_proj,v_proj", *flags), note=_SILENT)
      for what, gb, flags in (("full fine-tuning, 16-bit", 60, ("--method", "full")),
                              ("LoRA, 16-bit", 16, ()),
                              ("QLoRA 8-bit", 10, ("--quantization", "8bit")),
                              ("QLoRA 4-bit", 6, ("--quantization", "4bit")))),
    *(Published(UNSLOTH, f"{size} {what}", gb, "GB", NEEDED, ("--model", model, "--dtype", "bfloat16", *_UNSLOTH,
                                                              *flags), note=_UNSLOTH_NOTE)
      for size, model, what, gb, flags in (
          ("7B (Llama-2-7B)", "meta-llama/Llama-2-7b-hf", "QLoRA 4-bit", 5, ("--quantization", "4bit")),
          ("7B (Llama-2-7B)", "meta-llama/Llama-2-7b-hf", "LoRA 16-bit", 19, ()),
          ("8B (Llama-3.1-8B)", "meta-llama/Llama-3.1-8B", "QLoRA 4-bit", 6, ("--quantization", "4bit")),
          ("8B (Llama-3.1-8B)", "meta-llama/Llama-3.1-8B", "LoRA 16-bit", 22, ()))),
]


def loaded_weight_bytes(config, quantization: str, double_quant: bool, dtype) -> int:
    """The weights as from_pretrained leaves them: quantized linears, the rest in the 16-bit dtype."""
    model = meta_model(config, dtype)
    quantized = quantized_linears(model) if quantization in ("4bit", "8bit") else {}
    return sum(quantized_weight_bytes(p.numel(), quantized[id(p)].out_features, quantization, double_quant)
               if id(p) in quantized else p.numel() * p.element_size() for p in model.parameters())


def planned(entry: Published) -> tuple[float, float]:
    """(planned figure in the source's unit, trainable parameters in millions)."""
    import torch


    cfg = parse_args({"output_dir": "outputs/plan"}, list(entry.settings))
    config = model_config(cfg.model.model)
    dtype = getattr(torch, entry.compute_dtype)
    unit = GIB if entry.unit == "GiB" else GB
    if entry.measures == WEIGHTS:
        return loaded_weight_bytes(config, cfg.model.quantization, cfg.model.bnb_4bit_use_double_quant, dtype) / unit, None
    plan = plan_run(cfg, config, compute_dtype=dtype)
    context = plan.bytes_of("CUDA context")
    total = plan.total_bytes - (context if entry.measures == PEAK else 0)
    return total / unit, plan.trainable_params / 1e6


def table() -> str:
    from tabulate import tabulate

    rows = []
    for entry in PUBLISHED:
        figure, trainable = planned(entry)
        rows.append({
            "source": entry.source, "run": entry.what, "measures": entry.measures,
            "published": f"{entry.figure:g} {entry.unit}", "planned": f"{figure:.2f} {entry.unit}",
            "error": f"{(figure - entry.figure) / entry.figure:+.0%}",
            "trainable M (published / planned)": (f"{entry.trainable_m:g} / {trainable:.1f}" if entry.trainable_m
                                                  else f"/ {trainable:.1f}" if trainable is not None else ""),
            "planner flags": " ".join(entry.settings), "settings assumed, and why the error": entry.note,
        })
    return tabulate(rows, headers="keys", tablefmt="github", disable_numparse=True)
