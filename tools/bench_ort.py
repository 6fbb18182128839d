"""`hollow-export bench ort` as a script: python tools/bench_ort.py [options] (--help lists them).

How each number is measured: the docstring of hollow_export/profile.py, also written into every result.
"""

import sys

from hollow_export.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "ort", *sys.argv[1:]]))
