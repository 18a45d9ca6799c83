"""Prefix tuning on OPT-350m: IMDB sentiment as an instruction task, trained keys/values in every layer.

Instead of input embeddings, prefix tuning learns 20 key/value vectors per layer that every
token attends to, as if a trained prompt had been run through the model first.

What it does
  - facebook/opt-350m, Alpaca layout; the first 1000 IMDB reviews, 90/10 split; eval loss,
    answer-token accuracy, sentiment accuracy / macro-F1 by label likelihood.
  - 20 virtual tokens per layer, lr 1e-2; batch 8, 3 epochs.

Trade-offs
  - More capacity than prompt tuning (every layer), still a small adapter.
  - The prefix travels as the model's key/value cache, which gradient checkpointing cannot
    recompute: --activation_checkpointing true is refused, so long inputs cost more memory than LoRA.
  - Cannot be merged into the model: load it with PeftModel / python -m harness.infer.

Run it
  python recipes/opt_350m_prefix_tuning.py
  python recipes/opt_350m_prefix_tuning.py --model tiny-opt --max_steps 5   # offline, CPU
  python recipes/opt_350m_prefix_tuning.py --num_virtual_tokens 30 --learning_rate 5e-3
"""

from harness.run.flow import run_recipe
from harness.run.presets import IMDB_SENTIMENT_ALPACA, OPT_350M, OPT_TRAINING

DEFAULTS = dict(
    **OPT_350M,
    **IMDB_SENTIMENT_ALPACA,  # 1000 reviews in the Alpaca layout, 90/10 split, 512 tokens
    **OPT_TRAINING,  # batch 8, 3 epochs
    method="prefix_tuning",
    num_virtual_tokens=20,
    learning_rate=1e-2,
    output_dir="outputs/opt_350m_prefix_tuning",
)

if __name__ == "__main__":
    run_recipe("opt_350m_prefix_tuning", DEFAULTS)
