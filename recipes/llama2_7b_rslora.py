"""rsLoRA on a 4-bit Llama-2-7B: rank-stabilised scaling, same data and budget as LoRA.

Plain LoRA scales its update by alpha / r, so raising the rank quietly shrinks the update and
higher ranks stop helping. rsLoRA scales by alpha / sqrt(r), which keeps learning stable as the
rank grows: the variant to pick when you want a bigger --r.

What it does
  - Everything as llama2_7b_lora.py (4-bit Llama-2-7B, data/alpaca_tiny.json in the Alpaca layout,
    r 8, alpha 32, dropout 0.05 on q,k,v,o, lr 2e-4, batch 1 x 4, 3 epochs), with use_rslora.

Trade-offs
  - Same cost as LoRA. At r 8 the update is sqrt(8) ~ 2.8x larger than LoRA's with the same alpha:
    lower --lora_alpha or --learning_rate if training is unstable.

Run it
  python recipes/llama2_7b_rslora.py                                   # GPU + Hugging Face Hub
  python recipes/llama2_7b_rslora.py --model tiny-llama --max_steps 5  # offline, CPU, seconds
  python recipes/llama2_7b_rslora.py --r 64                            # where rsLoRA pays off
"""

from harness.run.flow import run_recipe
from harness.run.presets import ALPACA_ORIGINAL, LLAMA2_7B_4BIT, LLAMA2_LORA, LLAMA2_T4_TRAINING

DEFAULTS = dict(
    **LLAMA2_7B_4BIT,  # meta-llama/Llama-2-7b-hf in 4-bit NF4
    **ALPACA_ORIGINAL,  # data/alpaca_tiny.json in the Alpaca prompt layout, 10% held out
    **LLAMA2_T4_TRAINING,  # lr 2e-4, batch 1 x 4, 3 epochs, paged 8-bit AdamW, checkpointing
    **LLAMA2_LORA,  # r 8, alpha 32, dropout 0.05, q,k,v,o
    method="rslora",
    output_dir="outputs/llama2_7b_rslora",
)

if __name__ == "__main__":
    run_recipe("llama2_7b_rslora", DEFAULTS)
