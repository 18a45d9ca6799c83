"""Full fine-tuning of Qwen2.5-0.5B-Instruct on Alpaca-style instructions, with its chat template.

Every weight is trained: the most capacity and the most memory. The baseline the LoRA/QLoRA
recipes of this model are measured against.

What it does
  - Qwen/Qwen2.5-0.5B-Instruct. Weights stay float32 (Adam's small updates vanish in bf16), the
    forward/backward runs in bf16 (fp16 on T4/V100) by mixed precision.
  - Data: data/alpaca_en_demo.json (Alpaca instructions with GPT-4 answers; instruction/input/output,
    or chat `messages` records in your own file), rendered with the model's chat template; loss on the
    answer only; 10% held out for eval loss and answer-token accuracy.
  - lr 2e-5, batch 2 x accumulation 8, 3 epochs, cosine schedule with 5% warm-up (the original
    project's train_config_full).
  - Writes the whole model (model.safetensors, float32) + tokenizer to output_dir, and result.json,
    where `model_bytes` is the saved model's size (there is no adapter).

Trade-offs
  - Weights, gradients and Adam's two states take 16 bytes per parameter before any activation;
    LoRA (qwen2_5_0_5b_lora.py) trains a few percent of the parameters for a fraction of that.
  - Padding-free batches (--padding_free true, this recipe's default): the examples of a batch are laid end
    to end in one row, no padding computed, same loss (results/packing_alpaca.md). --padding_free false pads
    each batch to its longest example instead; --packing true also fills rows across examples (fewer steps).

Run it
  python recipes/qwen2_5_0_5b_full.py                                  # GPU + Hugging Face Hub
  python recipes/qwen2_5_0_5b_full.py --model tiny-qwen2 --max_steps 5 # offline, CPU, seconds
  python recipes/qwen2_5_0_5b_full.py --data_file my_chats.jsonl       # your instruction/messages file
  python recipes/qwen2_5_0_5b_full.py --config recipes/configs/train_config_full.yaml
  python recipes/qwen2_5_0_5b_full.py --help                           # every setting

Then chat with it (it is a complete model): python -m harness.infer --base outputs/qwen2_5_0_5b_full --chat
"""

from harness.run.flow import run_recipe
from harness.run.presets import ALPACA_GPT4_CHAT, QWEN2_5_0_5B_INSTRUCT, QWEN2_5_TRAINING

DEFAULTS = dict(
    **QWEN2_5_0_5B_INSTRUCT,
    **ALPACA_GPT4_CHAT,  # data/alpaca_en_demo.json with the chat template, 10% held out
    **QWEN2_5_TRAINING,  # 3 epochs, cosine, 5% warm-up
) | dict(
    method="full",
    learning_rate=2e-5,
    per_device_train_batch_size=2,  # a full model's gradients and Adam states leave less room for activations
    gradient_accumulation_steps=8,
    padding_free=True,  # a batch laid end to end: no padding computed, same loss (results/packing_alpaca.md)
    output_dir="outputs/qwen2_5_0_5b_full",
)

if __name__ == "__main__":
    run_recipe("qwen2_5_0_5b_full", DEFAULTS)
