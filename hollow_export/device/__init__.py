"""What the phone runs, with ONNX Runtime and numpy only (no torch): rng, buffer, collect, train, export.

`android_demo/core` is the Kotlin twin, one file per job as here; `android_demo/PROTOCOL.md` the contract.
"""
