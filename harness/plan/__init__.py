"""Will it fit? The memory planner: `python -m harness.plan` (see cli.py).

- gpus.py: GPU names and their memory.
- architectures.py: model configs (the recipes' models built in; offline names, folders, Hub ids).
- memory.py: the plan of one run, from the model built on the meta device.
- cli.py: the command: a table of every method x rank, or one recipe's breakdown.
"""
