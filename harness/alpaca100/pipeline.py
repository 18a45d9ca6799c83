"""Select the best records, train on them (optionally as a curriculum), decode over a grid, judge.

The flow of recipes/llama2_7b_lora_alpaca100.py, for any instruction data and model:

  1. hold out validation_split of the data file (fixed seed): eval loss and ROUGE-L are measured
     on those records, which selection never sees;
  2. select the top select_k of the rest (harness.alpaca100.select): selection/selected.json, the scores
     of every record and a plot;
  3. train: one shuffled run, or with --curriculum the easy / +medium / +hard stages
     (harness.alpaca100.curriculum), each an ordinary harness.run.flow.train run with its own result.json;
  4. answer the test prompts (and the held-out records) with every temperature x top_p setting
     (harness.evaluation.generation); ROUGE-L against the held-out records' answers;
  5. judge every test answer (harness.evaluation.judge, cached) and pick the best setting by mean judge score;
  6. write report.md (the tables, labelled with the models, device, commit and command) and
     result.json (every figure, the raw per-answer records beside it in generations.jsonl).
"""
from __future__ import annotations

import dataclasses
import gc
from pathlib import Path
from typing import Any

from harness.alpaca100.curriculum import CurriculumArguments, bucket_counts, plan_stages, stage_number, train_stages
from harness.alpaca100.select import SelectionArguments, check_selection, select_records, write_selection
from harness.data import reading as data_mod
from harness.data.examples import stop_strings
from harness.errors import UserError, reported_as_one_line
from harness.evaluation.generation import (
    DecodingArguments,
    decoding_grid,
    dump_jsonl,
    fit_prompt,
    generate,
    instruction_prompt,
    load_test_prompts,
    rouge_l,
)
from harness.evaluation.judge import (
    PROMPT_VERSION,
    JudgeArguments,
    JudgmentCache,
    build_judge,
    check_judge_reachable,
    check_judge_settings,
    judge_all,
)
from harness.evaluation.judge_scores import (
    DIFFICULTY_BANDS,
    DIMENSION_NAMES,
    DIMENSIONS,
    GUIDE_REFERENCE_LEVELS,
    difficulty_band,
    score_frame,
    summary_tables,
)
from harness.evaluation.progress import bar
from harness.files import write_json_atomic, write_text_atomic
from harness.models.adapters import attach, open_adapter
from harness.models.loading import load_model, load_tokenizer
from harness.models.offline import OFFLINE_MODELS
from harness.run.checks import check_settings
from harness.run.command_line import parse_args
from harness.run.config import RunConfig
from harness.run.distributed import launched_processes
from harness.run.folder import RESULT_FILE, check_output_dir, claimed
from harness.run.measure import PeakMemory, command_line, device_name, git_state, versions
from harness.run.record import RunStart, recorded_run

EXTRA_ARGUMENTS = (SelectionArguments, CurriculumArguments, DecodingArguments, JudgeArguments)
REPORT_FILE = "report.md"
GENERATIONS_FILE = "generations.jsonl"
HELDOUT_GENERATIONS_FILE = "heldout_generations.jsonl"
JUDGMENTS_FILE = "judgments.jsonl"


def run_select_train_judge(name: str, defaults: dict[str, Any], argv: list[str] | None = None) -> dict[str, Any]:
    """Entry point of a select -> train -> decode -> judge recipe."""
    with reported_as_one_line(name):
        cfg = parse_args({**defaults, "recipe": name}, argv, extra_classes=EXTRA_ARGUMENTS)
        return run(cfg)


def _extras(cfg: RunConfig):
    found = {type(part): part for part in cfg.extras}
    return tuple(found[kind] for kind in EXTRA_ARGUMENTS)


