"""Plain QLoRA on a 4-bit Qwen2-7B-Instruct: the AdaLoRA flagship's twin, for a direct comparison.

Same model, data, prompts, split, optimizer, learning rate and step budget as
qwen2_7b_adalora.py; only the adapter differs: LoRA with a fixed rank on every projection
instead of AdaLoRA's moving ranks. Run both and compare their result.json (or let
`python -m harness.bench --recipes qwen2_7b_adalora,qwen2_7b_qlora` do it).

What it does
  - Qwen/Qwen2-7B-Instruct in 4-bit NF4 + double quantization; fp16 compute on T4/V100, bf16 where
    supported; gradient checkpointing; paged 8-bit AdamW; lr 1e-4; batch 1 x accumulation 8; 3 epochs.
  - LoRA r 8, alpha 32, dropout 0.1 on q,k,v,o,gate,up,down (~20M trainable parameters at 7B).
  - IMDB sentiment as "Human: ... / Assistant: <label>", loss on the answer only; eval loss,
    answer-token accuracy and sentiment accuracy / macro-F1 every 50 steps; best checkpoint kept.

Trade-offs
  - Cheaper per step than AdaLoRA (no importance scores, no orthogonality penalty) and no schedule
    to get right; every module gets the same rank whether it needs it or not.

Run it
  python recipes/qwen2_7b_qlora.py                               # GPU + Hugging Face Hub
  python recipes/qwen2_7b_qlora.py --model stories260k           # offline, CPU
  python recipes/qwen2_7b_qlora.py --config recipes/configs/smollm2_imdb_demo.yaml  # offline, CPU, ~7 min: learns
  python recipes/qwen2_7b_qlora.py --r 16 --lora_alpha 32         # any setting; --help lists them

Then ask it (the prompt is laid out as in training, and the base is loaded in 4-bit as trained):
  python -m harness.infer --adapter outputs/qwen2_7b_qlora --load-in-4bit --prompt "A gripping, beautifully shot film." --temperature 0 --max_new_tokens 3
"""

from harness.run.flow import run_recipe
from harness.run.presets import IMDB_SENTIMENT, KAGGLE_T4_TRAINING, QWEN2_7B_INSTRUCT_4BIT

DEFAULTS = dict(
    **QWEN2_7B_INSTRUCT_4BIT,
    **IMDB_SENTIMENT,
    **KAGGLE_T4_TRAINING,
    method="lora",
    target_modules="all7",
    r=8,
    lora_alpha=32,
    lora_dropout=0.1,
    output_dir="outputs/qwen2_7b_qlora",
)

if __name__ == "__main__":
    run_recipe("qwen2_7b_qlora", DEFAULTS)
