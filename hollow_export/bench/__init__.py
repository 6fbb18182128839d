"""Local benchmarks: the paper's Table 1 (`memory`), the hollow-depth sweep (`sweep`), the ORT engine (`ort`).

cases (what a row holds and does) -> flops (counted) and measure (fresh child processes, RSS) ->
memory / sweep / ort (the three benchmarks) -> report (tables and PNG plots, shared with aihub).
How each number is measured: `measure.METHOD`, also written into every result.
"""