def run(cfg: RunConfig) -> dict[str, Any]:
    selection_args, curriculum_args, decoding_args, judge_args = _extras(cfg)
    start = RunStart.now()

    # Everything that can be refused before a model is loaded or a minute is spent training.
    check_settings(cfg)
    if launched_processes() > 1:  # its selection, judge and reports write files: one process owns them
        raise UserError("the 100-best-Alpaca pipeline runs in one process; start it with python, not accelerate launch "
                        "(its training stages are small)")
    check_output_dir(cfg, with_checkpoints=False)
    if cfg.data.task != "instruction":
        raise UserError(f"this recipe trains on instruction data; --task {cfg.data.task} is not supported here")
    if curriculum_args.curriculum and cfg.method.method == "full":
        raise UserError("--curriculum passes an adapter from stage to stage; use a PEFT --method, or no --curriculum")
    check_selection(selection_args)
    check_judge_settings(judge_args)
    grid = decoding_grid(decoding_args)
    test_prompts = load_test_prompts(decoding_args.test_file, decoding_args.max_test_prompts)
    stage_number(curriculum_args.start_stage)
    pool = data_mod.load_records(cfg.data)
    if pool.left_out:
        print(f"Data: {pool.summary()}")
    eval_records = data_mod.load_eval_records(cfg.data)  # refused if all training rows; some are stated
    train_pool, heldout = data_mod.split_records(pool.rows, cfg.data, eval_records)
    check_judge_reachable(judge_args)  # the judge is first needed hours from now: ask it one thing first

    # The folder holds selection/, one folder per stage (each resumes on its own) and the reports.
    with claimed(cfg, with_checkpoints=False) as folder:
        # Each stage records its own memory in its result.json; this record has the process's peak RSS.
        with recorded_run(folder, cfg, start) as record:
            record.update(_run(cfg, folder.path, train_pool, heldout, grid, test_prompts,
                               selection_args, curriculum_args, decoding_args, judge_args))
            record["data_rows_left_out"] = pool.report()
            if eval_records is not None:  # its rows left out, and those also in the pool (not held-out)
                record["eval_file_rows"] = eval_records.report()
    print(f"\nReport: {folder.path / REPORT_FILE}\nResult: {folder.path / RESULT_FILE}")
    return record


