"""The project's own battery of bad inputs, across every entry point: each case must exit with code 2
and print exactly one line on stderr, naming the problem and the fix, with nothing before it.

Every case runs as the command line runs it (the recipe script or `python -m harness.<tool>` as
__main__, argv and working folder as given). In this process that takes well under a second a case;
a fresh Python process takes ~5-10 s of imports, so one case per entry point also runs as a fresh
process with bitsandbytes' AVX512-BF16 import path forced on, whatever this CPU is: that is where
library noise would land before the message. FT_COOKBOOK_BATTERY=fresh runs every case that way.
"""
from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from harness.locations import REPO_ROOT, RESULTS_DIR

FORCE_AVX512BF16 = Path(__file__).parent / "avx512bf16_forced"  # its sitecustomize.py forces the path
RECIPE = "recipes/qwen2_7b_adalora.py"
FLAGSHIP = [RECIPE, "--model", "stories260k", "--output_dir", "{tmp}/out-{case}"]
QLORA = ["recipes/qwen2_7b_qlora.py", "--model", "stories260k", "--output_dir", "{tmp}/out-{case}"]
LORA = ["recipes/qwen2_5_0_5b_lora.py", "--model", "tiny-qwen2", "--output_dir", "{tmp}/out-{case}"]
OPT = ["recipes/opt_350m_prefix_tuning.py", "--model", "tiny-opt", "--output_dir", "{tmp}/out-{case}"]
ALPACA100 = ["recipes/llama2_7b_lora_alpaca100.py", "--model", "stories260k", "--quantization", "none",
             "--output_dir", "{tmp}/out-{case}"]
DPO = ["recipes/qwen2_5_0_5b_dpo.py", "--model", "tiny-qwen2", "--output_dir", "{tmp}/out-{case}"]
GRPO = ["recipes/qwen2_5_0_5b_grpo.py", "--model", "tiny-qwen2", "--output_dir", "{tmp}/out-{case}"]
BENCH = ["-m", "harness.bench", "--results-dir", "{tmp}/results-{case}", "--output-root", "{tmp}/bench-{case}", "--dry-run"]

