"""Models and methods: loading and quantizing a model, the PEFT methods and their settings, the backends that
make the trainable model (transformers + PEFT, or Unsloth), trained adapter folders, and the offline models
(with the llama2.c converter) that work without the Hub."""
