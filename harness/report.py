"""`python -m harness.report`: the benchmark tables and plots, rebuilt from results/runs.jsonl.
A door: the work is harness.reporting.page's."""
import sys

from harness.reporting.page import main

if __name__ == "__main__":
    sys.exit(main())
