"""Prompt tuning on OPT-350m: IMDB sentiment as an instruction task, learning only a soft prompt.

Twenty "virtual token" embeddings are prepended to every input and trained; the model itself is
untouched. The fewest trainable parameters of any method here (20 x hidden size).

What it does
  - facebook/opt-350m, Alpaca layout; the first 1000 IMDB reviews, 90/10 split; eval loss,
    answer-token accuracy, sentiment accuracy / macro-F1 by label likelihood.
  - 20 virtual tokens, lr 3e-2 (soft prompts need learning rates ~100x LoRA's); batch 8, 3 epochs.

Trade-offs
  - Works best on big models; on small ones it trails LoRA and can need many epochs.
  - Virtual tokens take room in the context (max_seq_length still counts the real tokens).
  - Cannot be merged into the model: load it with PeftModel / python -m harness.infer.

Run it
  python recipes/opt_350m_prompt_tuning.py
  python recipes/opt_350m_prompt_tuning.py --model tiny-opt --max_steps 5   # offline, CPU
  python recipes/opt_350m_prompt_tuning.py --num_virtual_tokens 8 --learning_rate 1e-2
"""

from harness.run.flow import run_recipe
from harness.run.presets import IMDB_SENTIMENT_ALPACA, OPT_350M, OPT_TRAINING

DEFAULTS = dict(
    **OPT_350M,
    **IMDB_SENTIMENT_ALPACA,  # 1000 reviews in the Alpaca layout, 90/10 split, 512 tokens
    **OPT_TRAINING,  # batch 8, 3 epochs
    method="prompt_tuning",
    num_virtual_tokens=20,
    learning_rate=3e-2,
    output_dir="outputs/opt_350m_prompt_tuning",
)

if __name__ == "__main__":
    run_recipe("opt_350m_prompt_tuning", DEFAULTS)
