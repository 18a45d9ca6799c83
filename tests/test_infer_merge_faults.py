"""Faults of `python -m harness.infer` and `python -m harness.merge` that the one-line battery (test_bad_input.py)
cannot hold: a reply capped at the model's positions (not a refusal), a chat whose stdin is closed (a fresh
process), refusals that must come before any weights load (no loading bar before the line), a model's own code
that must never run, and what is on disk after a refused merge."""
from __future__ import annotations

import builtins
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from harness import infer, merge
from harness.errors import UserError
from harness.locations import REPO_ROOT

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one CPU thread (conftest.py)

STORIES_POSITIONS = 512  # models/stories260k/config.json: max_position_embeddings, no RoPE scaling


def refused(main, argv, capfd) -> str:
    """The one stderr line of a refusal (exit 2): nothing before it, nothing after it."""
    capfd.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capfd.readouterr().err
    assert stop.value.code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err.strip()


@pytest.fixture
def no_weights_load(monkeypatch):
    """Fail the test if the base model's weights are loaded: the refusal had to come before."""
    import harness.models.loading

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model's weights were loaded before the refusal")

    monkeypatch.setattr(harness.models.loading, "load_model", must_not_load)


@pytest.fixture
def generate_calls(monkeypatch):
    """Every model.generate call's max_new_tokens and the number of tokens it really added."""
    from transformers import GenerationMixin

    calls: list[dict] = []
    real = GenerationMixin.generate

    def spy(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        calls.append({"max_new_tokens": kwargs["max_new_tokens"],
                      "generated": out.shape[1] - kwargs["input_ids"].shape[1]})
        return out

    monkeypatch.setattr(GenerationMixin, "generate", spy)
    return calls


def save_adapter(path, config, base: str = "stories260k"):
    from peft import get_peft_model

    from harness.models.loading import load_model
    from harness.run.config import ModelArguments

    model = load_model(ModelArguments(model=base), "lora", gradient_checkpointing=False, for_training=False)
    get_peft_model(model, config).save_pretrained(path)
    return path


@pytest.fixture
def lora_adapter(tmp_path):
    from peft import LoraConfig

    return save_adapter(tmp_path / "lora", LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"]))


# ---------------------------------------------------------------------------- replies and the model's positions

def test_max_new_tokens_beyond_the_positions_is_capped_with_one_line(generate_calls, capfd):
    argv = ["--base", "stories260k", "--prompt", "Once upon a time", "--max_new_tokens", "100000", "--temperature", "0"]
    assert infer.main(argv) == 0
    said = [line for line in capfd.readouterr().err.splitlines() if line.startswith("infer:")]
    assert len(said) == 1, said
    found = re.fullmatch(r"infer: --max_new_tokens 100000 capped at (\d+) \(the model has 512 positions and the "
                         r"prompt takes (\d+)\)", said[0])
    assert found, said[0]
    cap, prompt = int(found[1]), int(found[2])
    assert cap + prompt == STORIES_POSITIONS
    assert generate_calls == [{"max_new_tokens": cap, "generated": generate_calls[0]["generated"]}]
    assert 0 < generate_calls[0]["generated"] <= cap


def test_a_prompt_that_fills_the_positions_is_refused_before_the_model_loads(no_weights_load, capfd):
    line = refused(infer.main, ["--base", "stories260k", "--prompt", "cat " * 600], capfd)
    found = re.fullmatch(r"infer: the prompt takes ([\d,]+) tokens, and the model has 512 positions in all: none is "
                         r"left for a reply; shorten the prompt", line)
    assert found and int(found[1].replace(",", "")) > STORIES_POSITIONS, line


def test_a_chat_that_outgrows_the_positions_says_so_and_goes_on(generate_calls, monkeypatch, capsys):
    typed = iter(["cat " * 600, "Once upon a time"])

    def fake_input(prompt=""):
        try:
            return next(typed)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr(builtins, "input", fake_input)
    assert infer.main(["--base", "stories260k", "--chat", "--max_new_tokens", "4", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert "none is left for a reply; shorten the prompt: /reset starts over)" in out
    assert [call["max_new_tokens"] for call in generate_calls] == [4]  # the long turn was dropped, the next answered


def test_positions_are_known_only_where_the_config_states_them_plainly():
    from transformers import LlamaConfig, OPTConfig, PretrainedConfig

    from harness.models.loading import position_limit

    assert position_limit(LlamaConfig(max_position_embeddings=2048)) == 2048
    assert position_limit(OPTConfig(max_position_embeddings=2048)) == 2048  # learned positions: a hard end
    stretched = LlamaConfig(max_position_embeddings=4096, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "original_max_position_embeddings": 4096})
    assert position_limit(stretched) is None  # YaRN reaches past max_position_embeddings
    assert position_limit(PretrainedConfig()) is None


# ---------------------------------------------------------------------------- sampling settings

@pytest.mark.parametrize("flag,value,message", [
    ("--temperature", "inf", "--temperature must be a finite number >= 0 (0 is greedy), got inf"),
    ("--temperature", "-0.5", "--temperature must be a finite number >= 0 (0 is greedy), got -0.5"),
    ("--top_p", "nan", "--top_p must be in (0, 1], got nan"),
    ("--top_p", "inf", "--top_p must be in (0, 1], got inf"),
])
def test_non_finite_or_out_of_range_sampling_is_refused_before_loading(flag, value, message, monkeypatch, capfd):
    def must_not_load(args):
        raise AssertionError("loaded before the refusal")

    monkeypatch.setattr(infer, "load_for_generation", must_not_load)
    assert refused(infer.main, ["--base", "stories260k", "--prompt", "hi", flag, value], capfd) == f"infer: {message}"


@pytest.mark.parametrize("temperatures,top_ps,message", [
    ("0.7,nan", "0.9", "every temperature must be a finite number > 0"),
    ("inf", "0.9", "every temperature must be a finite number > 0"),
    ("0.7", "nan", "every top_p must be in (0, 1]"),
])
def test_the_decoding_grid_refuses_non_finite_values(temperatures, top_ps, message):
    from harness.evaluation.generation import DecodingArguments, decoding_grid

    with pytest.raises(UserError, match=re.escape(message)):
        decoding_grid(DecodingArguments(temperatures=temperatures, top_ps=top_ps))


# ---------------------------------------------------------------------------- chat without a terminal

def _infer_process(extra: dict) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "harness.infer", "--base", "stories260k", "--chat"], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=300, **extra)


def test_chat_with_stdin_closed_ends_cleanly():
    result = _infer_process({"stdin": None, "preexec_fn": lambda: os.close(0)})  # as `python -m harness.infer <&-`
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "stdin is closed" in result.stdout


def test_chat_with_stdin_at_its_end_ends_cleanly():
    result = _infer_process({"stdin": subprocess.DEVNULL})  # as `python -m harness.infer < /dev/null`
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "Error" not in result.stderr
    assert result.stdout.rstrip().endswith("you>")


# ---------------------------------------------------------------------------- an adapter on another base

def test_an_adapter_on_a_base_with_fewer_layers_is_refused_before_its_weights_load(lora_adapter, no_weights_load,
                                                                                   capfd):
    argv = ["--adapter", str(lora_adapter), "--base", "tiny-qwen2"]
    line = refused(infer.main, [*argv, "--prompt", "hi"], capfd)
    assert line.startswith(f"infer: the adapter in {lora_adapter} does not fit base model tiny-qwen2 (")
    assert line.endswith("pass the --base it was trained on")
    line = refused(merge.main, [*argv, "--out", str(lora_adapter.parent / "merged")], capfd)
    assert "does not fit base model tiny-qwen2" in line
    assert not (lora_adapter.parent / "merged").exists()


def test_an_adapter_whose_shapes_differ_is_refused_before_its_weights_load(lora_adapter, no_weights_load, capfd):
    from safetensors.torch import load_file, save_file

    weights_file = lora_adapter / "adapter_model.safetensors"
    weights = load_file(weights_file)
    name = next(k for k in sorted(weights) if k.endswith("q_proj.lora_A.weight"))
    weights[name] = torch.zeros(4, 32)  # the names all fit stories260k; one layer takes 64 inputs, not 32
    save_file(weights, weights_file)
    line = refused(infer.main, ["--adapter", str(lora_adapter), "--base", "stories260k", "--prompt", "hi"], capfd)
    assert f"1 saved tensors have other shapes than its layers take, e.g. {name} (4, 32)" in line


@pytest.mark.filterwarnings("ignore:The following rank_pattern keys")  # PEFT, building the adapter to save
def test_an_adalora_adapter_with_pruned_ranks_still_fits_its_base(tmp_path, generate_calls):
    """The check before loading builds AdaLoRA at init_r; the saved, pruned ranks are smaller and must pass."""
    from peft import AdaLoraConfig
    from safetensors import safe_open

    config = AdaLoraConfig(task_type="CAUSAL_LM", init_r=6, target_r=2, total_step=10, target_modules=["q_proj"])
    # rank_pattern as AdaLoRA leaves it after pruning: per layer, which of init_r ranks are kept
    config.rank_pattern = {f"model.layers.{i}.self_attn.q_proj.lora_E": [j <= i % 3 for j in range(6)]
                           for i in range(5)}
    adapter = save_adapter(tmp_path / "adalora", config)
    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as f:
        assert f.get_slice("base_model.model.model.layers.0.self_attn.q_proj.lora_A").get_shape() == [1, 64]
    assert infer.main(["--adapter", str(adapter), "--base", "stories260k", "--prompt", "Once", "--max_new_tokens", "3",
                       "--temperature", "0"]) == 0
    assert len(generate_calls) == 1


# ---------------------------------------------------------------------------- a model that needs its own code

def remote_code_model(folder, custom_tokenizer: bool = False):
    """A model folder that needs code of its own, which leaves a mark if it ever runs. custom_tokenizer: a real
    config (stories260k's), only the tokenizer needs the model's code."""
    folder.mkdir()
    stories = REPO_ROOT / "models" / "stories260k"
    if custom_tokenizer:
        for name in ("config.json", "tokenizer.json"):
            (folder / name).write_bytes((stories / name).read_bytes())
        tokenizer_config = json.loads((stories / "tokenizer_config.json").read_text())
        tokenizer_config.update(tokenizer_class="CustomTokenizer",
                                auto_map={"AutoTokenizer": ["tokenization_custom.CustomTokenizer", None]})
        (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    else:
        auto_map = {"AutoConfig": "configuration_custom.CustomConfig",
                    "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
        (folder / "config.json").write_text(json.dumps({"model_type": "custom-thing", "auto_map": auto_map}))
    for module in ("configuration_custom.py", "modeling_custom.py", "tokenization_custom.py"):
        (folder / module).write_text("import pathlib; pathlib.Path(__file__).with_suffix('.ran').touch()\n")
    return folder


@pytest.mark.parametrize("custom_tokenizer", [False, True], ids=["model-code", "tokenizer-code"])
def test_a_model_that_needs_its_own_code_is_refused_naming_the_flag(custom_tokenizer, tmp_path, lora_adapter, capfd):
    model = remote_code_model(tmp_path / "remote", custom_tokenizer)
    line = refused(infer.main, ["--base", str(model), "--prompt", "hi"], capfd)
    assert line.startswith(f"infer: model {model} needs code shipped with it to load (")
    assert "pass --trust_remote_code: pass it only if you trust where the model comes from" in line
    line = refused(merge.main, ["--base", str(model), "--adapter", str(lora_adapter), "--out", str(tmp_path / "m")],
                   capfd)
    assert line.startswith(f"merge: model {model} needs code shipped with it to load (")
    assert "--trust_remote_code" in line
    assert list(model.glob("*.ran")) == [], "the model's own code ran"
    assert not (tmp_path / "m").exists()


# ---------------------------------------------------------------------------- where a merged model may go

def run_folder(tmp_path, lora_adapter):
    """lora_adapter as a recipe's output_dir: its marker beside it."""
    (lora_adapter / "recipe_run.json").write_text(json.dumps({"schema": 2, "recipe": "llama2_7b_lora"}))
    return sorted(p.name for p in lora_adapter.iterdir())


def test_merge_refuses_an_out_inside_a_run_folder_and_leaves_the_run_as_it_was(tmp_path, lora_adapter, capfd):
    before = run_folder(tmp_path, lora_adapter)
    for out in (lora_adapter / "merged", lora_adapter / "deeper" / "merged"):
        line = refused(merge.main, ["--adapter", str(lora_adapter), "--out", str(out)], capfd)
        assert line == (f"merge: --out {out} is inside the run folder {lora_adapter}: a rerun there replaces the "
                        f"run's files and would leave this merged model beside an adapter it was not made from; pass a "
                        f"folder outside it, e.g. {lora_adapter}-merged")
    assert sorted(p.name for p in lora_adapter.iterdir()) == before


def test_merge_refuses_an_out_below_a_file(tmp_path, lora_adapter, capfd):
    (tmp_path / "notes.txt").write_text("mine")
    line = refused(merge.main, ["--adapter", str(lora_adapter), "--out", str(tmp_path / "notes.txt" / "merged")], capfd)
    assert line == (f"merge: --out {tmp_path / 'notes.txt' / 'merged'} cannot be created: {tmp_path / 'notes.txt'} "
                    "is a file, not a folder; pass a folder you can write to")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_merge_that_cannot_write_says_so_in_one_line_and_leaves_nothing(tmp_path, lora_adapter, capfd, monkeypatch):
    """The write test before loading passes; the disk then fails mid-save (e.g. full): one line, no staging left."""
    from transformers import PreTrainedModel

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", disk_full)
    out = tmp_path / "merged"
    capfd.readouterr()
    with pytest.raises(SystemExit) as stop:
        merge.main(["--base", "stories260k", "--adapter", str(lora_adapter), "--out", str(out)])
    err = capfd.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in err, err
    line = err.splitlines()[-1]  # after the loading bars: the write fails once the model is merged
    assert line == (f"merge: the merged model could not be written next to {out} (No space left on device); nothing "
                    f"was written to {out}: free space or pass --out somewhere you can write to")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora"]  # no merged/, no staging, no write test left
