"""Named groups of settings that several recipes share, so each lives in one place.

A recipe's DEFAULTS is a merge of these plus its own method settings; anything here can still be
overridden from the command line or a --config file like every other setting.
"""

# Qwen2-7B-Instruct in 4-bit NF4 with double quantization: ~5.5 GB of weights instead of ~15 GB.
QWEN2_7B_INSTRUCT_4BIT = dict(
    model="Qwen/Qwen2-7B-Instruct",
    quantization="4bit",
)

# The original Kaggle script's data: the first 1000 labelled IMDB reviews, "Human: ... / Assistant:"
# prompts, a fixed 90/10 split, 512-token context (long reviews are cut, not the answer).
IMDB_SENTIMENT = dict(
    task="classification",
    data_file="data/imdb_samples_2000.csv",
    max_samples=1000,
    labels="positive,negative",
    prompt_format="human_assistant",
    validation_split=0.1,
    max_seq_length=512,
)

# Training that fits a 7B 4-bit model on a 16 GB T4: effective batch 8 from micro-batches of 1.
KAGGLE_T4_TRAINING = dict(
    learning_rate=1e-4,
    per_device_train_batch_size=1,
    gradient_accumulation_steps=8,
    num_train_epochs=3,
    optim="paged_adamw_8bit",  # optimizer state in 8 bits, paged to CPU RAM under memory spikes
    activation_checkpointing=True,  # (gradient checkpointing) much less memory, ~30% slower steps
    eval_steps=50,
    save_steps=50,
    metric_for_best_model="eval_loss",
    seed=42,
)
