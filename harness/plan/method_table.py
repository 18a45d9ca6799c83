"""The plans behind harness.plan's answers: one recipe's run, or the table of every method the recipes offer
at several ranks, and the work of one optimizer step of each (harness.plan.work). harness.plan.cli times them
(harness.plan.run_time) and prints them.
"""
from __future__ import annotations

from pathlib import Path

from harness.errors import UserError
from harness.plan.speeds import calibrated_memory

TABLE_TRAINING = dict(
    output_dir="outputs/plan",  # never written: parsing a run's settings needs one
    per_device_train_batch_size=1,
    gradient_accumulation_steps=8,
    max_seq_length=512,
    optim="paged_adamw_8bit",
    activation_checkpointing=True,
)

# (label, method, quantization, takes a rank) for every method the recipes offer
TABLE_METHODS = [
    ("full fine-tuning", "full", "none", False),
    ("LoRA", "lora", "none", True),
    ("DoRA", "dora", "none", True),
    ("rsLoRA", "rslora", "none", True),
    ("QLoRA 4-bit", "lora", "4bit", True),
    ("QLoRA 8-bit", "lora", "8bit", True),
    ("LoftQ (4-bit base)", "loftq", "4bit", True),
    ("AdaLoRA (4-bit base; rank = init_r)", "adalora", "4bit", True),
    ("IA3", "ia3", "none", False),
    ("prompt tuning", "prompt_tuning", "none", False),
    ("prefix tuning (no checkpointing)", "prefix_tuning", "none", False),
    ("P-tuning", "p_tuning", "none", False),
]


def build_plans(options, settings: list[str]):
    # imported here, not at the top: --help and one-line refusals answer without importing torch
    from harness.bench.grid import parse_int_list
    from harness.models.methods import check_method
    from harness.plan.architectures import model_config
    from harness.plan.memory import plan_run
    from harness.run.command_line import parse_args

    if options.recipe:
        # imported here, not at the top: --help and one-line refusals answer without importing torch
        from harness.bench.grid import load_defaults

        path = Path(options.recipe)
        if not path.is_file():
            raise UserError(f"recipe file {options.recipe} not found; recipes are in recipes/, e.g. recipes/qwen2_7b_adalora.py")
        cfg = parse_args(load_defaults(path.stem, path.resolve()), settings)
        # The recipe's own refusals, less those about this machine: planning needs no GPU and no scipy.
        check_method(cfg.method, cfg.model.quantization, cfg.train.activation_checkpointing, this_machine=False)
        config = model_config(cfg.model.model, cfg.model.trust_remote_code)
        return [plan_run(cfg, config, compute_dtype=compute_dtype(cfg), **_context(options))], False, config, [cfg]
    ranks = parse_int_list(options.ranks, "--ranks", 1)
    if not any(s == "--model" or s.startswith("--model=") for s in settings):
        raise UserError("name a model (--model Qwen/Qwen2-7B-Instruct, a local folder, an offline name) or a recipe file")
    base = parse_args(TABLE_TRAINING, settings)
    context = _context(options)
    config = model_config(base.model.model, base.model.trust_remote_code)
    plans, cfgs = [], []
    for label, method, quantization, ranked in TABLE_METHODS:
        for rank in ranks if ranked else [None]:
            extra = ["--method", method, "--quantization", quantization]
            if rank is not None:
                extra += ["--init_r" if method == "adalora" else "--r", str(rank)]
                extra += ["--target_r", str(max(1, rank // 2))] if method == "adalora" else []
            if method == "prefix_tuning":
                extra += ["--activation_checkpointing", "false"]
            cfg = parse_args(TABLE_TRAINING, [*settings, *extra])
            plans.append(plan_run(cfg, config, compute_dtype=compute_dtype(cfg), label=label, **context))
            cfgs.append(cfg)
    return plans, True, config, cfgs


def compute_dtype(cfg):
    """--dtype as given; auto plans a GPU's bf16 (a T4's fp16 takes the same bytes)."""
    import torch

    # imported here, not at the top: --help and one-line refusals answer without importing torch
    from harness.models.loading import DTYPES

    return DTYPES.get(cfg.model.dtype, torch.bfloat16)


def _context(options) -> dict:
    """plan_run's CUDA context and allocator reserve: what a calibration of the named GPU (or this machine's)
    measured, where there is one; else the plan's modelled context and no reserve."""
    spec = options.gpu
    if spec is None:
        import torch

        spec = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return calibrated_memory(spec)


def step_works(cfgs, config) -> list:
    """The work of one optimizer step (harness.plan.work.StepWork) of each plan's run, in the order given."""
    # imported here, not at the top: --help and one-line refusals answer without importing torch
    from harness.plan.work import step_work

    return [step_work(cfg, config, compute_dtype=compute_dtype(cfg)) for cfg in cfgs]
