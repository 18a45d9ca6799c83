"""LoftQ initialisation for LoRA on a 4-bit Llama-2-7B: same data and budget as LoRA.

Quantizing the base to 4 bits moves every weight a little. Plain LoRA starts at zero and first
has to learn back that error; LoftQ starts the LoRA matrices at the best rank-r approximation of
the quantization error itself (an SVD of original minus quantized weights), so training starts
from a model much closer to the 16-bit original.

What it does
  - Everything as llama2_7b_lora.py (4-bit Llama-2-7B, data/alpaca_tiny.json in the Alpaca layout,
    r 8, alpha 32, dropout 0.05 on q,k,v,o, lr 2e-4, batch 1 x 4, 3 epochs), with the LoRA
    matrices initialised by PEFT's replace_lora_weights_loftq from the model's 16-bit
    safetensors files.
  - With --quantization none instead, LoRA is initialised by LoftQConfig (--loftq_bits 4 or 8)
    and the base weights are replaced by their quantized values, in 16-bit (PEFT needs scipy for it).

Trade-offs
  - Needs an NVIDIA GPU: PEFT computes LoftQ there (one SVD per adapted layer before training
    starts); training then costs the same as LoRA.

Run it
  python recipes/llama2_7b_loftq.py                                   # GPU + Hugging Face Hub
  python recipes/llama2_7b_loftq.py --model tiny-llama --max_steps 5  # offline, small, still needs a GPU
  python recipes/llama2_7b_loftq.py --quantization none --loftq_bits 8
"""

from harness.run.flow import run_recipe
from harness.run.presets import ALPACA_ORIGINAL, LLAMA2_7B_4BIT, LLAMA2_LORA, LLAMA2_T4_TRAINING

DEFAULTS = dict(
    **LLAMA2_7B_4BIT,  # meta-llama/Llama-2-7b-hf in 4-bit NF4
    **ALPACA_ORIGINAL,  # data/alpaca_tiny.json in the Alpaca prompt layout, 10% held out
    **LLAMA2_T4_TRAINING,  # lr 2e-4, batch 1 x 4, 3 epochs, paged 8-bit AdamW, checkpointing
    **LLAMA2_LORA,  # r 8, alpha 32, dropout 0.05, q,k,v,o
    method="loftq",
    loftq_bits=4,
    output_dir="outputs/llama2_7b_loftq",
)

if __name__ == "__main__":
    run_recipe("llama2_7b_loftq", DEFAULTS)
