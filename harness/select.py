"""`python -m harness.select`: pick the k most valuable instruction records (the alpaca100 experiment's first step).
A door: the work is harness.alpaca100.select's."""
import sys

from harness.alpaca100.select import main

if __name__ == "__main__":
    sys.exit(main())
