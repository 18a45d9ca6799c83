"""Evaluation beyond the loss: answer-token accuracy and the task's own score.

Classification is scored by label likelihood: for each held-out prompt the model's
log-probability of every candidate answer is computed and the most likely one is its
prediction. That needs no generation and no parsing, works for any model size, and
measures exactly what training optimises.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from harness.data import IGNORE_INDEX, Example, answer_ids


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


@torch.no_grad()
def candidate_logprobs(model, tokenizer, prompts: list[list[int]], candidates: list[list[int]], batch_size: int) -> list[float]:
    """Sum of log p(candidate tokens | prompt) for each (prompt, candidate) pair."""
    device = next(p for p in model.parameters()).device
    scores: list[float] = []
    pad = tokenizer.pad_token_id
    for start in range(0, len(prompts), batch_size):
        batch = list(zip(prompts[start:start + batch_size], candidates[start:start + batch_size]))
        width = max(len(p) + len(c) for p, c in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (p, c) in enumerate(batch):
            ids[row, : len(p) + len(c)] = torch.tensor(p + c)
            attention[row, : len(p) + len(c)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits
        logits = logits[:, -width:]  # drop virtual-token positions of prompt-learning methods
        for row, (p, c) in enumerate(batch):
            # Only the few positions that predict the candidate go through float32 log-softmax: a 7B
            # vocabulary over the whole batch would need gigabytes.
            predicting = logits[row, len(p) - 1: len(p) + len(c) - 1].float()
            logprobs = torch.log_softmax(predicting, dim=-1)
            targets = torch.tensor(c, device=logprobs.device)
            scores.append(float(logprobs.gather(1, targets[:, None]).sum()))
    return scores


class ClassificationScorer:
    """Accuracy and macro-F1 of label-likelihood predictions on held-out examples.

    Built once (candidate answers are tokenized up front), called at every evaluation."""

    def __init__(self, tokenizer, examples: list[Example], prompts: list[list[int]], labels: list[str], batch_size: int = 4):
        self.tokenizer, self.labels, self.batch_size = tokenizer, labels, batch_size
        self.gold = np.array([example.label for example in examples])
        self.prompts, self.candidates = [], []
        for example, prompt in zip(examples, prompts):
            for candidate in example.meta["candidates"]:
                # The candidate's tokens as they follow this prompt: the seam is the prompt's tail,
                # the same whether or not the text inside the prompt was cut to fit.
                self.prompts.append(prompt)
                self.candidates.append(answer_ids(tokenizer, example.prompt, candidate))

    def __call__(self, model) -> dict[str, Any]:
        if not len(self.gold):
            return {}
        was_training = model.training
        model.eval()
        try:
            scores = candidate_logprobs(model, self.tokenizer, self.prompts, self.candidates, self.batch_size)
        finally:
            model.train(was_training)
        predicted = np.array(scores).reshape(len(self.gold), len(self.labels)).argmax(axis=1)
        return {
            "accuracy": float((predicted == self.gold).mean()),
            "macro_f1": macro_f1(self.gold, predicted, len(self.labels)),
            "predicted_distribution": {label: int((predicted == i).sum()) for i, label in enumerate(self.labels)},
            "gold_distribution": {label: int((self.gold == i).sum()) for i, label in enumerate(self.labels)},
            "examples": int(len(self.gold)),
        }


def macro_f1(gold: np.ndarray, predicted: np.ndarray, n_classes: int) -> float:
    """Unweighted mean of per-class F1 (a class never predicted nor present scores 0, as in sklearn)."""
    f1s = []
    for k in range(n_classes):
        tp = int(((predicted == k) & (gold == k)).sum())
        fp = int(((predicted == k) & (gold != k)).sum())
        fn = int(((predicted != k) & (gold == k)).sum())
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return float(np.mean(f1s))