# (case, command after `python`, program prefix, the problem, the fix)
CASES = [
    # recipes: data
    ("missing-data-file", [*FLAGSHIP, "--data_file", "missing.csv"], "qwen2_7b_adalora", "data file missing.csv not found", "pass --data_file"),
    ("broken-jsonl-line", [*FLAGSHIP, "--data_file", "{tmp}/broken.jsonl"], "qwen2_7b_adalora", "line 3: not a valid JSON record", "fix or delete that line"),
    ("wrong-columns", [*FLAGSHIP, "--data_file", "{tmp}/columns.csv"], "qwen2_7b_adalora", "has no column 'text', 'label'", "--text_column"),
    ("unknown-label", [*FLAGSHIP, "--data_file", "{tmp}/neutral.csv"], "qwen2_7b_adalora", "label 'neutral' is not one of", "--labels"),
    ("no-text-at-all", [*FLAGSHIP, "--data_file", "{tmp}/empty_text.csv"], "qwen2_7b_adalora", "no row has text in column 'text'", "column"),
    ("unknown-format", [*FLAGSHIP, "--data_file", "{tmp}/data.xlsx"], "qwen2_7b_adalora", "unknown format '.xlsx'", "use .csv, .json, .jsonl or .parquet"),
    ("broken-parquet", [*FLAGSHIP, "--data_file", "{tmp}/data.parquet"], "qwen2_7b_adalora", "data.parquet", "Parquet"),
    # recipes: supervised formats and TRL's SFT settings
    ("sft-no-format", [*LORA, "--data_file", "{tmp}/columns.csv"], "qwen2_5_0_5b_lora", "fit no supervised format", "use one of: alpaca"),
    ("sft-mixed-formats", [*LORA, "--data_file", "{tmp}/mixed_sft.jsonl"], "qwen2_5_0_5b_lora", "row 2 mixes formats", "use one format per file"),
    ("sft-no-assistant-turn", [*LORA, "--data_file", "{tmp}/no_answer.jsonl"], "qwen2_5_0_5b_lora", "row 1: no assistant turn", "end the conversation with the assistant's answer"),
    ("sft-preference-file", [*LORA, "--data_file", "data/dpo_en_demo.json"], "qwen2_5_0_5b_lora", "holds preference pairs", "qwen2_5_0_5b_dpo.py"),
    ("sft-bad-column-mapping", [*LORA, "--column_mapping", "{{not json"], "qwen2_5_0_5b_lora", "--column_mapping is not valid JSON", "pass one dataset_info entry"),
    ("sft-dataset-folder-missing", [*LORA, "--dataset_name", "{tmp}/no_such_dataset"], "qwen2_5_0_5b_lora", "could not be loaded", "check the name"),
    ("sft-packing-prompt-tuning", [*OPT, "--packing", "true"], "opt_350m_prefix_tuning", "--packing would let examples see each other under prefix_tuning", "drop --packing"),
    ("sft-packing-wrapped", [*LORA, "--packing", "true", "--packing_strategy", "wrapped"], "qwen2_5_0_5b_lora", "--packing_strategy wrapped", "use bfd"),
    ("sft-max-length", [*LORA, "--max_length", "300"], "qwen2_5_0_5b_lora", "--max_length is TRL's name for --max_seq_length", "set --max_seq_length 300"),
    ("sft-chat-template-missing", [*LORA, "--chat_template_path", "{tmp}/nowhere.jinja"], "qwen2_5_0_5b_lora", "--chat_template_path", "pass a Jinja chat template file"),
    ("sft-truncation-mode", [*LORA, "--truncation_mode", "keep_end"], "qwen2_5_0_5b_lora", "--truncation_mode does not apply", "leave it unset"),
    ("window-too-short", [*FLAGSHIP, "--max_seq_length", "16"], "qwen2_7b_adalora", "--max_seq_length 16 is too short", "pass --max_seq_length"),
    ("validation-split", [*FLAGSHIP, "--validation_split", "1.5"], "qwen2_7b_adalora", "--validation_split must be in [0, 1)", "got 1.5"),
    ("max-samples-zero", [*FLAGSHIP, "--max_samples", "0"], "qwen2_7b_adalora", "--max_samples must be at least 1", "got 0"),
    # recipes: model
    ("hub-id-offline", [*FLAGSHIP, "--model", "some-org/not-cached"], "qwen2_7b_adalora", "cannot load model 'some-org/not-cached'", "--model stories260k"),
    ("missing-model-folder", [*FLAGSHIP, "--model", "{tmp}/nowhere/"], "qwen2_7b_adalora", "model folder", "not found"),
    ("unknown-quantization", [*FLAGSHIP, "--quantization", "3bit"], "qwen2_7b_adalora", "unknown --quantization '3bit'", "use none, 4bit or 8bit"),
    ("unknown-dtype", [*FLAGSHIP, "--dtype", "float8"], "qwen2_7b_adalora", "unknown --dtype 'float8'", "use auto"),
    ("unsloth-without-gpu", [*QLORA, "--backend", "unsloth"], "qwen2_7b_qlora", "the unsloth backend cannot run here", "--backend peft"),
    ("loftq-without-gpu", ["recipes/llama2_7b_loftq.py", "--model", "stories260k", "--output_dir", "{tmp}/out-{case}"], "llama2_7b_loftq", "LoftQ needs an NVIDIA GPU", "--method lora"),
    # recipes: method settings
    ("unknown-method", [*FLAGSHIP, "--method", "magic"], "qwen2_7b_adalora", "unknown --method 'magic'", "choose one of"),
    ("unknown-target-layer", [*QLORA, "--target_modules", "no_such_proj"], "qwen2_7b_qlora", "no linear layer named no_such_proj", "it has"),
    ("lora-dropout", [*FLAGSHIP, "--lora_dropout", "2"], "qwen2_7b_adalora", "--lora_dropout must be in [0, 1)", "got 2"),
    ("lora-alpha-zero", [*QLORA, "--lora_alpha", "0"], "qwen2_7b_qlora", "--lora_alpha must be greater than 0", "does nothing"),
    ("rank-zero", [*QLORA, "--r", "0"], "qwen2_7b_qlora", "--r must be at least 1", "got 0"),
    ("target-r-above-init-r", [*FLAGSHIP, "--target_r", "16"], "qwen2_7b_adalora", "1 <= --target_r <= --init_r", "target_r 16"),
    ("deltaT-zero", [*FLAGSHIP, "--deltaT", "0"], "qwen2_7b_adalora", "--deltaT must be >= 1", "got 0"),
    ("impossible-schedule", [*FLAGSHIP, "--max_steps", "4", "--tinit", "5"], "qwen2_7b_adalora", "impossible AdaLoRA schedule", "train for more steps"),
    ("prefix-with-checkpointing", [*OPT, "--activation_checkpointing", "true"], "opt_350m_prefix_tuning", "cannot be combined with gradient checkpointing", "--activation_checkpointing false"),
    ("full-on-4bit", [*QLORA, "--method", "full"], "qwen2_7b_qlora", "full fine-tuning cannot update quantized weights", "--quantization none"),
    ("init-adapter-missing", [*QLORA, "--init_adapter", "{tmp}/nowhere"], "qwen2_7b_qlora", "holds no adapter", "output_dir of a finished PEFT run"),
    ("init-adapter-other-rank", [*QLORA, "--init_adapter", "{tmp}/adapter"], "qwen2_7b_qlora", "its rank is 4, this run's --r is 8", "--r"),
    # recipes: training settings
    ("batch-zero", [*FLAGSHIP, "--per_device_train_batch_size", "0"], "qwen2_7b_adalora", "--per_device_train_batch_size must be at least 1", "got 0"),
    ("accumulation-zero", [*FLAGSHIP, "--gradient_accumulation_steps", "0"], "qwen2_7b_adalora", "--gradient_accumulation_steps must be at least 1", "got 0"),
    ("max-steps-negative", [*FLAGSHIP, "--max_steps", "-5"], "qwen2_7b_adalora", "--max_steps must be a number of optimizer steps >= 1", "or -1 to train --num_train_epochs"),
    ("zero-epochs", [*FLAGSHIP, "--num_train_epochs", "0"], "qwen2_7b_adalora", "--num_train_epochs must be greater than 0", "or --max_steps"),
    ("learning-rate-zero", [*FLAGSHIP, "--learning_rate", "0"], "qwen2_7b_adalora", "--learning_rate must be greater than 0", "trains nothing"),
    ("learning-rate-text", [*FLAGSHIP, "--learning_rate", "fast"], "qwen2_7b_adalora", "invalid float value: 'fast'", "see --help"),
    ("negative-seed", [*FLAGSHIP, "--seed", "-1"], "qwen2_7b_adalora", "--seed must be in [0, 4294967295]", "got -1"),
    ("memory-budget", [*FLAGSHIP, "--memory_budget_gb", "-4"], "qwen2_7b_adalora", "--memory_budget_gb must be greater than 0", "got -4"),
    ("memory-plan-over-budget", [*FLAGSHIP, "--memory_budget_gb", "0.0001"], "qwen2_7b_adalora", "the memory plan says this run needs", "--memory_check false runs it anyway"),
    # recipes: command line and config files
    ("unknown-flag", [*FLAGSHIP, "--no_such_flag", "1"], "qwen2_7b_adalora", "unknown setting(s): --no_such_flag 1", "see --help"),
    ("config-equals-missing", [*FLAGSHIP, "--config={tmp}/none.yaml"], "qwen2_7b_adalora", "config file {tmp}/none.yaml not found", "config file"),
    ("config-broken", [*FLAGSHIP, "--config", "{tmp}/broken.yaml"], "qwen2_7b_adalora", "is not valid YAML/JSON", "config file"),
    ("config-unknown-key", [*FLAGSHIP, "--config", "{tmp}/unknown.yaml"], "qwen2_7b_adalora", "unknown setting(s): --learning_rat", "see --help"),
    ("config-wrong-type", [*FLAGSHIP, "--config", "{tmp}/wrong_type.yaml"], "qwen2_7b_adalora", "--labels must be str, got ['positive', 'negative']", "check the config file"),
    ("empty-model", [*FLAGSHIP, "--model", ""], "qwen2_7b_adalora", "--model is empty", "--model stories260k"),
    ("eval-file-missing", [*FLAGSHIP, "--eval_file", "held_out.json"], "qwen2_7b_adalora", "data file held_out.json not found", "pass --eval_file"),
    ("data-file-a-folder", [*FLAGSHIP, "--data_file", "{tmp}/foreign"], "qwen2_7b_adalora", "is a folder", "pass --data_file"),
    ("duplicate-labels", [*FLAGSHIP, "--labels", "positive,negative,positive"], "qwen2_7b_adalora", "names a label twice", "give each label once"),
    ("flash-attention-on-cpu", [*FLAGSHIP, "--attn_implementation", "flash_attention_2"], "qwen2_7b_adalora", "needs an NVIDIA GPU and the flash_attn package", "use sdpa"),
    ("optimizer-package-missing", [*FLAGSHIP, "--optim", "galore_adamw"], "qwen2_7b_adalora", "--optim galore_adamw cannot be used here", "pick another --optim"),
    ("reporting-package-missing", [*FLAGSHIP, "--report_to", "swanlab"], "qwen2_7b_adalora", "--report_to swanlab needs its package installed", "--report_to none"),
    ("unknown-eval-strategy", [*FLAGSHIP, "--eval_strategy", "sometimes"], "qwen2_7b_adalora", "invalid choice: 'sometimes'", "see --help"),
    # recipes: output_dir
    ("output-dir-a-file", [*FLAGSHIP[:-1], "{tmp}/a-file"], "qwen2_7b_adalora", "is a file, not a folder", "pass a new or empty folder"),
    ("output-dir-foreign", [*FLAGSHIP[:-1], "{tmp}/foreign"], "qwen2_7b_adalora", "holds no run of this project", "pass an empty or new --output_dir"),
    ("output-dir-other-recipe", [*FLAGSHIP[:-1], "{tmp}/other-recipe"], "qwen2_7b_adalora", "holds a run of recipe 'qwen2_7b_qlora'", "pass another --output_dir"),
    ("output-dir-damaged-marker", [*FLAGSHIP[:-1], "{tmp}/damaged"], "qwen2_7b_adalora", "recipe_run.json is damaged", "--resume false"),
    # the alpaca100 recipe: its judge is checked before anything is trained
    ("judge-key-missing", [*ALPACA100], "llama2_7b_lora_alpaca100", "needs an API key in the environment variable OPENAI_API_KEY", "export OPENAI_API_KEY"),
    ("judge-unreachable", [*ALPACA100, "--judge_base_url", "http://127.0.0.1:9/v1", "--judge_api_key_env", ""], "llama2_7b_lora_alpaca100", "judge endpoint http://127.0.0.1:9/v1/chat/completions cannot be reached", "check --judge_base_url"),
    ("select-k-zero", [*ALPACA100, "--select_k", "0", "--judge_backend", "local"], "llama2_7b_lora_alpaca100", "--select_k must be at least 1", "got 0"),
    ("local-judge-missing", [*ALPACA100, "--judge_backend", "local", "--judge_model", "{tmp}/nowhere/"], "llama2_7b_lora_alpaca100", "model folder {tmp}/nowhere/ not found", "use a Hub id"),
    ("judge-cache-a-folder", [*ALPACA100, "--judge_backend", "local", "--judge_model", "stories260k", "--judge_cache", "{tmp}/foreign"], "llama2_7b_lora_alpaca100", "--judge_cache {tmp}/foreign is a folder", "pass a .jsonl file"),
    # the DPO and GRPO recipes: their data and TRL's settings, refused before the model loads
    ("dpo-no-rejected", [*DPO, "--data_file", "{tmp}/no_rejected.json"], "qwen2_5_0_5b_dpo", "row 2 has no rejected", "a preference pair needs chosen and rejected"),
    ("dpo-empty-side", [*DPO, "--data_file", "{tmp}/empty_side.jsonl"], "qwen2_5_0_5b_dpo", "row 1: the chosen answer is empty", "fix the pair or delete the row"),
    ("dpo-tool-turn", [*DPO, "--data_file", "{tmp}/tool_turn.json"], "qwen2_5_0_5b_dpo", "a turn from 'function_call'", "only system, human and gpt turns"),
    ("dpo-mixed-formats", [*DPO, "--data_file", "{tmp}/mixed_pairs.jsonl"], "qwen2_5_0_5b_dpo", "mixes conversations and plain-text pairs", "convert them to one format"),
    ("dpo-max-length", [*DPO, "--max_length", "300"], "qwen2_5_0_5b_dpo", "--max_length is TRL's name for --max_seq_length", "set --max_seq_length 300"),
    ("dpo-adalora", [*DPO, "--method", "adalora"], "qwen2_5_0_5b_dpo", "the dpo recipes train lora", "not adalora"),
    ("gsm8k-no-answer", [*GRPO, "--data_file", "{tmp}/gsm8k_bad.jsonl"], "qwen2_5_0_5b_grpo", "row 2: the answer has no `#### <number>`", "fix or delete the row"),
    ("grpo-completion-too-long", [*GRPO, "--max_completion_length", "600"], "qwen2_5_0_5b_grpo", "--max_completion_length 600 leaves no room for the prompt", "raise --max_seq_length"),
    ("grpo-group-size", [*GRPO, "--num_generations", "3"], "qwen2_5_0_5b_grpo", "--num_generations 3 must divide the batch of completions", "--per_device_train_batch_size 9"),
    ("grpo-one-generation", [*GRPO, "--num_generations", "1", "--per_device_train_batch_size", "1"], "qwen2_5_0_5b_grpo", "at least 2 generations per prompt", "see --help"),
    ("objective-not-the-recipes", [*DPO, "--objective", "grpo"], "qwen2_5_0_5b_dpo", "--objective is the recipe's own (dpo)", "run a recipe of objective grpo"),
    # harness.bench
    ("bench-ranks", [*BENCH, "--ranks", "4,x"], "bench", "--ranks: 'x' is not a whole number", "comma-separated integers"),
    ("bench-setting-typo", [*BENCH, "--set", "lerning_rate=1e-4"], "bench", "no recipe has a setting named 'lerning_rate'", "did you mean learning_rate"),
    ("bench-refused-trial", [*BENCH, "--model", "stories260k", "--recipes", "qwen2_7b_adalora", "--set", "tinit=5", "--budget-steps", "2"], "bench", "impossible AdaLoRA schedule", "train for more steps"),
    ("bench-budget", [*BENCH, "--budget-steps", "0"], "bench", "--budget-steps must be at least 1", "got 0"),
    ("bench-trial-timeout-zero", [*BENCH, "--trial-timeout", "0"], "bench", "--trial-timeout must be a positive number", "got 0"),
    ("bench-multi-run-recipe", [*BENCH, "--recipes", "llama2_7b_lora_alpaca100"], "bench", "harness.bench cannot sweep", "run it directly"),
    # harness.report
    ("report-empty-runs", ["-m", "harness.report", "--results-dir", "{tmp}/empty-results"], "report", "holds no complete record (it is empty)", "run python -m harness.bench"),
    ("report-foreign-records", ["-m", "harness.report", "--results-dir", "{tmp}/foreign-results"], "report", "holds no harness.bench trial record", "run python -m harness.bench"),
    ("report-no-runs", ["-m", "harness.report", "--results-dir", "{tmp}/nowhere"], "report", "no runs.jsonl in", "run python -m harness.bench first"),
    ("report-unknown-sweep", ["-m", "harness.report", "--results-dir", str(RESULTS_DIR), "--sweep", "nope"], "report", "sweep 'nope' is not in", "recorded sweeps: stories260k"),
    # harness.infer
    ("infer-missing-adapter", ["-m", "harness.infer", "--adapter", "{tmp}/nowhere", "--prompt", "hi"], "infer", "adapter folder {tmp}/nowhere not found", "pass --adapter"),
    ("infer-top-p", ["-m", "harness.infer", "--base", "stories260k", "--prompt", "hi", "--top_p", "0"], "infer", "--top_p must be in (0, 1]", "got 0"),
    ("infer-damaged-adapter", ["-m", "harness.infer", "--adapter", "{tmp}/damaged-adapter", "--base", "stories260k", "--prompt", "hi"], "infer", "is not a readable safetensors file", "retrain it or restore the file"),
    ("infer-negative-seed", ["-m", "harness.infer", "--base", "stories260k", "--prompt", "hi", "--seed", "-3"], "infer", "--seed must be in [0, 4294967295]", "got -3"),
    ("infer-no-mode", ["-m", "harness.infer", "--base", "stories260k"], "infer", "one of the arguments --prompt --chat is required", "see --help"),
    # harness.merge
    ("merge-negative-rtol", ["-m", "harness.merge", "--adapter", "{tmp}/adapter", "--out", "{tmp}/merged", "--rtol", "-1"], "merge", "--rtol must be >= 0", "got -1"),
    ("merge-occupied-out", ["-m", "harness.merge", "--adapter", "{tmp}/adapter", "--out", "{tmp}/foreign"], "merge", "already exists and is not an empty folder", "pass a new folder"),
    # harness.select
    ("select-unknown-flag", ["-m", "harness.select", "--nope", "1"], "harness.select", "unknown setting(s): --nope 1", "see --help"),
    ("select-output-a-file", ["-m", "harness.select", "--output_dir", "{tmp}/a-file"], "harness.select", "is a file, not a folder", "pass a folder"),
    ("select-k-zero-tool", ["-m", "harness.select", "--select_k", "0", "--output_dir", "{tmp}/sel-{case}"], "harness.select", "--select_k must be at least 1", "got 0"),
    ("select-negative-weight", ["-m", "harness.select", "--response_weight", "-1", "--output_dir", "{tmp}/sel-{case}"], "harness.select", "--response_weight must be >= 0", "got -1"),
    ("select-imdb-not-alpaca", ["-m", "harness.select", "--data_file", "data/imdb_samples_2000.csv", "--output_dir", "{tmp}/sel-{case}"], "harness.select", "needs Alpaca-style records", "pass --data_file with such records"),
    ("select-earlier-selection", ["-m", "harness.select", "--output_dir", "{tmp}/selection"], "harness.select", "already holds a selection", "--overwrite true"),
    # harness.summary
    ("summary-missing-record", ["-m", "harness.summary", "{tmp}/nowhere/result.json"], "summary", "{tmp}/nowhere/result.json", "result.json"),
    ("summary-not-a-record", ["-m", "harness.summary", "{tmp}/wrong_type.json"], "summary", "is not a run's record", "pass the result.json of a run"),
    ("learning-rate-inf", [*LORA, "--learning_rate", "inf"], "qwen2_5_0_5b_lora", "--learning_rate inf is not a finite number", "pass a number such as 0.0001"),
    ("config-learning-rate-nan", [*FLAGSHIP, "--config", "{tmp}/nan.yaml"], "qwen2_7b_adalora", "--learning_rate nan is not a finite number", "pass a number such as"),
    ("dpo-beta-zero", [*DPO, "--beta", "0"], "qwen2_5_0_5b_dpo", "--beta must be greater than 0, got 0", "TRL's default is 0.1"),
    ("dpo-unknown-loss-type", [*DPO, "--loss_type", "sigmoidal"], "qwen2_5_0_5b_dpo", "unknown --loss_type 'sigmoidal'", "use sigmoid, hinge"),
    ("grpo-no-generations", [*GRPO, "--num_generations", "0"], "qwen2_5_0_5b_grpo", "--num_generations 0: GRPO needs at least 2 generations", "pass --num_generations 2 or more"),
    ("grpo-completion-length-zero", [*GRPO, "--max_completion_length", "0"], "qwen2_5_0_5b_grpo", "--max_completion_length must be at least 1", "got 0"),
    ("grpo-unknown-loss-type", [*GRPO, "--loss_type", "ppo"], "qwen2_5_0_5b_grpo", "unknown --loss_type 'ppo'", "use grpo, dr_grpo"),
    ("sft-loss-type-in-config", [*LORA, "--config", "{tmp}/loss_type.yaml"], "qwen2_5_0_5b_lora", "unknown --loss_type 'nlll'", "use nll, dft"),
    ("config-duplicate-key", [*FLAGSHIP, "--config", "{tmp}/duplicate.yaml"], "qwen2_7b_adalora", "sets 'learning_rate' twice (on lines 1 and 3)", "keep one"),
    ("config-duplicate-key-json", [*FLAGSHIP, "--config", "{tmp}/duplicate.json"], "qwen2_7b_adalora", "sets 'r' twice (on lines 2 and 3)", "keep one"),
    ("window-beyond-positions", [*FLAGSHIP, "--max_seq_length", "4096"], "qwen2_7b_adalora", "--max_seq_length 4096 is beyond the 512 positions stories260k has", "pass --max_seq_length 512 or less"),
    # round 3 (settings): cases added here
    ("recipe-damaged-swap-journal", ["recipes/qwen2_7b_qlora.py", "--model", "stories260k", "--output_dir", "{tmp}/damaged-journal"], "qwen2_7b_qlora", "damaged-journal/.finishing.json is damaged", "then delete that file"),
    ("infer-half-swapped-run", ["-m", "harness.infer", "--adapter", "{tmp}/half-swapped", "--prompt", "hi"], "infer", "was left half-way through moving in a finished run's files", "rerun that run's command to complete it"),
    # round 3 (lifecycle): cases added here
    ("infer-temperature-nan", ["-m", "harness.infer", "--base", "stories260k", "--prompt", "hi", "--temperature", "nan"], "infer", "--temperature must be a finite number >= 0", "got nan"),
    ("infer-adapter-a-file", ["-m", "harness.infer", "--adapter", "{tmp}/a-file", "--prompt", "hi"], "infer", "adapter folder {tmp}/a-file is a file, not a folder", "pass --adapter"),
    ("infer-base-a-file", ["-m", "harness.infer", "--base", "{tmp}/a-file", "--prompt", "hi"], "infer", "model folder {tmp}/a-file is a file, not a folder", "pass the folder that holds config.json"),
    ("infer-adapter-wrong-base", ["-m", "harness.infer", "--adapter", "{tmp}/adapter", "--base", "tiny-qwen2", "--prompt", "hi"], "infer", "does not fit base model tiny-qwen2", "pass the --base it was trained on"),
    ("infer-remote-code", ["-m", "harness.infer", "--base", "{tmp}/remote-code-model", "--prompt", "hi"], "infer", "needs code shipped with it to load", "pass --trust_remote_code"),
    ("recipe-remote-code", [*LORA, "--model", "{tmp}/remote-code-model"], "qwen2_5_0_5b_lora", "needs code shipped with it to load", "pass --trust_remote_code"),
    ("merge-out-a-file", ["-m", "harness.merge", "--adapter", "{tmp}/adapter", "--out", "{tmp}/a-file"], "merge", "--out {tmp}/a-file is a file, not a folder", "pass a new folder"),
    ("merge-out-unwritable", ["-m", "harness.merge", "--adapter", "{tmp}/adapter", "--out", "/sys/ft-cookbook-merged"], "merge", "cannot be written", "pass a folder you can write to"),
    ("merge-out-inside-a-run", ["-m", "harness.merge", "--adapter", "{tmp}/adapter", "--out", "{tmp}/other-recipe/merged"], "merge", "is inside the run folder {tmp}/other-recipe", "pass a folder outside it"),
    # round 3 (tools-infer-merge): cases added here
    ("bench-ray-resources-garbage", [*BENCH, "--executor", "ray", "--ray-resources", "garbage"], "bench", "--ray-resources 'garbage'", "write NAME=AMOUNT"),
    ("bench-not-a-recipe", [*BENCH, "--recipes", "{tmp}/not_a_recipe.py"], "bench", "is not a recipe of this project", "pass a recipe from recipes/"),
    ("plan-not-a-recipe", ["-m", "harness.plan", "{tmp}/not_a_recipe.py"], "plan", "is not a recipe of this project", "pass a recipe from recipes/"),
    ("plan-impossible-sizes", ["-m", "harness.plan", "--model", "{tmp}/zero-hidden-model"], "plan", "hidden_size is 0", "fix its config.json"),
    ("plan-heads-do-not-divide", ["-m", "harness.plan", "--model", "{tmp}/odd-heads-model"], "plan", "not a multiple of the number of attention heads", "fix its config.json"),
    ("plan-remote-code", ["-m", "harness.plan", "--model", "{tmp}/remote-code-model"], "plan", "needs code shipped with it to be built", "unless you pass --trust_remote_code"),
    # round 3 (tools-bench-plan-report): cases added here
    ("eval-file-is-train-file", [*LORA, "--data_file", "{tmp}/alpaca_rows.json", "--eval_file", "{tmp}/alpaca_rows.json"], "qwen2_5_0_5b_lora", "--eval_file {tmp}/alpaca_rows.json is the training file", "pass --eval_file with rows the run does not train on"),
    ("eval-file-all-trained", [*LORA, "--data_file", "{tmp}/alpaca_rows.json", "--eval_file", "{tmp}/alpaca_some.jsonl"], "qwen2_5_0_5b_lora", "all 2 rows of --eval_file", "are also training rows"),
    ("dpo-same-answers", [*DPO, "--data_file", "{tmp}/same_answers.jsonl"], "qwen2_5_0_5b_dpo", "all 3 pairs have the same chosen and rejected answer", "give each pair a rejected answer that differs"),
    ("sft-assistant-no-content", [*LORA, "--data_file", "{tmp}/no_content.jsonl"], "qwen2_5_0_5b_lora", "row 2, message 2: the assistant's answer is missing (no \"content\" field)", "give it the answer or delete the row"),
    ("sft-sharegpt-null-answer", [*LORA, "--data_file", "{tmp}/null_value.json"], "qwen2_5_0_5b_lora", "row 1, turn 2: the assistant's answer is missing (\"value\" is null)", "give it the answer or delete the row"),
    # round 3 (data): cases added here
    ("plan-negative-price", ["-m", "harness.plan", "--model", "tiny-qwen2", "--usd_per_hour", "-1"], "plan", "argument --usd_per_hour: -1 is not a price", "pass zero or more US dollars per hour"),
    ("plan-nan-price", ["-m", "harness.plan", "--model", "tiny-qwen2", "--usd_per_hour", "nan"], "plan", "argument --usd_per_hour: nan is not a price", "pass zero or more US dollars per hour"),
    ("plan-price-not-a-number", ["-m", "harness.plan", "--model", "tiny-qwen2", "--usd_per_hour", "cheap"], "plan", "'cheap' is not a number", "pass the price per hour in US dollars"),
    # round 4 (plan time): cases added here
    ("time-vs-published-output-folder", ["-m", "harness.plan.time_vs_published", "--output", "{tmp}"], "time_vs_published", "--output {tmp} is a folder", "give a file name"),
    ("time-vs-published-output-no-folder", ["-m", "harness.plan.time_vs_published", "--output", "{tmp}/no-such-folder/time.md"], "time_vs_published", "folder {tmp}/no-such-folder does not exist", "make it first"),
    ("time-vs-published-output-exists", ["-m", "harness.plan.time_vs_published", "--output", "{tmp}/broken.yaml"], "time_vs_published", "--output {tmp}/broken.yaml exists", "pass --overwrite to replace it"),
    # round 4 (published time): cases added here
    ("calibrate-no-steps-value", ["-m", "harness.plan.calibrate", "--no_steps=yes", "--output", "{tmp}/never"], "calibrate", "argument --no_steps: ignored explicit argument 'yes'", "(see --help)"),
    # round 4 (calibration grid): cases added here
    ("time-check-result-not-a-run", ["-m", "harness.plan.time_check", "--result", "{tmp}/wrong_type.json"], "time_check", "not a run's result.json", "give the result.json a recipe wrote"),
    ("time-check-output-exists", ["-m", "harness.plan.time_check", "--output", "{tmp}/wrong_type.json"], "time_check", "--output {tmp}/wrong_type.json exists", "pass --overwrite to replace it"),
    ("report-calibrations-missing", ["-m", "harness.report", "--results-dir", "{tmp}/foreign-results", "--calibrations", "{tmp}/nowhere"], "report", "--calibrations {tmp}/nowhere: no such folder", "calibration-<device>.json files"),
    # round 4 (bench predicted): cases added here
    ("time-check-packing-not-packing", ["-m", "harness.plan.time_check", "--packing", "{tmp}/wrong_type.json"], "time_check", "--packing {tmp}/wrong_type.json: not a packing_timing JSON", "give the .json that harness.bench.packing_timing wrote"),
    ("time-check-packing-missing", ["-m", "harness.plan.time_check", "--packing", "{tmp}/no-such-packing.json"], "time_check", "--packing {tmp}/no-such-packing.json: no such file", "give the .json that harness.bench.packing_timing wrote"),
    # round 5 (real lengths): cases added here
]


