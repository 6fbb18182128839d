"""`hollow-export bench floor` as a script: python tools/bench_floor.py [options] (--help lists them).

How each number is measured: `METHOD` in hollow_export/bench/measure.py, also written into every result.
"""

import sys

from hollow_export.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "floor", *sys.argv[1:]]))
