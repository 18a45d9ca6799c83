"""The PEFT methods build what they claim: LoRA's parameter count matches its closed form, target
presets pick the right layers on every architecture, DoRA/rsLoRA/IA3 differ from LoRA as documented,
and scores stay aligned when prompt-learning methods prepend virtual tokens."""
from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from harness.errors import UserError
from harness.models.loading import load_model, load_tokenizer, parameter_counts
from harness.models.methods import check_method, linear_module_names, peft_config, resolve_target_modules
from harness.run.config import MethodArguments, ModelArguments

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one CPU thread (conftest.py)


def base(name: str):
    return load_model(ModelArguments(model=name), "lora", gradient_checkpointing=False)


def adapted(name: str, **method):
    from peft import get_peft_model

    model = base(name)
    return get_peft_model(model, peft_config(MethodArguments(**method), model))


def linear_shapes(config, names: list[str]) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of each named projection, from the architecture's config alone."""
    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = hidden // heads
    kv = getattr(config, "num_key_value_heads", heads) * head_dim
    ffn = getattr(config, "intermediate_size", None) or config.ffn_dim
    shapes = {
        "q_proj": (hidden, hidden), "k_proj": (hidden, kv), "v_proj": (hidden, kv),
        "o_proj": (hidden, hidden), "out_proj": (hidden, hidden),
        "gate_proj": (hidden, ffn), "up_proj": (hidden, ffn), "down_proj": (ffn, hidden),
        "fc1": (hidden, ffn), "fc2": (ffn, hidden),
    }
    return {n: shapes[n] for n in names}


@pytest.mark.parametrize(
    "model_name, target_modules, r, expected_names",
    [
        ("tiny-qwen2", "all-linear", 4,
         ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]),
        ("tiny-opt", "qv", 16, ["q_proj", "v_proj"]),  # the OPT recipe's setting
        ("tiny-llama", "attention", 8, ["q_proj", "k_proj", "v_proj", "o_proj"]),  # the Llama-2 recipes'
    ],
)
def test_lora_trainable_parameters_equal_the_closed_form(model_name, target_modules, r, expected_names):
    model = adapted(model_name, method="lora", r=r, target_modules=target_modules)
    config = model.config
    assert sorted(model.peft_config["default"].target_modules) == sorted(expected_names)
    per_layer = sum(r * (d_in + d_out) for d_in, d_out in linear_shapes(config, expected_names).values())
    trainable, _ = parameter_counts(model)
    assert trainable == per_layer * config.num_hidden_layers
    assert not any("lm_head" in name and "lora_" in name for name, _ in model.named_parameters())


def test_target_presets_on_each_architecture():
    opt, llama = base("tiny-opt"), base("tiny-llama")
    assert resolve_target_modules("attention", opt) == ["q_proj", "k_proj", "v_proj", "out_proj"]
    assert resolve_target_modules("qv", opt) == ["q_proj", "v_proj"]
    # Automatic discovery: every linear layer but the output head, whatever the architecture calls them.
    assert resolve_target_modules("all-linear", opt) == ["fc1", "fc2", "k_proj", "out_proj", "q_proj", "v_proj"]
    assert "lm_head" not in linear_module_names(llama)
    assert sorted(resolve_target_modules("all-linear", llama)) == sorted(resolve_target_modules("all7", llama))
    with pytest.raises(UserError, match="all7 needs o_proj, gate_proj, up_proj, down_proj"):
        resolve_target_modules("all7", opt)
    with pytest.raises(UserError, match="no linear layer named attn_q"):
        resolve_target_modules("q_proj,attn_q", llama)


def test_dora_adds_one_magnitude_per_output_feature():
    names = ["q_proj", "k_proj", "v_proj", "o_proj"]
    lora = adapted("tiny-llama", method="lora", r=8, target_modules="attention")
    dora = adapted("tiny-llama", method="dora", r=8, target_modules="attention")
    shapes = linear_shapes(lora.config, names).values()
    magnitudes = sum(d_out for _, d_out in shapes) * lora.config.num_hidden_layers
    assert parameter_counts(dora)[0] == parameter_counts(lora)[0] + magnitudes


def test_rslora_scales_by_alpha_over_sqrt_r():
    lora = adapted("tiny-llama", method="lora", r=16, lora_alpha=32, target_modules="qv")
    rslora = adapted("tiny-llama", method="rslora", r=16, lora_alpha=32, target_modules="qv")

    def scaling(model):
        return next(m.scaling["default"] for n, m in model.named_modules() if n.endswith("q_proj") and hasattr(m, "scaling"))

    assert scaling(lora) == pytest.approx(32 / 16)
    assert scaling(rslora) == pytest.approx(32 / math.sqrt(16))


