"""DoRA on a 4-bit Llama-2-7B: LoRA split into magnitude and direction, same data and budget as LoRA.

DoRA (Weight-Decomposed Low-Rank Adaptation) trains each adapted weight's column norms (its
magnitude) separately from a LoRA update of its direction, which tends to close part of the gap
to full fine-tuning, at the same rank.

What it does
  - Everything as llama2_7b_lora.py (4-bit Llama-2-7B, data/alpaca_tiny.json in the Alpaca layout,
    r 8, alpha 32, dropout 0.05 on q,k,v,o, lr 2e-4, batch 1 x 4, 3 epochs), with use_dora.

Trade-offs
  - Slower steps and more activation memory than LoRA (the weight norm is recomputed every step);
    adds only the magnitude vectors to the trainable parameters.
  - Merges into the weights like LoRA (python -m harness.merge).

Run it
  python recipes/llama2_7b_dora.py                                   # GPU + Hugging Face Hub
  python recipes/llama2_7b_dora.py --model tiny-llama --max_steps 5  # offline, CPU, seconds
"""

from harness.run.flow import run_recipe
from harness.run.presets import ALPACA_ORIGINAL, LLAMA2_7B_4BIT, LLAMA2_LORA, LLAMA2_T4_TRAINING

DEFAULTS = dict(
    **LLAMA2_7B_4BIT,  # meta-llama/Llama-2-7b-hf in 4-bit NF4
    **ALPACA_ORIGINAL,  # data/alpaca_tiny.json in the Alpaca prompt layout, 10% held out
    **LLAMA2_T4_TRAINING,  # lr 2e-4, batch 1 x 4, 3 epochs, paged 8-bit AdamW, checkpointing
    **LLAMA2_LORA,  # r 8, alpha 32, dropout 0.05, q,k,v,o
    method="dora",
    output_dir="outputs/llama2_7b_dora",
)

if __name__ == "__main__":
    run_recipe("llama2_7b_dora", DEFAULTS)
