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

# ---------------------------------------------------------------------------- Qwen2.5-0.5B-Instruct

# The original project's model: small enough for full fine-tuning on one mid-range GPU.
QWEN2_5_0_5B_INSTRUCT = dict(model="Qwen/Qwen2.5-0.5B-Instruct")

# Alpaca instructions with GPT-4 answers (999 records), laid out with the model's own chat template;
# scored by eval loss and answer-token accuracy on a held-out 10%.
ALPACA_GPT4_CHAT = dict(
    task="instruction",
    data_file="data/alpaca_en_demo.json",
    prompt_format="auto",  # the tokenizer's chat template; the Alpaca layout for a model without one
    validation_split=0.1,
    max_seq_length=2048,
)

# The original project's schedule (its train_config_*.json): 3 epochs, cosine decay after a warm-up,
# effective batch 16. Warm-up is a fraction here: its 100 steps were most of a 999-record run.
QWEN2_5_TRAINING = dict(
    per_device_train_batch_size=4,
    gradient_accumulation_steps=4,
    num_train_epochs=3,
    lr_scheduler_type="cosine",
    warmup_steps=0.05,
    eval_steps=50,
    save_steps=50,
    seed=42,
)

# The original project's LoRA, shared by its LoRA and QLoRA configs: rank 64, alpha 16, all seven projections.
QWEN2_5_LORA = dict(method="lora", target_modules="all7", r=64, lora_alpha=16, lora_dropout=0.1)

# ---------------------------------------------------------------------------- OPT-350m

# The classic PEFT demo model: 331M parameters, no chat template, fits anywhere (CPU included).
OPT_350M = dict(model="facebook/opt-350m")

# The flagship's IMDB data as an instruction task: Alpaca layout (instruction, review as input,
# label as response), since OPT has no chat template.
IMDB_SENTIMENT_ALPACA = {**IMDB_SENTIMENT, "prompt_format": "alpaca"}

# A 350M model needs no memory tricks: plain AdamW, micro-batches of 8. Learning rates differ by
# method (virtual tokens need far higher ones than LoRA), so each recipe sets its own.
OPT_TRAINING = dict(
    per_device_train_batch_size=8,
    gradient_accumulation_steps=1,
    num_train_epochs=3,
    eval_steps=50,
    save_steps=50,
    seed=42,
)

# ---------------------------------------------------------------------------- Llama-2-7B

# Llama-2-7B base (gated on the Hub: accept Meta's license, then export HF_TOKEN). 4-bit NF4, as in
# the guides' T4 runs: 16-bit weights alone (13.5 GB) leave no room to train on a 16 GB card.
LLAMA2_7B_4BIT = dict(model="meta-llama/Llama-2-7b-hf", quantization="4bit")

# The first 100 original Stanford Alpaca records. Llama-2 base has no chat template: Alpaca's own
# prompt ("Below is an instruction ... ### Response:").
ALPACA_ORIGINAL = dict(
    task="instruction",
    data_file="data/alpaca_tiny.json",
    prompt_format="alpaca",
    validation_split=0.1,
    max_seq_length=512,
)

# The guides' Llama-2 training: lr 2e-4, batch 1 x accumulation 4, 3 epochs, on a 16 GB T4.
LLAMA2_T4_TRAINING = dict(
    learning_rate=2e-4,
    per_device_train_batch_size=1,
    gradient_accumulation_steps=4,
    num_train_epochs=3,
    optim="paged_adamw_8bit",
    activation_checkpointing=True,
    eval_steps=20,
    save_steps=20,
    seed=42,
)

# The guides' Llama-2 LoRA: rank 8, alpha 32, dropout 0.05 on q,k,v,o. DoRA, rsLoRA and LoftQ keep it.
LLAMA2_LORA = dict(target_modules="attention", r=8, lora_alpha=32, lora_dropout=0.05)
