"""QLoRA (4-bit NF4 base + LoRA) on Qwen2.5-0.5B-Instruct: instructions with the chat template.

The frozen base is stored in 4-bit NormalFloat with double quantization and dequantized on the
fly; the LoRA matrices train in 16/32-bit. The smallest memory footprint of the four Qwen2.5 recipes.

What it does
  - Qwen/Qwen2.5-0.5B-Instruct in 4-bit NF4 + double quantization, bf16 compute (fp16 on T4/V100).
  - LoRA r 64, alpha 16, dropout 0.1 on q,k,v,o,gate,up,down; lr 2e-4 (the original project's
    train_config_qlora: quantized bases take a higher learning rate).
  - Data and schedule as qwen2_5_0_5b_lora.py: data/alpaca_en_demo.json through the chat template,
    loss on the answer, 10% held out; batch 4 x 4, 3 epochs, cosine with 5% warm-up.

Trade-offs
  - 4-bit weights cost a little quality and some speed (dequantization) against 16-bit LoRA;
    they matter most for big models (see qwen2_7b_qlora.py), little for a 0.5B one.
  - Needs bitsandbytes (CUDA, or its CPU backend for small tests).
  - Padding-free batches (--padding_free true, this recipe's default): the examples of a batch are laid end
    to end in one row, no padding computed, same loss (results/packing_alpaca.md). --padding_free false pads
    each batch to its longest example instead; --packing true also fills rows across examples (fewer steps).

Run it
  python recipes/qwen2_5_0_5b_qlora.py                                   # GPU + Hugging Face Hub
  python recipes/qwen2_5_0_5b_qlora.py --model tiny-qwen2 --max_steps 5  # offline, CPU, seconds
  python recipes/qwen2_5_0_5b_qlora.py --bnb_4bit_quant_type fp4 --bnb_4bit_use_double_quant false
  python recipes/qwen2_5_0_5b_qlora.py --config recipes/configs/train_config_qlora.yaml

Then (the adapter expects the same 4-bit base):
  python -m harness.infer --base Qwen/Qwen2.5-0.5B-Instruct --adapter outputs/qwen2_5_0_5b_qlora --load-in-4bit --chat
"""

from harness.run.flow import run_recipe
from harness.run.presets import ALPACA_GPT4_CHAT, QWEN2_5_0_5B_INSTRUCT, QWEN2_5_LORA, QWEN2_5_TRAINING

DEFAULTS = dict(
    **QWEN2_5_0_5B_INSTRUCT,
    **ALPACA_GPT4_CHAT,  # data/alpaca_en_demo.json with the chat template, 10% held out
    **QWEN2_5_TRAINING,  # batch 4 x 4, 3 epochs, cosine, 5% warm-up
    **QWEN2_5_LORA,  # r 64, alpha 16, dropout 0.1, q,k,v,o,gate,up,down
    quantization="4bit",  # NF4 + double quantization (the defaults of --bnb_4bit_*)
    learning_rate=2e-4,
    padding_free=True,  # a batch laid end to end: no padding computed, same loss (results/packing_alpaca.md)
    output_dir="outputs/qwen2_5_0_5b_qlora",
)

if __name__ == "__main__":
    run_recipe("qwen2_5_0_5b_qlora", DEFAULTS)
