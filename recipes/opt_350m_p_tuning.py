"""P-tuning on OPT-350m: IMDB sentiment as an instruction task, virtual tokens from a prompt encoder.

Like prompt tuning, virtual tokens are prepended to the input, but they are produced by a small
MLP (the prompt encoder) from trainable embeddings, which makes them easier to optimise.

What it does
  - facebook/opt-350m, Alpaca layout; the first 1000 IMDB reviews, 90/10 split; eval loss,
    answer-token accuracy, sentiment accuracy / macro-F1 by label likelihood.
  - 20 virtual tokens, prompt encoder hidden size 128, lr 1e-3; batch 8, 3 epochs.

Trade-offs
  - More stable than plain prompt tuning, still behind LoRA on small models.
  - The encoder is only needed in training; the saved adapter holds the final virtual tokens.
  - Cannot be merged into the model: load it with PeftModel / python -m harness.infer.

Run it
  python recipes/opt_350m_p_tuning.py
  python recipes/opt_350m_p_tuning.py --model tiny-opt --max_steps 5   # offline, CPU
  python recipes/opt_350m_p_tuning.py --encoder_hidden_size 256 --num_virtual_tokens 10
"""

from harness.run.flow import run_recipe
from harness.run.presets import IMDB_SENTIMENT_ALPACA, OPT_350M, OPT_TRAINING

DEFAULTS = dict(
    **OPT_350M,
    **IMDB_SENTIMENT_ALPACA,  # 1000 reviews in the Alpaca layout, 90/10 split, 512 tokens
    **OPT_TRAINING,  # batch 8, 3 epochs
    method="p_tuning",
    num_virtual_tokens=20,
    encoder_hidden_size=128,
    learning_rate=1e-3,
    output_dir="outputs/opt_350m_p_tuning",
)

if __name__ == "__main__":
    run_recipe("opt_350m_p_tuning", DEFAULTS)
