"""Evaluation beyond the loss: answer-token accuracy and the task's own score.

Classification is scored by label likelihood: for each held-out prompt the model's
log-probability of every candidate answer is computed and the most likely one is its
prediction. That needs no generation and no parsing, works for any model size, and
measures exactly what training optimises.
"""
from __future__ import annotations

import contextlib
import inspect
import math
from typing import Any, NamedTuple

import numpy as np
import torch

from harness.data.examples import IGNORE_INDEX, Example, answer_ids
from harness.evaluation.progress import bar


def keep_argmax(logits, labels):
    """Trainer hook: keep only predicted ids (a 7B vocab's logits would not fit in memory)."""
    if isinstance(logits, tuple):
        logits = logits[0]
    # Prompt-learning methods prepend virtual tokens to the logits; align with the labels' end.
    return logits[:, -labels.shape[1]:].argmax(dim=-1)


def answer_token_accuracy(eval_prediction) -> dict[str, float]:
    """Next-token accuracy on answer tokens only: prediction at t is compared with the label at t+1."""
    preds, labels = eval_prediction.predictions, eval_prediction.label_ids
    preds, labels = np.asarray(preds)[:, :-1], np.asarray(labels)[:, 1:]
    mask = labels != IGNORE_INDEX
    if not mask.any():
        return {}
    return {"answer_token_accuracy": float((preds[mask] == labels[mask]).mean())}