def _files(tmp: Path) -> None:
    """The bad inputs the cases point at."""
    (tmp / "broken.jsonl").write_text('{"text": "a", "label": "positive"}\n{"text": "b", "label": "negative"}\n'
                                      '{"text": "c", "label": "pos\n')
    (tmp / "columns.csv").write_text("review,sentiment\nnice,positive\n")
    (tmp / "neutral.csv").write_text("text,label\nnice,positive\nmeh,neutral\n")
    (tmp / "empty_text.csv").write_text("text,label\n,positive\n  ,negative\n")
    (tmp / "data.parquet").write_bytes(b"\xff\xfe garbage")
    (tmp / "data.xlsx").write_bytes(b"PK garbage")
    answer = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    (tmp / "mixed_sft.jsonl").write_text(json.dumps(answer) + "\n" + json.dumps({"text": "just text"}) + "\n")
    (tmp / "no_answer.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    (tmp / "broken.yaml").write_text("learning_rate: [1e-4\n")
    (tmp / "unknown.yaml").write_text("learning_rat: 1e-4\n")
    (tmp / "a-file").write_text("x")
    (tmp / "foreign").mkdir()
    (tmp / "foreign" / "notes.txt").write_text("mine")
    (tmp / "other-recipe").mkdir()
    (tmp / "other-recipe" / "recipe_run.json").write_text(json.dumps({"recipe": "qwen2_7b_qlora"}))
    (tmp / "damaged").mkdir()
    (tmp / "damaged" / "recipe_run.json").write_text("{not json")
    (tmp / "damaged" / "checkpoint-8").mkdir()
    (tmp / "wrong_type.yaml").write_text("labels: [positive, negative]\n")  # a YAML list, not "a,b"
    (tmp / "wrong_type.json").write_text("[1, 2]")
    import torch
    from safetensors.torch import save_file

    config = {"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"], "base_model_name_or_path": "stories260k"}
    for name, weights in (("adapter", {"base_model.model.layers.0.q_proj.lora_A.weight": torch.zeros(4, 64)}),
                          ("damaged-adapter", None)):
        (tmp / name).mkdir()
        (tmp / name / "adapter_config.json").write_text(json.dumps(config))
        if weights is None:
            (tmp / name / "adapter_model.safetensors").write_bytes(b"cut short")
        else:
            save_file(weights, str(tmp / name / "adapter_model.safetensors"))
    (tmp / "foreign-results").mkdir()
    (tmp / "foreign-results" / "runs.jsonl").write_text('{"note": "added by hand"}\n')
    (tmp / "empty-results").mkdir()
    (tmp / "empty-results" / "runs.jsonl").write_text("")
    (tmp / "selection").mkdir()
    (tmp / "selection" / "selected.json").write_text("[]")
    pair = {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."}
    chat = {"conversations": [{"from": "human", "value": "Say hi."}], "chosen": {"from": "gpt", "value": "Hi!"},
            "rejected": {"from": "gpt", "value": "No."}}
    (tmp / "no_rejected.json").write_text(json.dumps([pair, {"prompt": "x", "chosen": "y"}]))
    (tmp / "empty_side.jsonl").write_text(json.dumps({**pair, "chosen": "  "}) + "\n")
    (tmp / "tool_turn.json").write_text(json.dumps([{**chat, "conversations": [
        {"from": "human", "value": "Weather?"}, {"from": "function_call", "value": "{}"}]}]))
    (tmp / "mixed_pairs.jsonl").write_text(json.dumps(pair) + "\n" + json.dumps(chat) + "\n")
    (tmp / "gsm8k_bad.jsonl").write_text(json.dumps({"question": "1+1?", "answer": "1+1=2\n#### 2"}) + "\n"
                                         + json.dumps({"question": "2+2?", "answer": "It is four."}) + "\n")
    (tmp / "nan.yaml").write_text("learning_rate: .nan\n")
    (tmp / "loss_type.yaml").write_text("loss_type: nlll\n")
    (tmp / "duplicate.yaml").write_text("learning_rate: 1e-4\nr: 4\nlearning_rate: 2e-4\n")
    (tmp / "duplicate.json").write_text('{\n  "r": 4,\n  "r": 8\n}\n')
    # round 3 (settings): files added here
    # a run folder whose swap journal is not one this project wrote; one caught half-way through a swap
    (tmp / "damaged-journal").mkdir()
    (tmp / "damaged-journal" / "recipe_run.json").write_text(json.dumps({"recipe": "qwen2_7b_qlora"}))
    (tmp / "damaged-journal" / ".finishing.json").write_text('{"staged": ["adapter_model.safetensors"]')
    (tmp / "half-swapped").mkdir()
    (tmp / "half-swapped" / ".finishing.json").write_text(json.dumps({"staging": ".staging-1", "record": {}}))
    # round 3 (lifecycle): files added here
    # a model folder whose config.json maps its classes to code in its own files (which would leave a mark if run)
    (tmp / "remote-code-model").mkdir()
    (tmp / "remote-code-model" / "config.json").write_text(json.dumps({"model_type": "custom-thing", "auto_map": {
        "AutoConfig": "configuration_custom.CustomConfig", "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}}))
    for module in ("configuration_custom.py", "modeling_custom.py"):
        (tmp / "remote-code-model" / module).write_text("import pathlib; pathlib.Path(__file__).with_suffix('.ran').touch()\n")
    # round 3 (tools-infer-merge): files added here
    # a .py file that is no recipe: running it to look for DEFAULTS would leave recipe-ran behind
    (tmp / "not_a_recipe.py").write_text("import pathlib\npathlib.Path(__file__).with_name('recipe-ran').touch()\n")
    llama = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=100, max_position_embeddings=128)
    for name, config in (("zero-hidden-model", {**llama, "hidden_size": 0}),
                         ("odd-heads-model", {**llama, "num_attention_heads": 5, "num_key_value_heads": 5})):
        (tmp / name).mkdir()
        (tmp / name / "config.json").write_text(json.dumps(config))
    # round 3 (tools-bench-plan-report): files added here
    alpaca_rows = [{"instruction": f"Name a colour ({k}).", "output": "Blue."} for k in range(6)]
    (tmp / "alpaca_rows.json").write_text(json.dumps(alpaca_rows))
    # the same rows as JSON lines, with other whitespace and an extra id field: still training rows
    (tmp / "alpaca_some.jsonl").write_text("".join(json.dumps({"id": k, **row, "output": " Blue. "}) + "\n"
                                                   for k, row in enumerate(alpaca_rows[:2])))
    (tmp / "same_answers.jsonl").write_text("".join(json.dumps({**pair, "rejected": "Hi!", "prompt": f"Say hi ({k})."})
                                                    + "\n" for k in range(3)))
    (tmp / "no_content.jsonl").write_text(json.dumps(answer) + "\n" + json.dumps(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}) + "\n")
    (tmp / "null_value.json").write_text(json.dumps([{"system": "Be brief.", "conversations": [
        {"from": "human", "value": "hi"}, {"from": "gpt", "value": None}]}]))
    # round 3 (data): files added here
    # round 4 (plan time): files added here
    # round 4 (published time): files added here
    # round 4 (calibration grid): files added here
    # round 4 (bench predicted): files added here


# One case per entry point, run as a fresh process with the warning path forced on.
FRESH = ("missing-data-file", "init-adapter-other-rank", "judge-unreachable", "loftq-without-gpu", "bench-refused-trial",
         "report-empty-runs", "infer-missing-adapter", "merge-negative-rtol", "select-unknown-flag", "summary-missing-record")
ALL_FRESH = os.environ.get("FT_COOKBOOK_BATTERY") == "fresh"


def _argv(case: tuple, tmp: Path) -> list[str]:
    argv = [part.format(tmp=tmp, case=case[0]) for part in case[1]]
    return [str(REPO_ROOT / argv[0]), *argv[1:]] if argv[0].endswith(".py") else argv


def _cwd(argv: list[str], tmp: Path) -> Path:
    return REPO_ROOT if argv[0] == "-m" else tmp  # recipes from anywhere; tools from the repository


def _fresh_process(case: tuple, tmp: Path) -> dict:
    argv = _argv(case, tmp)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(FORCE_AVX512BF16), "OMP_NUM_THREADS": "1"}
    env.pop("OPENAI_API_KEY", None)
    started = time.monotonic()
    result = subprocess.run([sys.executable, *argv], cwd=_cwd(argv, tmp), env=env, capture_output=True, text=True,
                            timeout=600)
    return {"code": result.returncode, "stderr": result.stderr, "seconds": time.monotonic() - started}


def _in_this_process(case: tuple, tmp: Path, capfd, monkeypatch) -> dict:
    argv = _argv(case, tmp)
    monkeypatch.chdir(_cwd(argv, tmp))
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    capfd.readouterr()
    started = time.monotonic()
    with pytest.raises(SystemExit) as stop, warnings.catch_warnings():
        # runpy warns that harness.<tool> is imported already (this process imported it): harmless here
        warnings.filterwarnings("ignore", message=".*found in sys.modules after import of package", category=RuntimeWarning)
        if argv[0] == "-m":
            monkeypatch.setattr(sys, "argv", [argv[1], *argv[2:]])
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            monkeypatch.setattr(sys, "argv", argv)
            runpy.run_path(argv[0], run_name="__main__")
    return {"code": stop.value.code, "stderr": capfd.readouterr().err, "seconds": time.monotonic() - started}


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad-input")
    _files(tmp)
    return tmp


@pytest.fixture(scope="module")
def fresh(bad_files):
    """The fresh-process cases, run once, two at a time (their time is nearly all imports)."""
    cases = [c for c in CASES if ALL_FRESH or c[0] in FRESH]
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        return dict(zip([c[0] for c in cases], pool.map(lambda c: _fresh_process(c, bad_files), cases)))


def _check(case: tuple, outcome: dict, tmp: Path) -> None:
    name, _, program, problem, fix = case
    lines = outcome["stderr"].splitlines()
    assert outcome["code"] == 2, outcome["stderr"][-2000:]
    assert len(lines) == 1, outcome["stderr"][-2000:]  # nothing from a library before it, nothing after
    line = lines[0]
    assert line.startswith(f"{program}: ")
    assert problem.format(tmp=tmp) in line and fix.format(tmp=tmp) in line, line
    assert "Traceback" not in outcome["stderr"] and "None" not in line


def test_the_battery_is_broad():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)
    programs = {c[2] for c in CASES}
    assert {"bench", "report", "infer", "merge", "harness.select", "summary", "llama2_7b_lora_alpaca100"} <= programs


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_one_line_naming_the_problem_and_the_fix(case, bad_files, capfd, monkeypatch):
    if ALL_FRESH:
        pytest.skip("FT_COOKBOOK_BATTERY=fresh: every case runs as a fresh process instead")
    _check(case, _in_this_process(case, bad_files, capfd, monkeypatch), bad_files)


@pytest.mark.parametrize("case", [c for c in CASES if ALL_FRESH or c[0] in FRESH],
                         ids=[c[0] for c in CASES if ALL_FRESH or c[0] in FRESH])
def test_as_a_fresh_process_with_the_avx512bf16_warning_path_forced(case, fresh, bad_files):
    _check(case, fresh[case[0]], bad_files)


def _tree(folder: Path) -> dict[str, str]:
    """Every path under folder, with its bytes' sha256 (a folder: "/")."""
    import hashlib

    return {str(p.relative_to(folder)): "/" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))}


