"""The project's own long loops show a progress bar in the Trainer's style, and stay quiet when asked."""
from __future__ import annotations

import re

import pytest

from harness.evaluation import progress
from harness.run.config import DataArguments, ModelArguments


@pytest.fixture
def scorer_and_model():
    from harness.data.encoding import prepare
    from harness.data.reading import label_set
    from harness.evaluation.scores import ClassificationScorer
    from harness.models.loading import load_model, load_tokenizer

    tokenizer = load_tokenizer(ModelArguments(model="tiny-qwen2"))
    args = DataArguments(max_seq_length=64)
    rows = [{"text": f"review number {i}", "label": "positive" if i % 2 else "negative"} for i in range(7)]
    prepared = prepare(rows[:1], rows, args, tokenizer)
    scorer = ClassificationScorer(tokenizer, prepared.eval_examples, prepared.eval_prompts, label_set(args), 3)
    yield scorer, load_model(ModelArguments(model="tiny-qwen2"), "none", False)
    progress.configure(disable=False)


def test_scoring_the_held_out_set_shows_counts_and_a_rate(scorer_and_model, capsys, monkeypatch):
    monkeypatch.setattr(progress, "MIN_INTERVAL", 0)  # draw every update: the tiny model finishes in milliseconds
    scorer, model = scorer_and_model
    progress.configure(disable=False)
    assert scorer(model)["examples"] == 7
    shown = capsys.readouterr().err
    # counts out of the held-out set's 7 and a measured rate, as the Trainer's own bars show them
    assert "Scoring held-out labels" in shown
    assert re.search(r"[1-7]/7 \[[0-9:]+<[0-9:]+, +[0-9.]+example/s\]", shown), shown


def test_disable_tqdm_silences_it(scorer_and_model, capsys):
    scorer, model = scorer_and_model
    progress.configure(disable=True)
    scorer(model)
    assert "Scoring held-out labels" not in capsys.readouterr().err


def test_generation_counts_answers(capsys):
    from harness.evaluation.generation import generate
    from harness.models.loading import load_model, load_tokenizer

    tokenizer = load_tokenizer(ModelArguments(model="tiny-qwen2"))
    model = load_model(ModelArguments(model="tiny-qwen2"), "none", False)
    progress.configure(disable=False)
    answers = generate(model, tokenizer, ["Hello", "Hi there", "Yes"], None, 3, seed=0, batch_size=2)
    assert len(answers) == 3
    assert "Generating" in capsys.readouterr().err
