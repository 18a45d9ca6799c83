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
"""
