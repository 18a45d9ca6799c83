"""LoRA on a 4-bit Llama-2-7B through Unsloth's FastLanguageModel: the LoRA recipe, faster kernels.

Unsloth replaces the attention, MLP and LoRA code paths with fused Triton kernels and offloads
checkpointed activations to CPU RAM, which trains the same LoRA in less time and memory.
Settings as in Unsloth's own notebooks.

What it does
  - meta-llama/Llama-2-7b-hf in 4-bit through FastLanguageModel.from_pretrained (unsloth's
    pre-quantized unsloth/llama-2-7b-bnb-4bit downloads faster: --model it).
  - FastLanguageModel.get_peft_model: r 16, alpha 32, all seven projections, dropout 0, bias none,
    use_gradient_checkpointing "unsloth", random_state 3407 (the --seed); --method rslora turns on
    use_rslora, --method loftq --quantization none uses a LoftQ config.
  - Data and training as llama2_7b_lora.py (data/alpaca_tiny.json in the Alpaca layout, lr 2e-4,
    batch 1 x 4, 3 epochs), the same Trainer and the same result.json, whose "backend" says which
    backend ran.

Needs
  - An NVIDIA GPU and unsloth, which cannot be installed beside the CPU stack: make a separate
    environment on the GPU machine with `pip install -r requirements-unsloth.txt`. Without them the
    recipe stops and says so; `--backend peft` runs this same recipe on plain transformers + PEFT.

Run it
  python recipes/llama2_7b_unsloth.py                                     # GPU + unsloth + Hub
  python recipes/llama2_7b_unsloth.py --backend peft                      # same recipe, plain PEFT
  python recipes/llama2_7b_unsloth.py --backend peft --model tiny-llama --max_steps 5   # offline, CPU
  python recipes/llama2_7b_unsloth.py --method rslora
"""

from harness.models.backends import import_unsloth_first

import_unsloth_first()  # before transformers, so all of Unsloth's patches apply (no-op without unsloth)

from harness.run.flow import run_recipe
from harness.run.presets import ALPACA_ORIGINAL, LLAMA2_7B_4BIT, LLAMA2_T4_TRAINING

DEFAULTS = dict(
    **LLAMA2_7B_4BIT,  # meta-llama/Llama-2-7b-hf in 4-bit NF4
    **ALPACA_ORIGINAL,  # data/alpaca_tiny.json in the Alpaca prompt layout, 10% held out
    **LLAMA2_T4_TRAINING,  # lr 2e-4, batch 1 x 4, 3 epochs, paged 8-bit AdamW, checkpointing
) | dict(
    backend="unsloth",
    method="lora",
    r=16,
    lora_alpha=32,
    target_modules="all7",  # q,k,v,o,gate,up,down
    lora_dropout=0.0,  # 0 lets Unsloth use its fused LoRA kernels
    seed=3407,  # Unsloth's random_state (instead of the preset's 42)
    output_dir="outputs/llama2_7b_unsloth",
)

if __name__ == "__main__":
    run_recipe("llama2_7b_unsloth", DEFAULTS)
