"""LoRA on OPT-350m, the classic PEFT demo model: IMDB sentiment as an instruction task.

The configuration from PEFT's original OPT examples: rank 16 on the attention queries and values
only. Small, fast, and a good first run to see LoRA work end to end.

What it does
  - facebook/opt-350m (no chat template: Alpaca layout "### Instruction / ### Input / ### Response").
  - LoRA r 16, alpha 32, dropout 0.05 on q_proj and v_proj; lr 2e-4.
  - Data: the first 1000 rows of data/imdb_samples_2000.csv, review as the input, "positive" or
    "negative" as the response; 90/10 split. Scores: eval loss, answer-token accuracy, and
    sentiment accuracy / macro-F1 by label likelihood.
  - Batch 8, 3 epochs, plain AdamW. Writes the adapter, tokenizer and result.json to output_dir.

Trade-offs
  - q,v only is the lightest LoRA; --target_modules all-linear (every linear layer but the output
    head) usually learns more for a few times the parameters.

Run it
  python recipes/opt_350m_lora.py                                  # GPU (or CPU, slowly) + Hub
  python recipes/opt_350m_lora.py --model tiny-opt --max_steps 5   # offline, CPU, seconds
  python recipes/opt_350m_lora.py --target_modules all-linear --r 8
"""

from harness.run.flow import run_recipe
from harness.run.presets import IMDB_SENTIMENT_ALPACA, OPT_350M, OPT_TRAINING

DEFAULTS = dict(
    **OPT_350M,
    **IMDB_SENTIMENT_ALPACA,  # 1000 reviews in the Alpaca layout, 90/10 split, 512 tokens
    **OPT_TRAINING,  # batch 8, 3 epochs
    method="lora",
    target_modules="qv",  # q_proj, v_proj
    r=16,
    lora_alpha=32,
    lora_dropout=0.05,
    learning_rate=2e-4,
    output_dir="outputs/opt_350m_lora",
)

if __name__ == "__main__":
    run_recipe("opt_350m_lora", DEFAULTS)
