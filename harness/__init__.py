"""Shared machinery for the fine-tuning recipes in recipes/.

One module per concern:
  config      - dataclass arguments, recipe defaults, YAML/JSON config files, CLI parsing
  errors      - UserError and the one-line error reporting used by every entry point
  offline_models, convert_llama2c - models that work without the Hub
  models      - model/tokenizer loading, quantization, device placement
  data        - reading data files, prompt formats, tokenization with loss masks
  methods     - PEFT method configs, target-module presets, the AdaLoRA schedule
  training    - Trainer construction and callbacks (AdaLoRA allocation, timing)
  evaluation  - answer-token accuracy and task scores (label likelihood classification)
  measure     - peak memory, timers, provenance, result.json
  recipe      - the end-to-end flow every recipe runs
  backends    - where the trainable model comes from: transformers + PEFT, or Unsloth (GPU, optional)
  adapters    - a trained adapter folder: checks, its run record, attaching it to a base model
  infer, merge - `python -m` entry points: generation / chat with an adapter, merging it into the base
  select      - picking the k most valuable instruction records (`python -m harness.select`)
  curriculum  - easy / medium / hard buckets and stage-by-stage training from the previous adapter
  generation  - answering prompts over a temperature x top_p grid, ROUGE-L
  judge       - LLM judge (OpenAI-compatible endpoint or local model), its cache and score tables
  select_train_judge - the select -> train -> decode -> judge flow of llama2_7b_lora_alpaca100.py
"""
