"""A plain SFTTrainer script, nothing of this project's: the yardstick harness.bench.overhead_timing holds a recipe
against. TRL's own trl/scripts/sft.py, with a local data file instead of a Hub id and the trainer's figures written
to <output_dir>/plain_result.json.

  python -m harness.bench.plain_sft --model_name_or_path <folder> --data_file data/c4_demo.jsonl --max_samples 64 \
      --output_dir /tmp/plain --use_peft --lora_r 8 --max_length 512 --max_steps 8
"""
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from datasets import load_dataset
from transformers import set_seed
from trl import ModelConfig, SFTConfig, SFTTrainer, TrlParser, get_peft_config


@dataclass
class PlainArguments:
    data_file: str = "data/c4_demo.jsonl"  # a JSON/JSONL file of one of TRL's own formats (text, prompt/completion, messages)
    max_samples: int = 0  # the first N rows; 0 takes them all


def main(argv=None) -> int:
    plain, training_args, model_args = TrlParser((PlainArguments, SFTConfig, ModelConfig)).parse_args_into_dataclasses(argv)
    set_seed(training_args.seed)  # before the adapter is made, so its initial weights repeat
    dataset = load_dataset("json", data_files=plain.data_file, split="train")
    if plain.max_samples:
        dataset = dataset.select(range(min(plain.max_samples, len(dataset))))
    training_args.model_init_kwargs = {"dtype": model_args.dtype or "auto"}
    training_args.include_num_input_tokens_seen = "non_padding"  # the recipe's count; the CLI takes only true/false
    trainer = SFTTrainer(model=model_args.model_name_or_path, args=training_args, train_dataset=dataset,
                         peft_config=get_peft_config(model_args))
    metrics = trainer.train().metrics
    trainer.save_model(training_args.output_dir)
    figures = {**metrics, "global_step": trainer.state.global_step,
               "num_input_tokens_seen": trainer.state.num_input_tokens_seen}
    Path(training_args.output_dir, "plain_result.json").write_text(json.dumps(figures, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
