"""GRPO with TRL's GRPOTrainer on GSM8K, in the recipe flow (harness.run.flow.train).

The recipe brings its reward functions (TRL's signature: completions and the dataset's columns, here the
reference `answer`, in; one float per completion out). The run scores greedy answers to held-out problems
before and after training (accuracy read flexibly and strictly, as lm-evaluation-harness does, and how often
the answer is where the prompt asks for it) and times how much of each step is generation.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from trl import GRPOConfig, GRPOTrainer

from harness.data import gsm8k
from harness.errors import UserError
from harness.evaluation.generation import generate
from harness.models.loading import print_parameter_counts
from harness.objectives import trl_run
from harness.objectives.protocol import Objective
from harness.reporting.tables import noise_verdict
from harness.run.checks import Bounds, documented_values
from harness.run.distributed import launched_processes
from harness.run.record import run_record
from harness.run.training import run_callbacks, save_final, shard_adapters_apart, train_from, wait_for_gpu


@dataclass
class GRPOSettings(GRPOConfig):
    """TRL's GRPOConfig, refusing a group size that does not divide the batch in words a user can act on
    before TRL's own check does. Its trust_remote_code is the model's (--trust_remote_code, one flag for both)."""

    trust_remote_code: bool = field(default=False, init=False)

    # Checked before any model loads (harness.run.checks.check_trl_settings): GRPOTrainer reads these only while
    # generating or computing the loss, or never refuses them.
    SETTING_VALUES: ClassVar[dict] = {"loss_type": documented_values(GRPOConfig, "loss_type")}
    SETTING_BOUNDS: ClassVar[dict] = {
        "max_completion_length": Bounds(1, why="the tokens each completion may have"),
        "temperature": Bounds(0, low_open=True, why="completions are sampled at this temperature"),
        "top_p": Bounds(0, 1, low_open=True),
        "top_k": Bounds(0, why="0 turns top-k filtering off"),
        "min_p": Bounds(0, 1, optional=True),
        "repetition_penalty": Bounds(0, low_open=True),
        "beta": Bounds(0, why="the weight of the KL term: 0 (TRL's default) leaves it out; a negative one would "
                              "reward drifting from the model"),
        "epsilon": Bounds(0, low_open=True, why="the clipping range of the policy ratio"),
        "num_iterations": Bounds(1),
        "steps_per_generation": Bounds(1, optional=True),
        "generation_batch_size": Bounds(1, optional=True),
    }

    def __post_init__(self):
        if not isinstance(self.num_generations, int) or self.num_generations < 2:
            # TRL's own check comes after its modulo by num_generations (0: ZeroDivisionError)
            raise UserError(f"--num_generations {self.num_generations}: GRPO needs at least 2 generations per prompt, "
                            "scoring each against its group's; pass --num_generations 2 or more (see --help)")
        if self.generation_batch_size is not None and self.steps_per_generation is not None:
            # A copy (dataclasses.replace) of settings TRL already derived both of: derive them again.
            self.generation_batch_size = None

        steps = self.steps_per_generation or self.gradient_accumulation_steps
        processes = launched_processes()  # under accelerate launch the group may span the processes' batches
        batch = self.per_device_train_batch_size * steps * processes
        if self.generation_batch_size is None and self.num_generations >= 2 and batch % self.num_generations:
            fitting = self.num_generations * max(1, round(batch / self.num_generations))
            fitting = fitting // processes if fitting % processes == 0 else fitting  # per process
            across = f" x {processes} processes" if processes > 1 else ""
            raise UserError(
                f"--num_generations {self.num_generations} must divide the batch of completions, "
                f"--per_device_train_batch_size x --gradient_accumulation_steps{across} = {batch}: each prompt's group "
                f"of completions is scored together. Use e.g. --per_device_train_batch_size {fitting} "
                f"--gradient_accumulation_steps 1, or a --num_generations that divides {batch}"
            )
        super().__post_init__()


def preflight(cfg, output_dir: bool = True):
    work = trl_run.preflight(cfg, output_dir, "grpo")
    targs = cfg.train
    if targs.max_completion_length >= cfg.data.max_seq_length:
        raise UserError(
            f"--max_completion_length {targs.max_completion_length} leaves no room for the prompt in --max_seq_length "
            f"{cfg.data.max_seq_length} (prompt + completion): raise --max_seq_length or lower --max_completion_length"
        )
    if not work.eval_rows:
        raise UserError("GRPO is scored on held-out problems: pass --eval_file or set --validation_split above 0")
    # Scored by its own greedy pass at the end, not by the Trainer's evaluation; TRL counts the prompt and
    # completion tokens itself (the Trainer's own count finds no input_ids in a batch of prompts).
    targs = dataclasses.replace(targs, eval_strategy="no", load_best_model_at_end=False,
                                include_num_input_tokens_seen="no")
    return dataclasses.replace(work, targs=targs)


def _names(cfg) -> list[str]:
    return [getattr(f, "__name__", type(f).__name__) for f in cfg.reward_funcs]


@dataclass
class _Prepared:
    train: Any  # datasets.Dataset: prompt, answer
    eval_prompts: list[str]  # rendered for generate()
    eval_answers: list[str]
    stats: dict[str, Any]


def prepare(cfg, work, tokenizer) -> _Prepared:
    """Prompts as conversations (system: --instruction; user: the problem) when the tokenizer has a chat
    template, else as text; a problem whose prompt leaves no room for --max_completion_length is left out
    (and counted), as TRL would otherwise cut its completions short."""
    from datasets import Dataset

    # Here rather than in preflight, which harness.bench runs without the recipe's functions.
    if not cfg.reward_funcs:
        raise UserError("GRPO needs reward functions: run a GRPO recipe (it passes its own to run_recipe)")
    weights = work.targs.reward_weights
    if weights is not None and len(weights) != len(cfg.reward_funcs):
        raise UserError(f"--reward_weights gives {len(weights)} weights for {len(cfg.reward_funcs)} reward "
                        f"functions ({', '.join(_names(cfg))}): one each")
    chat = bool(getattr(tokenizer, "chat_template", None))
    instruction = cfg.data.instruction

    def prompt_of(question: str):
        if chat:
            return [{"role": "system", "content": instruction}, {"role": "user", "content": question}]
        return f"{instruction}\n\nQuestion: {question}\nAnswer:"

    def rendered(prompt) -> str:
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) if chat else prompt

    room = cfg.data.max_seq_length - work.targs.max_completion_length

    def fitting(rows):
        """The rows whose prompt leaves --max_completion_length tokens in the window, and how many do not."""
        kept = [(row, prompt_of(row["question"])) for row in rows]
        kept = [(row, prompt) for row, prompt in kept
                if len(tokenizer(rendered(prompt), add_special_tokens=False, verbose=False)["input_ids"]) <= room]
        return kept, len(rows) - len(kept)

    train_kept, train_out = fitting(work.train_rows)
    limit = cfg.data.eval_max_samples or len(work.eval_rows)
    eval_kept, eval_out = fitting(work.eval_rows)
    eval_kept = eval_kept[:limit]
    if not train_kept or not eval_kept:
        raise UserError(f"no {'training' if not train_kept else 'held-out'} problem's prompt fits the {room} tokens "
                        f"--max_seq_length {cfg.data.max_seq_length} leaves beside --max_completion_length "
                        f"{work.targs.max_completion_length}: raise --max_seq_length or lower --max_completion_length")
    if train_out or eval_out:
        print(f"Data: left out {train_out} training and {eval_out} held-out problems whose prompt is longer than the "
              f"{room} tokens --max_seq_length leaves beside --max_completion_length")
    train = Dataset.from_list([{"prompt": prompt, "answer": row["answer"]} for row, prompt in train_kept])
    stats = {"train_problems": len(train_kept), "eval_problems": len(eval_kept), "prompt_layout": "chat_template" if chat else "text",
             "problems_left_out_prompt_too_long": {"train": train_out, "eval": eval_out}}
    eval_rows = [row for row, _ in eval_kept]
    eval_prompts = [rendered(prompt) for _, prompt in eval_kept]
    return _Prepared(train, eval_prompts, [row["answer"] for row in eval_rows], stats)


class TimedGRPOTrainer(GRPOTrainer):
    """GRPOTrainer that adds up the time its training steps spend generating completions."""

    generation_seconds = 0.0

    def _generate(self, prompts):
        wait_for_gpu()
        start = time.perf_counter()
        try:
            return super()._generate(prompts)
        finally:
            wait_for_gpu()
            if self.model.training:
                self.generation_seconds += time.perf_counter() - start


def train_and_evaluate(cfg, work, tokenizer, prepared: _Prepared, folder, memory) -> dict[str, Any]:
    targs = trl_run.training_settings(cfg, work.targs)
    model, peft = trl_run.policy_model(cfg, targs)
    clock, callbacks = run_callbacks(cfg, folder)
    trainer = TimedGRPOTrainer(model=model, reward_funcs=list(cfg.reward_funcs), args=targs,
                               train_dataset=prepared.train, processing_class=tokenizer, peft_config=peft,
                               callbacks=callbacks)
    shard_adapters_apart(trainer)
    counts = print_parameter_counts(trainer.model)
    before = score_problems(trainer.model, tokenizer, prepared, targs)  # the adapter is fresh: the untrained model
    print(f"Untrained: {_scores_text(before)}")
    outcome = train_from(trainer, folder)  # resumes folder.resume_from; nothing when it is at the last step
    after = score_problems(trainer.model, tokenizer, prepared, targs)
    print(held_out_line(before, after, trainer.state.global_step))
    save_final(trainer, tokenizer, folder.staging)
    rewards = [e["reward"] for e in trainer.state.log_history if "reward" in e]
    grpo = {
        "reward_functions": _names(cfg),
        "generation_seconds": round(trainer.generation_seconds, 3),
        # Of the pure training time (the train clock): the rest is the loss's forward and backward passes.
        "generation_share": round(trainer.generation_seconds / clock.seconds, 4) if clock.seconds > 0 else None,
        "mean_reward_first_logged": rewards[0] if rewards else None,
        "mean_reward_last_logged": rewards[-1] if rewards else None,
    }
    return run_record(cfg, trainer, clock, outcome, counts, folder, work, prepared.stats, planned_steps=None,
                      stopped_by=clock.stopped_by,
                      scores={"eval_loss": None, "eval": after, "before_training": before, "grpo": grpo})


def score_problems(model, tokenizer, prepared: _Prepared, targs) -> dict[str, Any]:
    """Greedy answers to the held-out problems, read flexibly (the marked or else the last number) and strictly
    (the number after `####`), and how often the answer is marked."""
    answers = generate(model, tokenizer, prepared.eval_prompts, None, targs.max_completion_length,
                       seed=targs.seed, batch_size=targs.per_device_eval_batch_size)
    n = len(answers)
    flexible = sum(gsm8k.final_answer(a) == ref for a, ref in zip(answers, prepared.eval_answers)) / n
    strict = sum(gsm8k.marked_answer(a) == ref for a, ref in zip(answers, prepared.eval_answers)) / n
    marked = sum(gsm8k.marked_answer(a) is not None for a in answers) / n
    return {
        "problems": n,
        "accuracy": round(flexible, 4), "accuracy_se": trl_run.proportion_se(flexible, n),
        "accuracy_strict": round(strict, 4), "accuracy_strict_se": trl_run.proportion_se(strict, n),
        "answer_marked": round(marked, 4), "answer_marked_se": trl_run.proportion_se(marked, n),
        "example_answer": answers[0][:500] if answers else None,
    }


def _scores_text(scores: dict[str, Any]) -> str:
    return (f"accuracy {scores['accuracy']:.3f} (strict {scores['accuracy_strict']:.3f}), answer marked "
            f"{scores['answer_marked']:.3f} on {scores['problems']} held-out problems")


def held_out_line(before: dict[str, Any], after: dict[str, Any], steps: int) -> str:
    parts = []
    for key, name in (("accuracy", "accuracy"), ("answer_marked", "answer marked with ####")):
        gain = after[key] - before[key]
        noise = noise_verdict(gain, after[f"{key}_se"], before[f"{key}_se"])
        parts.append(f"{name} {before[key]:.3f} untrained -> {after[key]:.3f} after {steps} steps ({gain:+.3f}, {noise})")
    return f"Held-out problems ({after['problems']}, greedy): " + "; ".join(parts)


GRPO = Objective(preflight, prepare, train_and_evaluate)