def right_padded(sequences: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of token lists padded on the right to the longest."""
    width = max(map(len, sequences))
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention[row, : len(seq)] = 1
    return ids, attention


@contextlib.contextmanager
def evaluating(model):
    """The model in eval mode (no dropout) for the block, then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class CandidateScore(NamedTuple):
    """How well a model predicts a candidate answer after a prompt."""
    logprob: float  # sum of log p(token | everything before it) over the candidate's tokens
    argmax_hits: int  # how many of those tokens were the model's most likely next token


def _scored(logprobs: torch.Tensor, tokens: list[int]) -> CandidateScore:
    """Score of `tokens` from log-softmax rows of shape (len(tokens), vocab), row i predicting tokens[i]."""
    targets = torch.tensor(tokens, device=logprobs.device)
    return CandidateScore(float(logprobs.gather(1, targets[:, None]).sum()),
                          int((logprobs.argmax(dim=-1) == targets).sum()))


@torch.no_grad()
def candidate_scores(model, tokenizer, prompts: list[list[int]], candidates: list[list[int]],
                     batch_size: int, progress=None) -> list[CandidateScore]:
    """The score of each (prompt, candidate) pair, each pair run as one sequence."""
    device = next(p for p in model.parameters()).device
    scores: list[CandidateScore] = []
    pad = tokenizer.pad_token_id
    for start in range(0, len(prompts), batch_size):
        batch = list(zip(prompts[start:start + batch_size], candidates[start:start + batch_size]))
        ids, attention = right_padded([p + c for p, c in batch], pad)
        width = ids.shape[1]
        logits = model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits
        logits = logits[:, -width:]  # drop virtual-token positions of prompt-learning methods
        for row, (p, c) in enumerate(batch):
            # Only the few positions that predict the candidate go through float32 log-softmax: a 7B
            # vocabulary over the whole batch would need gigabytes.
            predicting = logits[row, len(p) - 1: len(p) + len(c) - 1].float()
            scores.append(_scored(torch.log_softmax(predicting, dim=-1), c))
        if progress is not None:
            progress.update(len(batch))
    return scores


def _uses_virtual_tokens(model) -> bool:
    """Prompt/prefix/P-tuning models prepend learned tokens (or key/values) of their own."""
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


@torch.no_grad()
def shared_prompt_scores(model, prompts: list[list[int]], candidates: list[list[list[int]]],
                         batch_size: int = 8, progress=None) -> list[CandidateScore]:
    """The score of every candidate of every prompt, each prompt run once and its key/value cache reused
    for all its candidates: about half the work of candidate_scores for two labels, same numbers up to
    float rounding. Not for prompt-learning models (they own the cache).

    Prompts of the same length with the same candidates (most reviews are cut to the same length) run
    together in batches, with no padding, so no model has to honour padded positions; only the last
    prompt position goes through the output layer, where the model supports logits_to_keep."""
    device = next(p for p in model.parameters()).device
    last_only = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
    scores: list[list[CandidateScore | None]] = [[None] * len(options) for options in candidates]
    groups: dict[tuple, list[int]] = {}
    for index, (prompt, options) in enumerate(zip(prompts, candidates)):
        groups.setdefault((len(prompt), tuple(map(tuple, options))), []).append(index)
    for (length, options), members in groups.items():
        k = len(options)
        option_ids, option_attention = right_padded([list(o) for o in options], 0)  # shorter ones padded right
        for start in range(0, len(members), batch_size):
            chunk = members[start:start + batch_size]
            out = model(input_ids=torch.tensor([prompts[i] for i in chunk], device=device), use_cache=True, **last_only)
            first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # predicts every candidate's first token
            cache = out.past_key_values
            cache.batch_repeat_interleave(k)  # row r * k + j: prompt r followed by candidate j
            attention = torch.cat([torch.ones((len(chunk) * k, length), dtype=torch.long),
                                   option_attention.repeat(len(chunk), 1)], dim=1)
            rest = model(input_ids=option_ids.repeat(len(chunk), 1).to(device), attention_mask=attention.to(device),
                         past_key_values=cache).logits
            for r, index in enumerate(chunk):
                for j, option in enumerate(options):
                    later = torch.log_softmax(rest[r * k + j, : len(option) - 1].float(), dim=-1)
                    scores[index][j] = _scored(torch.cat([first[r:r + 1], later]), list(option))
            if progress is not None:
                progress.update(len(chunk))
    return [score for row in scores for score in row]


def _accepts_logits_to_keep(model) -> bool:
    """Whether the (PEFT-wrapped) model's forward can skip the output layer for all but the last positions."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


# Figures the Trainer's own evaluation loop would compute, when the scorer was given the answers.
ANSWER_METRICS = ("loss", "answer_token_accuracy")


class ClassificationScorer:
    """Accuracy and macro-F1 of label-likelihood predictions on held-out examples.

    Given `answers` (each example's answer tokens exactly as the eval set holds them, end-of-sequence
    included), it also reports the loss and answer-token accuracy of those tokens: the figures the
    Trainer's evaluation loop computes, from the same forward passes, so one pass over the eval set gives
    every evaluation figure instead of two. Its loss is the mean over all answer tokens; the Trainer's is
    the mean of per-batch means: the same number, up to float rounding, when every answer has as many
    tokens (as with labels of one token each), and one that does not depend on the batch size otherwise.

    Built once (candidate answers are tokenized up front), called at every evaluation."""

    def __init__(self, tokenizer, examples: list[Example], prompts: list[list[int]], labels: list[str],
                 batch_size: int = 4, answers: list[list[int]] | None = None):
        self.tokenizer, self.labels, self.batch_size = tokenizer, labels, batch_size
        self.gold = np.array([example.label for example in examples])
        self.answers = answers
        self.prompts = list(prompts)
        # Each prompt's options: the candidates' tokens as they follow this prompt (the seam is the prompt's
        # tail, the same whether or not the text inside the prompt was cut to fit), then its answer if given.
        self.options = [[answer_ids(tokenizer, example.prompt, candidate) for candidate in example.meta["candidates"]]
                        + ([answers[i]] if answers is not None else []) for i, example in enumerate(examples)]

    @property
    def scores_answers(self) -> bool:
        return self.answers is not None

    def __call__(self, model) -> dict[str, Any]:
        if not len(self.gold):
            return {}
        with evaluating(model):
            if _uses_virtual_tokens(model):
                pairs = [(p, o) for p, options in zip(self.prompts, self.options) for o in options]
                with bar(len(pairs), "Scoring held-out labels", unit="candidate") as progress:
                    flat = candidate_scores(model, self.tokenizer, [p for p, _ in pairs], [o for _, o in pairs],
                                            self.batch_size, progress)
            else:
                with bar(len(self.prompts), "Scoring held-out labels") as progress:
                    flat = shared_prompt_scores(model, self.prompts, self.options, self.batch_size, progress)
        width, k = len(self.options[0]), len(self.labels)
        rows = [flat[i:i + width] for i in range(0, len(flat), width)]
        predicted = np.array([[score.logprob for score in row[:k]] for row in rows]).argmax(axis=1)
        accuracy = float((predicted == self.gold).mean())
        answer_metrics = {}
        if self.answers is not None:
            tokens = sum(map(len, self.answers))
            answer_metrics = {"loss": -sum(row[k].logprob for row in rows) / tokens,
                              "answer_token_accuracy": sum(row[k].argmax_hits for row in rows) / tokens}
        return {
            **answer_metrics,
            "accuracy": accuracy,
            # How far this accuracy could move by the luck of which reviews were held out: compare two
            # runs' accuracies only when they differ by more than about two standard errors.
            "accuracy_se": round(accuracy_standard_error(accuracy, len(self.gold)), 6),
            "accuracy_ci95": [round(x, 6) for x in wilson_interval(accuracy, len(self.gold))],
            "macro_f1": macro_f1(self.gold, predicted, len(self.labels)),
            "predicted_distribution": {label: int((predicted == i).sum()) for i, label in enumerate(self.labels)},
            "gold_distribution": {label: int((self.gold == i).sum()) for i, label in enumerate(self.labels)},
            "examples": int(len(self.gold)),
        }


def accuracy_standard_error(accuracy: float, n: int) -> float:
    """Binomial standard error of an accuracy measured on n independent examples."""
    return math.sqrt(accuracy * (1 - accuracy) / n) if n else float("nan")


def wilson_interval(accuracy: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of an accuracy on n examples (sound near 0 and 1, unlike p +- 2 SE)."""
    if not n:
        return (float("nan"), float("nan"))
    centre = (accuracy + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def macro_f1(gold: np.ndarray, predicted: np.ndarray, n_classes: int) -> float:
    """Unweighted mean of per-class F1 (a class never predicted nor present scores 0, as in sklearn)."""
    f1s = []
    for k in range(n_classes):
        tp = int(((predicted == k) & (gold == k)).sum())
        fp = int(((predicted == k) & (gold != k)).sum())
        fn = int(((predicted != k) & (gold == k)).sum())
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return float(np.mean(f1s))


# ---------------------------------------------------------------------------- forgetting

class ForgettingProbe:
    """What fine-tuning costs the model elsewhere: its mean per-token loss on general text the run never
    trains on (Alpaca responses by default), measured on the loaded base model before training and on
    the trained one after. PEFT's method comparison reports the same kind of figure.

    Texts are the responses of the last ``samples`` records of ``path`` (file order, from the end) whose
    text is not in ``seen`` (every training row's fields), each cut to ``max_tokens``."""

    def __init__(self, tokenizer, path: str, rows: list[dict], samples: int, max_tokens: int, seen: set[str],
                 batch_size: int = 4):
        self.path, self.batch_size = path, batch_size
        texts, skipped = [], 0
        for row in reversed(rows):
            text = str(row.get("output") or "").strip()
            if not text:
                continue
            if text in seen or str(row.get("instruction") or "").strip() in seen:
                skipped += 1
                continue
            texts.append(text)
            if len(texts) == samples:
                break
        self.texts_skipped_as_trained_on = skipped
        self.ids = [tokenizer(t, add_special_tokens=True, truncation=True, max_length=max_tokens,
                              verbose=False)["input_ids"] for t in texts]
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.before: float | None = None

    @torch.no_grad()
    def loss(self, model) -> float:
        """Mean next-token loss over every token of the texts (token-weighted)."""
        device = next(p for p in model.parameters()).device
        total, count = 0.0, 0
        with evaluating(model), bar(len(self.ids), "Forgetting probe", unit="text") as progress:
            for start in range(0, len(self.ids), self.batch_size):
                ids, attention = right_padded(self.ids[start:start + self.batch_size], self.pad)
                logits = model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits
                logits = logits[:, -ids.shape[1]:].float()  # drop virtual-token positions of prompt-learning methods
                nll = torch.nn.functional.cross_entropy(
                    logits[:, :-1].transpose(1, 2), ids[:, 1:].to(device), reduction="none")
                mask = attention[:, 1:].to(device).bool()
                total += float(nll[mask].sum())
                count += int(mask.sum())
                progress.update(len(ids))
        return total / count if count else float("nan")

    def measure_before(self, model) -> None:
        self.before = self.loss(model)

    def report(self, model, trained: bool = True) -> dict[str, Any]:
        """Before and after; an untrained model (method none) is not measured again: its loss is unchanged."""
        after = self.loss(model) if trained or self.before is None else self.before
        return {
            "file": self.path,
            "texts": len(self.ids),
            "tokens": sum(len(s) - 1 for s in self.ids),
            "texts_skipped_as_trained_on": self.texts_skipped_as_trained_on,
            "loss_before": round(self.before, 6) if self.before is not None else None,
            "loss_after": round(after, 6),
            # > 0: the model got worse at general text (forgot); < 0: it got better at it.
            "delta": round(after - self.before, 6) if self.before is not None else None,
        }
