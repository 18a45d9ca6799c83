"""Will it fit, and (being built, issue 28) how long? The planner: `python -m harness.plan` (see cli.py).

- gpus.py: GPU names, their memory and their data-sheet speeds (dense FLOP/s by dtype, memory bandwidth).
- architectures.py: model configs (the recipes' models built in; offline names, folders, Hub ids).
- memory.py: the plan of one run, from the model built on the meta device.
- work.py: the work of one optimizer step on that same meta model (FLOPs counted by PyTorch's FlopCounterMode,
  bytes moved by the optimizer, dequantization, casts): what the time plan will rest on.
- timing.py: seconds per step from the work and a speed (how far it is checked: TIME_MODEL_CHECKED).
- time_check.py: `python -m harness.plan.time_check`, predicted vs measured train time of a runs.jsonl's trials.
- speeds.py: a device's speed, from a calibration file (results/gpu/) or the data sheet.
- calibrate.py: `python -m harness.plan.calibrate`, measuring a device's achievable matmul FLOP/s and bandwidth.
- cli.py: the command: a table of every method x rank, or one recipe's breakdown.
"""
