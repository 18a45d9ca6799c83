"""From records to tables: the benchmark log (results/runs.jsonl), the comparison tables and plots of
`python -m harness.report`, one run's summary (`python -m harness.summary`), and FLOPs utilisation."""
