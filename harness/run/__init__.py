"""The run: its settings (config), their checks, its output folder, the flow every recipe runs, its record
(result.json), measuring it, and what changes when `accelerate launch` starts several processes."""
