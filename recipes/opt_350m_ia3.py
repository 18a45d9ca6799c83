"""IA3 on OPT-350m: IMDB sentiment as an instruction task, learned rescaling of keys, values and FFN.

IA3 learns one vector per adapted layer that multiplies its activations element-wise: even fewer
parameters than LoRA, no rank to choose, and it merges into the weights like LoRA.

What it does
  - facebook/opt-350m, Alpaca layout; the first 1000 IMDB reviews, 90/10 split; eval loss,
    answer-token accuracy, sentiment accuracy / macro-F1 by label likelihood.
  - IA3 on PEFT's default modules for OPT (q_proj, k_proj and fc2, with fc2 as the feed-forward
    module); lr 3e-3 (the IA3 paper's); batch 8, 3 epochs.

Trade-offs
  - Tiny adapters and fast steps; less capacity than LoRA on tasks far from pre-training.

Run it
  python recipes/opt_350m_ia3.py
  python recipes/opt_350m_ia3.py --model tiny-opt --max_steps 5   # offline, CPU
  python recipes/opt_350m_ia3.py --learning_rate 1e-2
"""

from harness.run.flow import run_recipe
from harness.run.presets import IMDB_SENTIMENT_ALPACA, OPT_350M, OPT_TRAINING

DEFAULTS = dict(
    **OPT_350M,
    **IMDB_SENTIMENT_ALPACA,  # 1000 reviews in the Alpaca layout, 90/10 split, 512 tokens
    **OPT_TRAINING,  # batch 8, 3 epochs
    method="ia3",
    learning_rate=3e-3,
    output_dir="outputs/opt_350m_ia3",
)

if __name__ == "__main__":
    run_recipe("opt_350m_ia3", DEFAULTS)