def _run(cfg, out: Path, train_pool, heldout, grid, test_prompts,
         selection_args, curriculum_args, decoding_args, judge_args) -> dict[str, Any]:

    # 1-2. Selection, on the records left after the hold-out.
    selection = select_records(train_pool, selection_args)
    write_selection(selection, out / "selection",
                    f"{cfg.data.data_file}: top {selection_args.select_k} of {len(train_pool)} records "
                    f"({len(heldout)} held out)")
    heldout_file = None
    if heldout:
        heldout_file = out / "data" / "heldout.json"
        write_json_atomic(heldout_file, heldout)
    summary = {**selection.summary(), "held_out": len(heldout), "buckets": bucket_counts(selection.records)}
    print(f"Selected {summary['selected']} of {summary['pool']} records (+{len(heldout)} held out); "
          f"buckets {summary['buckets']}")

    # 3. Training.
    stages = plan_stages(selection.records, curriculum_args.curriculum)
    stage_records = train_stages(cfg, stages, out, str(heldout_file) if heldout_file else None,
                                 curriculum_args.start_stage)
    adapter_dir = out / stages[-1].folder

    # 4-5. Decoding grid and judging; their memory is measured apart from training's.
    memory = PeakMemory()
    answers, heldout_answers, prompts_cut = _answer_grid(cfg, adapter_dir, grid, test_prompts, heldout, decoding_args)
    judged, judge_id, cache_hits = _judge(answers, judge_args, out)
    tables = _tables(judged, heldout_answers, grid)
    write_text_atomic(out / GENERATIONS_FILE, dump_jsonl(judged))
    write_text_atomic(out / HELDOUT_GENERATIONS_FILE, dump_jsonl(heldout_answers))

    record = {
        "trainee": {"model": cfg.model.model, "adapter": str(adapter_dir), "note": model_note(cfg.model.model)},
        "judge": {"id": judge_id, "backend": judge_args.judge_backend, "model": judge_args.judge_model,
                  "note": judge_note(judge_args), "cache_hits": cache_hits, "prompt_version": PROMPT_VERSION},
        "selection": summary,
        "stages": [_stage_summary(r) for r in stage_records],
        "test": {"file": decoding_args.test_file, "prompts": len(test_prompts),
                 "subset": len(test_prompts) < len(load_test_prompts(decoding_args.test_file, None)),
                 "prompts_cut_to_fit": prompts_cut, "max_new_tokens": decoding_args.max_new_tokens,
                 "heldout_scored": len(heldout_answers) // max(len(grid), 1)},
        "decoding_grid": tables["grid"],
        "best_setting": tables["best"],
        "scores": tables["best_scores"],
        "reference_levels": tables["reference_levels"],
        # On a GPU: the peaks of decoding and judging alone. On CPU, cpu_rss is the process's peak,
        # training included (RSS has no reset).
        "decode_and_judge_memory": memory.read(),
    }
    _write_report(cfg, out, record, tables)
    return record


# ---------------------------------------------------------------------------- decoding

def _answer_grid(cfg, adapter_dir: Path, grid, test_prompts, heldout, decoding_args):
    import torch


    tokenizer = load_tokenizer(cfg.model)
    if (adapter_dir / "adapter_config.json").is_file():
        model = load_model(cfg.model, cfg.method.method, False, for_training=False)
        model = attach(model, open_adapter(adapter_dir), cfg.model.model)
    else:  # full fine-tuning saved the whole model
        model = load_model(dataclasses.replace(cfg.model, model=str(adapter_dir)), "full", False, for_training=False)
    model.eval()
    positions = getattr(model.config, "max_position_embeddings", None) or cfg.data.max_seq_length
    max_prompt = min(cfg.data.max_seq_length, positions) - decoding_args.max_new_tokens
    if max_prompt < 16:
        raise UserError(
            f"--max_new_tokens {decoding_args.max_new_tokens} leaves {max_prompt} tokens of the "
            f"{min(cfg.data.max_seq_length, positions)}-token window for the prompt; lower --max_new_tokens"
        )

    def prompt_for(instruction: str, given: str) -> str:
        return instruction_prompt(tokenizer, cfg.data, instruction, given)

    tests = [fit_prompt(tokenizer, prompt_for, p.instruction, "", max_prompt) for p in test_prompts]
    limit = cfg.data.eval_max_samples or len(heldout)
    held = heldout[:limit]
    held_prompts = [fit_prompt(tokenizer, prompt_for, str(r["instruction"]), str(r.get("input") or ""), max_prompt)
                    for r in held]
    seed, batch = cfg.train.seed, decoding_args.generation_batch_size
    stops = stop_strings(cfg.data, tokenizer)
    answers, heldout_answers = [], []

    for number, setting in enumerate(grid, start=1):
        print(f"Decoding {number}/{len(grid)}: {setting.label} on {len(tests)} test + {len(held)} held-out prompts")
        texts = generate(model, tokenizer, [p for p, _ in tests], setting, decoding_args.max_new_tokens, seed, batch, stops)
        for prompt, (_, cut), text in zip(test_prompts, tests, texts):
            answers.append({
                "idx": prompt.idx, "skill": prompt.skill, "difficulty": prompt.difficulty,
                "band": difficulty_band(prompt.difficulty), "temperature": setting.temperature,
                "top_p": setting.top_p, "question": prompt.instruction, "prompt_cut": cut, "answer": text,
            })
        texts = generate(model, tokenizer, [p for p, _ in held_prompts], setting, decoding_args.max_new_tokens, seed,
                         batch, stops)
        for row, (_, cut), text in zip(held, held_prompts, texts):
            heldout_answers.append({
                "temperature": setting.temperature, "top_p": setting.top_p, "instruction": row["instruction"],
                "prompt_cut": cut, "answer": text, "rouge_l": round(rouge_l(text, str(row["output"])), 4),
            })
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the judge may be a local model that needs this memory
    return answers, heldout_answers, sum(cut for _, cut in tests)


def _judge(answers: list[dict], judge_args, out: Path):
    from dataclasses import asdict


    judge = build_judge(judge_args)
    cache = JudgmentCache(Path(judge_args.judge_cache) if judge_args.judge_cache else out / JUDGMENTS_FILE)
    print(f"Judging {len(answers)} answers with {judge.id}")
    with bar(len(answers), "Judging", unit="answer") as shown:
        def progress(done: int, total: int) -> None:
            shown.update(1)
            shown.set_postfix(cached=cache.hits, refresh=False)

        judgments = judge_all(judge, [(a["question"], a["answer"]) for a in answers], cache, progress)
    print(f"Judged {len(answers)} ({cache.hits} from the cache)")
    judged = [{**a, **{k: v for k, v in asdict(j).items() if k != "judge"}} for a, j in zip(answers, judgments)]
    del judge
    gc.collect()
    return judged, judgments[0].judge if judgments else None, cache.hits


# ---------------------------------------------------------------------------- tables

def _tables(judged: list[dict], heldout_answers: list[dict], grid) -> dict[str, Any]:
    import pandas as pd


    frame = score_frame(judged)
    held = pd.DataFrame(heldout_answers) if heldout_answers else None
    rows = []
    for setting in grid:
        part = frame[(frame["temperature"] == setting.temperature) & (frame["top_p"] == setting.top_p)]
        ok = part[part["status"] == "ok"]
        rouge = None
        if held is not None:
            mine = held[(held["temperature"] == setting.temperature) & (held["top_p"] == setting.top_p)]
            rouge = round(float(mine["rouge_l"].mean()), 4)
        rows.append({
            "temperature": setting.temperature, "top_p": setting.top_p,
            "judge_mean": round(float(ok["mean"].mean()), 3) if len(ok) else None,
            **{d: round(float(ok[d].mean()), 3) if len(ok) else None for d in DIMENSIONS},
            "answers": int(len(part)), "unparseable": int(len(part) - len(ok)),
            "mean_answer_words": round(float(part["answer"].str.split().str.len().mean()), 1) if len(part) else None,
            "heldout_rouge_l": rouge,
        })
    scored = [r for r in rows if r["judge_mean"] is not None]
    if not scored:
        raise UserError("the judge could not score a single answer (all unparseable); see judgments.jsonl's raw replies")
    best = max(scored, key=lambda r: r["judge_mean"])  # max keeps the first of equals: the grid's order
    best_frame = frame[(frame["temperature"] == best["temperature"]) & (frame["top_p"] == best["top_p"])]
    summary = summary_tables(best_frame)
    return {
        "grid": rows,
        "best": {"temperature": best["temperature"], "top_p": best["top_p"], "judge_mean": best["judge_mean"]},
        "best_scores": {
            "per_dimension": summary["per_dimension"],
            "answers": summary["answers"],
            "unparseable": summary["unparseable"],
            "per_skill": summary["per_skill"].reset_index().to_dict(orient="records"),
            "per_difficulty": summary["per_difficulty"].reset_index().to_dict(orient="records"),
        },
        "summary_frames": summary,
        "reference_levels": GUIDE_REFERENCE_LEVELS,
    }


def model_note(name: str) -> str:
    if name.startswith("tiny-"):
        return "random-weight model (" + OFFLINE_MODELS.get(name, name) + ")"
    if name in OFFLINE_MODELS:
        return OFFLINE_MODELS[name]
    return ""


def judge_note(judge_args) -> str:
    """What the judge's scores can mean: nothing about quality when the judge is a toy model."""
    if judge_args.judge_backend == "local" and judge_args.judge_model in OFFLINE_MODELS:
        return (f"the judge is {judge_args.judge_model}, a toy model: its scores say nothing about answer quality, "
                "they only show that the pipeline runs end to end")
    return ""


def _stage_summary(record: dict[str, Any]) -> dict[str, Any]:
    keys = ("stage", "records", "added", "status", "global_step", "train_loss", "eval_loss", "train_seconds",
            "tokens_per_second", "peak_memory_mb", "peak_memory_kind", "trainable_params", "adapter_bytes")
    summary = {k: record.get(k) for k in keys}
    summary["init_adapter"] = record.get("config", {}).get("init_adapter")
    return summary


def _write_report(cfg, out: Path, record: dict[str, Any], tables: dict[str, Any]) -> None:
    import pandas as pd


    trainee, judge = record["trainee"], record["judge"]
    git = git_state()
    test = record["test"]
    lines = [
        f"# {cfg.run.recipe}: select, train, decode, judge",
        "",
        f"- Trainee: `{trainee['model']}` + LoRA adapter `{trainee['adapter']}`"
        + (f" ({trainee['note']})" if trainee["note"] else ""),
        f"- Judge: `{judge['id']}` (prompt {judge['prompt_version']})",
    ]
    if judge["note"]:
        lines.append(f"- **Read the scores with care: {judge['note']}.**")
    lines += [
        f"- Device: {device_name()}; commit {git.get('commit')}{' (dirty tree)' if git.get('dirty') else ''}",
        f"- Versions: {', '.join(f'{k} {v}' for k, v in versions().items())}",
        f"- Command: `{command_line(cfg.run.recipe, cfg.argv)}`",
        f"- Test prompts: {test['prompts']} of `{test['file']}`"
        + (f" (evenly spaced subset, --max_test_prompts {test['prompts']})" if test["subset"] else " (all)")
        + f", {test['prompts_cut_to_fit']} cut to fit the context; answers up to {test['max_new_tokens']} new tokens",
        "",
        "## Selection",
        "",
    ]
    sel = record["selection"]
    lines += [
        f"{sel['selected']} of {sel['pool']} records selected ({sel['held_out']} more held out before selection; "
        f"{sel['duplicates_skipped']} duplicate prompts skipped; rating field: {sel['score_field']}). "
        f"Mean response: {sel['mean_selected_response_words']} words selected vs {sel['mean_pool_response_words']} in the pool. "
        f"Curriculum buckets of the selection: {', '.join(f'{k} {v}' for k, v in sel['buckets'].items())}.",
        "",
        "![selection](selection/selection.png)",
        "",
        "## Training stages (eval loss on the held-out records)",
        "",
        pd.DataFrame(record["stages"]).drop(columns=["init_adapter"]).to_markdown(index=False),
        "",
        "## Decoding grid (judge mean over the four dimensions, 1-5; ROUGE-L F1 on held-out records with references)",
        "",
    ]
    grid = pd.DataFrame(record["decoding_grid"])
    best = record["best_setting"]
    grid.insert(0, "best", ["**best**" if (r.temperature, r.top_p) == (best["temperature"], best["top_p"]) else ""
                            for r in grid.itertuples()])
    lines += [grid.to_markdown(index=False), ""]
    scores = record["scores"]
    lines += [
        f"## Best setting: temperature {best['temperature']:g}, top_p {best['top_p']:g}",
        "",
        f"{scores['answers']} answers, {scores['unparseable']} unparseable (left out of the means).",
        "",
        pd.DataFrame([{"dimension": DIMENSION_NAMES.get(k, k), "mean score (1-5)": v}
                      for k, v in scores["per_dimension"].items()]).to_markdown(index=False),
        "",
        "Against the source guide's reference levels (overall mean, GPT-4o-mini judge, same test set):",
        "",
        pd.DataFrame([{"": "this run (best setting)", "overall mean": scores["per_dimension"]["mean"]}]
                     + [{"": f"guide: {name} model", "overall mean": level}
                        for name, level in record["reference_levels"].items()]).to_markdown(index=False),
        "",
        "### Per skill",
        "",
        tables["summary_frames"]["per_skill"].rename(columns=DIMENSION_NAMES).to_markdown(),
        "",
        "### Per difficulty band (" + ", ".join(name for _, _, name in DIFFICULTY_BANDS) + ")",
        "",
        tables["summary_frames"]["per_difficulty"].rename(columns=DIMENSION_NAMES).to_markdown(),
        "",
        f"Raw records: {GENERATIONS_FILE} (every answer with its judgment), {HELDOUT_GENERATIONS_FILE} "
        "(held-out answers with ROUGE-L), result.json; each stage's own result.json in its folder.",
        "",
    ]
    write_text_atomic(out / REPORT_FILE, "\n".join(lines))

