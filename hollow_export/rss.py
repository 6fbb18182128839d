"""This process's memory, as the kernel counts it: the one place RSS and peak RSS are read.

In:  nothing (the running process).
Out: current RSS, peak RSS (VmHWM; where /proc is missing, getrusage's ru_maxrss), and a reset
     of the peak counter where the kernel allows it. Torch-free: the device runtime uses it too.
"""

from __future__ import annotations

from pathlib import Path


def _status_kib(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def max_rss_bytes() -> int:
    """getrusage's ru_maxrss in bytes (on Linux it can keep a pre-exec parent's peak)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _status_bytes(field_name: str) -> int:
    """A /proc/self/status memory field in bytes (elsewhere: the peak RSS so far, from getrusage)."""
    kib = _status_kib(field_name)
    return max_rss_bytes() if kib is None else kib * 1024


def rss_bytes() -> int:
    """Current resident set size."""
    return _status_bytes("VmRSS")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kib("VmHWM") is not None
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident set size since the process started or `reset_peak_rss`."""
    return _status_bytes("VmHWM")
