"""QLoRA with an 8-bit base (LLM.int8) + LoRA on Qwen2.5-0.5B-Instruct, with the chat template.

The middle ground between 16-bit LoRA and 4-bit QLoRA: int8 weights with outlier features kept
in 16-bit lose less than NF4, and take half the memory of 16-bit.

What it does
  - Qwen/Qwen2.5-0.5B-Instruct in 8-bit (bitsandbytes LLM.int8).
  - LoRA r 64, alpha 16, dropout 0.1 on q,k,v,o,gate,up,down; lr 2e-4 (the original project's
    train_config_qlora_8bit).
  - Data and schedule as qwen2_5_0_5b_lora.py: data/alpaca_en_demo.json through the chat template,
    loss on the answer, 10% held out; batch 4 x 4, 3 epochs, cosine with 5% warm-up.

Trade-offs
  - int8 matrix multiplication is often slower than both 16-bit and 4-bit on current GPUs;
    choose it for quality at low memory, not for speed.
  - Padding-free batches (--padding_free true, this recipe's default): the examples of a batch are laid end
    to end in one row, no padding computed, same loss (results/packing_alpaca.md). --padding_free false pads
    each batch to its longest example instead; --packing true also fills rows across examples (fewer steps).

Run it
  python recipes/qwen2_5_0_5b_qlora_8bit.py                                   # GPU + Hugging Face Hub
  python recipes/qwen2_5_0_5b_qlora_8bit.py --model tiny-qwen2 --max_steps 5  # offline, CPU
  python recipes/qwen2_5_0_5b_qlora_8bit.py --config recipes/configs/train_config_qlora_8bit.yaml
"""

from harness.run.flow import run_recipe
from harness.run.presets import ALPACA_GPT4_CHAT, QWEN2_5_0_5B_INSTRUCT, QWEN2_5_LORA, QWEN2_5_TRAINING

DEFAULTS = dict(
    **QWEN2_5_0_5B_INSTRUCT,
    **ALPACA_GPT4_CHAT,  # data/alpaca_en_demo.json with the chat template, 10% held out
    **QWEN2_5_TRAINING,  # batch 4 x 4, 3 epochs, cosine, 5% warm-up
    **QWEN2_5_LORA,  # r 64, alpha 16, dropout 0.1, q,k,v,o,gate,up,down
    quantization="8bit",
    learning_rate=2e-4,
    padding_free=True,  # a batch laid end to end: no padding computed, same loss (results/packing_alpaca.md)
    output_dir="outputs/qwen2_5_0_5b_qlora_8bit",
)

if __name__ == "__main__":
    run_recipe("qwen2_5_0_5b_qlora_8bit", DEFAULTS)
