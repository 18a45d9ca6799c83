"""`python -m harness.summary RESULT_JSON`: a markdown summary of one run's result.json.
A door: the work is harness.reporting.summary's."""
import sys

from harness.reporting.summary import main

if __name__ == "__main__":
    sys.exit(main())
