"""Bad input gets one clear line naming the problem and the fix, before any model is loaded,
and nothing already written is lost."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from harness.locations import RECIPES_DIR
from harness.run.flow import load_recipe

flagship = load_recipe("qwen2_7b_adalora")


@pytest.fixture
def no_model_loading(monkeypatch):
    """These errors must come before the (slow, memory-hungry) model load."""
    from harness.objectives import sft, trl_run

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    for objective in (sft, trl_run):  # where the SFT, DPO and GRPO runs load their model
        monkeypatch.setattr(objective, "load_model", refuse)


def one_line_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        flagship.run_recipe("qwen2_7b_adalora", flagship.DEFAULTS, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("qwen2_7b_adalora: ")
    return err[0]


def write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize(
    "content, suffix, expected",
    [
        (None, ".csv", "data file {path} not found; pass --data_file"),
        ("review,sentiment\nnice,positive\n", ".csv", "has no column 'text', 'label'"),
        ("text,label\nnice,positive\nmeh,neutral\n", ".csv", "row 2: label 'neutral' is not one of positive, negative"),
        ("text,label\n,positive\n  ,negative\n", ".csv", "no row has text in column 'text'"),
        ("text,label\n", ".csv", "holds no rows"),
        ('[{"text": "a", "label": "positive"', ".json", "could not be read"),
        ("\xff\xfe garbage", ".xlsx", "unknown format '.xlsx'"),
        ("\xff\xfe garbage", ".parquet", "could not be read"),
        ('{"a": 1}', ".json", "must hold a list of records"),
    ],
)
def test_bad_data_files(content, suffix, expected, tmp_path, capsys, recipe_argv, no_model_loading):
    path = tmp_path / f"data{suffix}"
    if content is not None:
        write(path, content)
    message = one_line_error(capsys, recipe_argv("--data_file", str(path)))
    assert expected.format(path=path) in message


def test_hub_id_without_network_suggests_offline_model(capsys, recipe_argv):
    message = one_line_error(capsys, recipe_argv(model="some-org/some-model-that-is-not-cached"))
    assert "cannot load model 'some-org/some-model-that-is-not-cached'" in message
    assert "--model stories260k" in message


def test_missing_local_model_folder(capsys, recipe_argv, tmp_path):
    message = one_line_error(capsys, recipe_argv(model=str(tmp_path / "nowhere")))
    assert "not found" in message


def test_quantization_where_bitsandbytes_cannot_run(capsys, recipe_argv, monkeypatch, no_model_loading):
    import builtins

    real_import = builtins.__import__

    def broken_bitsandbytes(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise RuntimeError("CUDA Setup failed despite GPU being available")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "bitsandbytes", raising=False)
    monkeypatch.setattr(builtins, "__import__", broken_bitsandbytes)
    message = one_line_error(capsys, recipe_argv("--quantization", "4bit"))
    assert "--quantization 4bit needs bitsandbytes" in message and "--quantization none" in message


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--max_steps", "1"], "only 1 optimizer step(s)"),
        (["--max_steps", "10", "--tinit", "5", "--tfinal", "5"], "tinit 5 + tfinal 5 leave no budgeting phase in 10 steps"),
        (["--max_steps", "10", "--tfinal", "0"], "tfinal must be >= 1"),
        (["--target_r", "16"], "1 <= --target_r <= --init_r"),
    ],
)
def test_impossible_adalora_schedule(flags, expected, capsys, recipe_argv, no_model_loading):
    message = one_line_error(capsys, recipe_argv(*flags))
    assert "AdaLoRA" in message and expected in message


def test_total_step_follows_data_batch_accumulation_and_epochs():
    from harness.models.methods import count_optimizer_steps

    # 900 rows, batch 1, accumulation 8 -> 113 steps an epoch (the last one shorter), 3 epochs
    assert count_optimizer_steps(900, 1, 8, 3, -1) == 339
    assert count_optimizer_steps(900, 4, 8, 1, -1) == 29
    assert count_optimizer_steps(900, 1, 8, 3, 50) == 50  # max_steps wins


def test_output_dir_of_another_recipe_is_refused(tmp_path, capsys, recipe_argv, no_model_loading):
    out = tmp_path / "run"
    out.mkdir()
    write(out / "recipe_run.json", json.dumps({"recipe": "qwen2_7b_qlora"}))
    write(out / "result.json", '{"status": "ok"}')
    message = one_line_error(capsys, recipe_argv())
    assert "holds a run of recipe 'qwen2_7b_qlora'" in message
    assert json.loads((out / "result.json").read_text()) == {"status": "ok"}  # untouched


def test_non_empty_foreign_output_dir_is_refused(tmp_path, capsys, recipe_argv, no_model_loading):
    out = tmp_path / "run"
    out.mkdir()
    write(out / "notes.txt", "mine")
    message = one_line_error(capsys, recipe_argv())
    assert "is not empty (notes.txt) and holds no run of this project" in message
    assert (out / "notes.txt").read_text() == "mine"


def test_unknown_flag_and_bad_values(capsys, recipe_argv):
    assert "unknown setting(s): --no_such_flag 1" in one_line_error(capsys, recipe_argv("--no_such_flag", "1"))
    assert "--method" in one_line_error(capsys, recipe_argv("--method", "magic"))
    assert "--quantization" in one_line_error(capsys, recipe_argv("--quantization", "3bit"))


def test_missing_or_broken_config_file(tmp_path, capsys, recipe_argv):
    assert "config file" in one_line_error(capsys, recipe_argv("--config", str(tmp_path / "none.yaml")))
    broken = write(tmp_path / "broken.yaml", "learning_rate: [1e-4\n")
    assert "is not valid YAML/JSON" in one_line_error(capsys, recipe_argv("--config", broken))
    unknown = write(tmp_path / "unknown.yaml", "learning_rat: 1e-4\n")
    assert "learning_rat" in one_line_error(capsys, recipe_argv("--config", unknown))


def test_config_file_then_command_line_override(tmp_path):
    from harness.run.command_line import parse_args

    yaml_file = write(tmp_path / "c.yaml", "learning_rate: 3.0e-4\ninit_r: 16\ntarget_r: 6\nmodel: tiny-llama\n")
    json_file = write(tmp_path / "c.json", json.dumps({"learning_rate": 5e-4, "max_samples": 10}))
    cfg = parse_args(flagship.DEFAULTS, ["--config", yaml_file, "--target_r", "2"])
    assert cfg.train.learning_rate == 3e-4 and cfg.method.init_r == 16 and cfg.method.target_r == 2
    assert cfg.model.model == "tiny-llama"
    assert cfg.train.gradient_accumulation_steps == 8  # the recipe's default survives
    cfg = parse_args(flagship.DEFAULTS, ["--config", json_file])
    assert cfg.train.learning_rate == 5e-4 and cfg.data.max_samples == 10


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--model", "tiny-qwen2", "--data_file", "missing.csv"], "qwen2_7b_adalora: data file missing.csv not found"),
        # A Hub id that is not cached, with no Hub to fetch it from.
        (["--model", "some-org/not-cached"], "qwen2_7b_adalora: cannot load model 'some-org/not-cached'"),
    ],
)
def test_cli_prints_one_line_not_a_traceback(flags, expected, tmp_path):
    """The real script, as a user runs it."""
    result = subprocess.run(
        [sys.executable, str(RECIPES_DIR / "qwen2_7b_adalora.py"), *flags, "--output_dir", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), result.stderr
