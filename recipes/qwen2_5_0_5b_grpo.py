"""GRPO with LoRA on Qwen2.5-0.5B-Instruct: grade-school math (GSM8K) rewarded by checking the answer.

Group Relative Policy Optimization (TRL's GRPOTrainer) samples a group of answers to each problem, scores
each with the reward functions below, and pushes the model towards the answers that beat their group's
average. No reward model and no value model: the rewards are plain Python.

What it does
  - Qwen/Qwen2.5-0.5B-Instruct in bf16 (fp16 on T4/V100), LoRA r 64 (alpha 64) on every linear layer.
  - Data: data/gsm8k_train.jsonl (7473 problems) to train, data/gsm8k_test.jsonl to score (the standard
    split, MIT). The system prompt asks for the answer on a last line `#### <number>`, GSM8K's own mark.
  - Rewards (below): correctness 1 when the final number equals the reference, format 1 when the answer is
    marked where the parser looks; weighted 1 and 0.5.
  - GRPO settings from Unsloth's Qwen2.5 GRPO notebook: 8 completions per problem, 200 completion tokens,
    lr 5e-6, AdamW betas 0.9/0.99, weight decay 0.1, cosine with 10% warm-up, grad-norm clip 0.1,
    250 steps; no KL term (beta 0, TRL's default).
  - Scored at the end: greedy accuracy on 200 held-out test problems untrained and trained (flexible and
    strict, as lm-evaluation-harness reads GSM8K), how often the answer is marked; mean reward per step in
    the log; how much of the training time was generation.

Trade-offs
  - Generation dominates: every step writes 8 x 200 tokens one token at a time (no vLLM here).
  - A 0.5B model solves few GSM8K problems; the format reward is what moves first.
  - --num_generations must divide --per_device_train_batch_size x --gradient_accumulation_steps.

Run it
  python recipes/qwen2_5_0_5b_grpo.py                                                  # GPU + Hub
  python recipes/qwen2_5_0_5b_grpo.py --model tiny-qwen2 --max_steps 2 --max_completion_length 16 \
      --eval_max_samples 4                                                             # offline, seconds
  python recipes/qwen2_5_0_5b_grpo.py --num_generations 4 --per_device_train_batch_size 8  # 2 problems a step
"""

from harness.data.gsm8k import final_answer, marked_answer
from harness.run.flow import run_recipe
from harness.run.presets import QWEN2_5_0_5B_INSTRUCT


def completion_text(completion) -> str:
    """A completion as TRL passes it: text, or the assistant message of a conversation."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


def correctness(completions, answer, **kwargs) -> list[float]:
    """1.0 when the completion's final number (after `####`, or else the last one it writes) is the reference."""
    return [1.0 if final_answer(completion_text(c)) == ref else 0.0 for c, ref in zip(completions, answer)]


def answer_format(completions, **kwargs) -> list[float]:
    """1.0 when the completion gives a number after `####`, where the prompt asks for it."""
    return [1.0 if marked_answer(completion_text(c)) is not None else 0.0 for c in completions]


REWARD_FUNCS = (correctness, answer_format)

DEFAULTS = dict(
    **QWEN2_5_0_5B_INSTRUCT,
    objective="grpo",  # TRL's GRPOTrainer; every GRPOConfig setting (--num_generations, --beta, ...) works
    task="math",
    data_file="data/gsm8k_train.jsonl",
    eval_file="data/gsm8k_test.jsonl",
    eval_max_samples=200,  # held-out problems scored greedily before and after training
    instruction="Solve the math problem step by step. End with a last line '#### <number>' giving the final answer.",
    max_seq_length=512,  # prompt + completion
    forgetting_file="",  # not measured for GRPO
    method="lora", target_modules="all-linear", r=64, lora_alpha=64, lora_dropout=0.0,
    num_generations=8,  # completions per problem: the group each is compared with
    max_completion_length=200,
    per_device_train_batch_size=8,  # completions: one problem's group per step
    gradient_accumulation_steps=1,
    reward_weights=[1.0, 0.5],  # correctness, answer_format
    learning_rate=5e-6,
    adam_beta1=0.9,
    adam_beta2=0.99,
    weight_decay=0.1,
    lr_scheduler_type="cosine",
    warmup_steps=0.1,
    max_grad_norm=0.1,
    max_steps=250,
    logging_steps=1,  # the mean reward of every step, in result.json's log_history
    eval_strategy="no",  # scored by greedy answers before and after training, not by the Trainer's evaluation
    load_best_model_at_end=False,
    activation_checkpointing=False,  # True saves activation memory, ~30% slower steps
    save_steps=50,
    seed=42,
    output_dir="outputs/qwen2_5_0_5b_grpo",
)

if __name__ == "__main__":
    run_recipe("qwen2_5_0_5b_grpo", DEFAULTS, reward_funcs=REWARD_FUNCS)