def test_nothing_was_written_where_a_case_was_refused(bad_files, fresh, tmp_path, capfd, monkeypatch):
    """Whatever ran before this test, or did not: every case is refused here into a folder of its own, which must
    then hold exactly the bad inputs, byte for byte (no output folder, lock, journal or half-written file left);
    `fresh` has run its cases (every case under FT_COOKBOOK_BATTERY=fresh) into the shared folder, checked too."""
    if not ALL_FRESH:
        _files(tmp_path)
        before = _tree(tmp_path)
        for case in CASES:
            _in_this_process(case, tmp_path, capfd, monkeypatch)
        after = _tree(tmp_path)
        changed = sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
        assert not changed, f"refused cases wrote, changed or removed: {', '.join(changed)}"
    tmp = bad_files
    assert [p.name for p in (tmp / "foreign").iterdir()] == ["notes.txt"]
    assert (tmp / "a-file").read_text() == "x"
    assert sorted(p.name for p in (tmp / "damaged").iterdir()) == ["checkpoint-8", "recipe_run.json"]
    assert (tmp / "selection" / "selected.json").read_text() == "[]"
    assert not list(tmp.glob("out-*")), "a refused recipe left an output folder behind"
    assert not (tmp / "merged").exists()


def test_the_unreachable_judge_is_refused_in_seconds_before_training(fresh, bad_files):
    assert fresh["judge-unreachable"]["seconds"] < 120  # imports included; training would take hours
    assert not (bad_files / "out-judge-unreachable").exists()


def test_the_forced_warning_path_really_warns_without_the_fix(tmp_path):
    """The battery is only a test of the fix if its processes take bitsandbytes' noisy path: without
    harness imported first, the forced import prints the line the fix drops."""
    env = {**os.environ, "PYTHONPATH": str(FORCE_AVX512BF16)}
    probe = "import bitsandbytes.functional as f; print(f.has_avx512bf16())"
    bare = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    assert bare.stdout.strip() == "True"
    if "Failed to load CPU gemm_4bit_forward" not in bare.stderr:
        pytest.skip("the `kernels` package is installed here: bitsandbytes has nothing to warn about")
    fixed = subprocess.run([sys.executable, "-c", f"import harness; {probe}"], env=env, cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=300)
    assert fixed.stdout.strip() == "True" and fixed.stderr == ""
