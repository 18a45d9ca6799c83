"""Data and tasks: reading data files and Hub datasets, detecting their format, chat templates and which tokens
train, tokenizing with truncation that keeps the answer, and the task readers (classification, instructions,
preference pairs, GSM8K problems)."""
