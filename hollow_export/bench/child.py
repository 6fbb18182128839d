"""The entry point of a benchmark child process: `python -m hollow_export.bench.child SPEC.json OUT.json`.

In:  a job spec written by `measure.run_child`.
Out: the job's result as JSON in OUT.json. `ort_measure` runs with torch, diffusers, transformers
     and peft blocked, as on the phone.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    job = spec["job"]
    if job == "case":
        from .memory import child_case
        result = child_case(spec)
    elif job == "ort_build":
        from .ort import child_ort_build
        result = child_ort_build(spec)
    elif job == "ort_measure":
        for name in ("torch", "diffusers", "transformers", "peft"):
            sys.modules[name] = None  # as on the phone: onnxruntime's optional torch import now fails fast
        from .ort import child_ort_measure
        result = child_ort_measure(spec)
    else:
        raise SystemExit(f"unknown job {job}")
    Path(argv[1]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m hollow_export.bench.child SPEC.json OUT.json (internal)")
    sys.exit(main(sys.argv[1:]))