def test_ia3_learns_one_vector_per_adapted_layer():
    model = adapted("tiny-opt", method="ia3")  # PEFT's OPT defaults: q_proj, k_proj and fc2 (feed-forward)
    config = model.config
    # Attention layers scale their outputs, the feed-forward layer its inputs.
    expected = (config.hidden_size + config.hidden_size + config.ffn_dim) * config.num_hidden_layers
    assert parameter_counts(model)[0] == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_loftq_is_refused_without_a_gpu():
    with pytest.raises(UserError, match="LoftQ needs an NVIDIA GPU"):
        check_method(MethodArguments(method="loftq"), "4bit")


def test_loftq_on_a_16bit_base_names_its_missing_dependency(monkeypatch):
    # scipy is pinned in the README's set-up: the lookup is made to miss it, wherever the test runs.
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "scipy" else find_spec(name, *args))
    with pytest.raises(UserError) as refused:
        check_method(MethodArguments(method="loftq"), "none")
    assert str(refused.value) == ("LoftQ on a 16-bit base needs scipy (PEFT requires it): pip install scipy, "
                                  "or use --quantization 4bit")
    check_method(MethodArguments(method="loftq"), "none", this_machine=False)  # a plan for another machine: no lookup


@pytest.mark.skipif(not torch.cuda.is_available(), reason="PEFT computes LoftQ with CUDA")
def test_loftq_starts_lora_at_the_quantization_error():
    from peft import get_peft_model

    from harness.models.methods import initialise_loftq
    from harness.models.offline import resolve_offline_model

    model = load_model(ModelArguments(model="tiny-llama", quantization="4bit"), "loftq", False)
    model = get_peft_model(model, peft_config(MethodArguments(method="loftq", r=8, target_modules="attention"), model))
    initialise_loftq(model, resolve_offline_model("tiny-llama"))
    lora_b = [m.lora_B["default"].weight for m in model.modules() if hasattr(m, "lora_B") and "default" in m.lora_B]
    assert len(lora_b) == 4 * model.config.num_hidden_layers
    assert all(float(b.abs().sum()) > 0 for b in lora_b)  # plain LoRA starts every B at zero


def test_loftq_refuses_an_8bit_base():
    with pytest.raises(UserError, match="4-bit base or a 16-bit one"):
        check_method(MethodArguments(method="loftq"), "8bit")


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning", "p_tuning"])
def test_label_scores_stay_aligned_with_virtual_tokens(method):
    """Batched, padded scoring equals scoring each example alone, read at the real tokens' positions."""
    from harness.evaluation.scores import candidate_scores

    torch.manual_seed(0)
    model = adapted("tiny-opt", method=method, num_virtual_tokens=5).eval()
    tokenizer = load_tokenizer(ModelArguments(model="tiny-opt"))
    prompts = [tokenizer("A short review.")["input_ids"], tokenizer("A somewhat longer review of a film.")["input_ids"]]
    candidates = [tokenizer(" positive", add_special_tokens=False)["input_ids"]] * 2
    batched = candidate_scores(model, tokenizer, prompts, candidates, batch_size=2)
    for prompt, candidate, score in zip(prompts, candidates, batched):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + candidate])).logits[0]
        logits = logits[-len(prompt + candidate):]  # prompt/P-tuning put the virtual tokens first
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        expected = sum(float(logprobs[len(prompt) - 1 + i, token]) for i, token in enumerate(candidate))
        assert score.logprob == pytest.approx(expected, abs=1e-4)
        hits = sum(int(logprobs[len(prompt) - 1 + i].argmax()) == token for i, token in enumerate(candidate))
        assert score.argmax_hits == hits


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning"])
def test_virtual_tokens_take_the_embeddings_width_where_a_projection_follows_them(method):
    """OPT-350m's embeddings are 512 wide and its layers 1024: PEFT's default (hidden_size) made the real recipe fail
    at its first forward. An OPT shaped the same way, small, must train a step."""
    from peft import get_peft_model
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    config = OPTConfig(vocab_size=128, hidden_size=64, word_embed_proj_dim=32, num_hidden_layers=2, ffn_dim=128,
                       num_attention_heads=4, max_position_embeddings=64, do_layer_norm_before=False)
    model = get_peft_model(OPTForCausalLM(config), peft_config(MethodArguments(method=method, num_virtual_tokens=4),
                                                               OPTForCausalLM(config)))
    ids = torch.randint(3, 128, (2, 10))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert math.isfinite(loss.item()) and trained and all(p.grad is not None for p in trained)
    assert model.peft_config["default"].token_dim == 32
