"""AdaLoRA on a 4-bit Qwen2-7B-Instruct: sentiment classification of IMDB reviews on one 16 GB GPU.

AdaLoRA starts every adapted layer at rank `init_r` and, while training, moves rank to the
layers where it matters most, ending at an average of `target_r`. The base model is loaded in
4-bit NF4 (QLoRA-style), so a 7B model trains on a free Kaggle/Colab T4.

What it does
  - Qwen/Qwen2-7B-Instruct in 4-bit NF4 with double quantization; fp16 compute on T4/V100,
    bf16 where supported; gradient checkpointing; paged 8-bit AdamW.
  - AdaLoRA on all seven projections (q,k,v,o,gate,up,down): init_r 12 -> target_r 4,
    tinit/tfinal/deltaT = 20% / 60% / 5% of the real number of optimizer steps.
  - Data: the first 1000 rows of data/imdb_samples_2000.csv as "Human: ... / Assistant: <label>",
    90/10 train/validation split (seed 42). Loss on the answer tokens only; dynamic padding;
    a review too long for the context is cut, never the instruction or the answer.
  - Every 50 steps: eval loss, answer-token accuracy, and sentiment accuracy / macro-F1 by label
    likelihood. Keeps the best checkpoint (eval loss) and resumes from the last one when rerun.
  - Writes to output_dir: the PEFT adapter, the tokenizer, adalora_ranks.json (final rank of every
    module) and result.json (memory, time, throughput, parameters, scores, provenance).

Trade-offs
  - AdaLoRA costs a little more per step than LoRA (importance scores every step) and needs a
    known total step count; its orthogonal regulariser needs the whole model on one GPU: several GPUs
    run it as one process each (DDP, every process reaches the same ranks), never split by device_map.
  - 4-bit weights cut memory ~4x versus fp16 at a small quality cost; the adapter stays 16/32-bit.

Run it
  python recipes/qwen2_7b_adalora.py                              # GPU + Hugging Face Hub
  python recipes/qwen2_7b_adalora.py --model stories260k          # offline, CPU, minutes
  python recipes/qwen2_7b_adalora.py --target_r 8 --init_r 24 --learning_rate 2e-4
  python recipes/qwen2_7b_adalora.py --config my_settings.yaml    # any setting below, as YAML/JSON
  accelerate launch --config_file recipes/configs/accelerate/ddp.yaml --num_processes 2 \
      recipes/qwen2_7b_adalora.py                                 # two GPUs, one process each
  python recipes/qwen2_7b_adalora.py --help                       # every setting

Then load the adapter:
  PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), "outputs/qwen2_7b_adalora")
"""

from harness.run.flow import run_recipe
from harness.run.presets import IMDB_SENTIMENT, KAGGLE_T4_TRAINING, QWEN2_7B_INSTRUCT_4BIT

DEFAULTS = dict(
    **QWEN2_7B_INSTRUCT_4BIT,  # Qwen/Qwen2-7B-Instruct, 4-bit NF4 + double quantization
    **IMDB_SENTIMENT,  # first 1000 reviews, "Human: ... / Assistant: <label>", 90/10 split, 512 tokens
    **KAGGLE_T4_TRAINING,  # lr 1e-4, batch 1 x accumulation 8, 3 epochs, paged 8-bit AdamW, checkpointing
    # AdaLoRA: every module starts at rank 12; the budget shrinks to an average of 4.
    method="adalora",
    target_modules="all7",  # q,k,v,o,gate,up,down
    init_r=12,
    target_r=4,
    beta1=0.85,
    beta2=0.85,
    lora_alpha=32,
    lora_dropout=0.1,
    orth_reg_weight=0.5,
    output_dir="outputs/qwen2_7b_adalora",
)

if __name__ == "__main__":
    run_recipe("qwen2_7b_adalora", DEFAULTS)
