"""LoRA on a 4-bit Llama-2-7B: instruction tuning on original Alpaca records, on one 16 GB GPU.

The setting of the Llama-2 guides: rank 8 on the attention projections of a base model loaded
in 4-bit NF4, trained on 100 Alpaca records in Alpaca's own prompt layout.

What it does
  - meta-llama/Llama-2-7b-hf (gated: accept Meta's license on the Hub, then export HF_TOKEN) in
    4-bit NF4 + double quantization; fp16 compute on T4/V100, bf16 where supported; gradient
    checkpointing; paged 8-bit AdamW.
  - LoRA r 8, alpha 32, dropout 0.05 on q,k,v,o; lr 2e-4; batch 1 x accumulation 4; 3 epochs.
  - Data: data/alpaca_tiny.json (the first 100 Stanford Alpaca records) as "Below is an
    instruction ... ### Response:"; loss on the response only; 10% held out for eval loss and
    answer-token accuracy.

Trade-offs
  - Rank is the main memory/quality knob: trainable parameters grow linearly with --r.
  - DoRA, rsLoRA and LoftQ variants of this exact setting: llama2_7b_dora.py, llama2_7b_rslora.py,
    llama2_7b_loftq.py; with Unsloth's kernels: llama2_7b_unsloth.py.

Run it
  python recipes/llama2_7b_lora.py                                   # GPU + Hugging Face Hub
  python recipes/llama2_7b_lora.py --model tiny-llama --max_steps 5  # offline, CPU, seconds
  python recipes/llama2_7b_lora.py --model stories260k               # a real tiny Llama, CPU
  python recipes/llama2_7b_lora.py --r 16 --target_modules all-linear

Then:
  python -m harness.infer --base meta-llama/Llama-2-7b-hf --adapter outputs/llama2_7b_lora --load-in-4bit --prompt "Give three tips for staying healthy."
"""

from harness.run.flow import run_recipe
from harness.run.presets import ALPACA_ORIGINAL, LLAMA2_7B_4BIT, LLAMA2_LORA, LLAMA2_T4_TRAINING

DEFAULTS = dict(
    **LLAMA2_7B_4BIT,  # meta-llama/Llama-2-7b-hf in 4-bit NF4
    **ALPACA_ORIGINAL,  # data/alpaca_tiny.json in the Alpaca prompt layout, 10% held out
    **LLAMA2_T4_TRAINING,  # lr 2e-4, batch 1 x 4, 3 epochs, paged 8-bit AdamW, checkpointing
    **LLAMA2_LORA,  # r 8, alpha 32, dropout 0.05, q,k,v,o
    method="lora",
    output_dir="outputs/llama2_7b_lora",
)

if __name__ == "__main__":
    run_recipe("llama2_7b_lora", DEFAULTS)
