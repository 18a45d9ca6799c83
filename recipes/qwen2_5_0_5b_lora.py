"""LoRA on Qwen2.5-0.5B-Instruct: Alpaca-style instructions with the model's chat template.

The base model stays frozen in 16-bit; small rank-64 matrices beside all seven projections learn
the task. Quality close to full fine-tuning for a fraction of the memory; the run prints how many
parameters train.

What it does
  - Qwen/Qwen2.5-0.5B-Instruct in bf16 (fp16 on T4/V100).
  - LoRA r 64, alpha 16, dropout 0.1 on q,k,v,o,gate,up,down; lr 1e-4 (the original project's
    train_config_lora).
  - Data: data/alpaca_en_demo.json (instruction/input/output, or chat `messages` in your own file)
    through the chat template; loss on the answer only; 10% held out for eval loss and
    answer-token accuracy. Batch 4 x accumulation 4, 3 epochs, cosine with 5% warm-up.
  - Writes the adapter + tokenizer and result.json to output_dir.

Trade-offs
  - alpha 16 with r 64 scales updates by 0.25: a gentle adapter. Raise --lora_alpha (or try
    llama2_7b_rslora.py's rank-stabilised scaling) if it learns too slowly.
  - Needs the 16-bit base in memory; the QLoRA recipes load it in 4 or 8 bits instead.
  - Padding-free batches (--padding_free true, this recipe's default): the examples of a batch are laid end
    to end in one row, no padding computed, same loss (results/packing_alpaca.md). --padding_free false pads
    each batch to its longest example instead; --packing true also fills rows across examples (fewer steps).

Run it
  python recipes/qwen2_5_0_5b_lora.py                                   # GPU + Hugging Face Hub
  python recipes/qwen2_5_0_5b_lora.py --model tiny-qwen2 --max_steps 5  # offline, CPU, seconds
  python recipes/qwen2_5_0_5b_lora.py --r 16 --lora_alpha 32 --target_modules attention
  python recipes/qwen2_5_0_5b_lora.py --config recipes/configs/train_config_lora.yaml

Then:
  python -m harness.infer --base Qwen/Qwen2.5-0.5B-Instruct --adapter outputs/qwen2_5_0_5b_lora --chat
  python -m harness.merge --base Qwen/Qwen2.5-0.5B-Instruct --adapter outputs/qwen2_5_0_5b_lora --out merged/
"""

from harness.run.flow import run_recipe
from harness.run.presets import ALPACA_GPT4_CHAT, QWEN2_5_0_5B_INSTRUCT, QWEN2_5_LORA, QWEN2_5_TRAINING

DEFAULTS = dict(
    **QWEN2_5_0_5B_INSTRUCT,
    **ALPACA_GPT4_CHAT,  # data/alpaca_en_demo.json with the chat template, 10% held out
    **QWEN2_5_TRAINING,  # batch 4 x 4, 3 epochs, cosine, 5% warm-up
    **QWEN2_5_LORA,  # r 64, alpha 16, dropout 0.1, q,k,v,o,gate,up,down
    learning_rate=1e-4,
    padding_free=True,  # a batch laid end to end: no padding computed, same loss (results/packing_alpaca.md)
    output_dir="outputs/qwen2_5_0_5b_lora",
)

if __name__ == "__main__":
    run_recipe("qwen2_5_0_5b_lora", DEFAULTS)
