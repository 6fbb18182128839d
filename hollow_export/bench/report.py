"""Tables and PNG plots of benchmark results (the AI Hub profile uses the same table).

In:  a result dict (settings, rows) and an output folder and file stem.
Out: text tables (`format_table`, `settings_text`), number formats, atomic PNG figures and
     `write_outputs`: the result as JSON plus its plot; `earlier_result`, a written result read back
     for `--merge`.
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import store
from .cases import BenchError

GB = 1e9


def _fmt_bytes(n) -> str:
    return "-" if n is None else f"{n / GB:.3f}"


def _fmt_ratio(x) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _fmt_params(n) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    def line(cells):
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def settings_text(settings: dict) -> str:
    keys = [k for k in settings if not isinstance(settings[k], (list, dict))]
    return "\n".join(f"  {k}: {settings[k]:.4f}" if isinstance(settings[k], float) else f"  {k}: {settings[k]}"
                     for k in keys)


def _flops_unit(rows: list[dict]) -> tuple[float, str]:
    top = max((r["flops"]["step"] for r in rows if r.get("flops")), default=0)
    return (1e12, "TFLOPs") if top >= 1e11 else (1e9, "GFLOPs")


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: Path, title: str) -> None:
    """Title `fig`, lay it out, write it to `path` as PNG (atomically) and close it."""
    fig.suptitle(title)
    fig.tight_layout()
    with store.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    _pyplot().close(fig)


def write_outputs(result: dict, out: Path, stem: str, plot_fn, extra: dict | None = None) -> dict:
    """`<stem>.json` (the result, with a `files` entry: these two and the `extra` files written beside
    them) and `<stem>.png` (its plot) in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / f"{stem}.json", out / f"{stem}.png"
    result["files"] = {"json": str(json_path), "png": str(png_path), **(extra or {})}
    store.write_json(json_path, result)
    plot_fn(result, png_path)
    return result


def earlier_result(path: Path, settings: dict, keys: tuple[str, ...]) -> dict | None:
    """The result written at `path` for `--merge`, or None if there is none; refused (BenchError) when it
    was measured with other `keys` settings than `settings`."""
    if not path.exists():
        return None
    found = json.loads(path.read_text())
    theirs = found["settings"]
    if not all(theirs.get(k) == settings[k] for k in keys):
        raise BenchError(f"--merge: {path} was measured with other settings "
                         f"({', '.join(f'{k}={theirs.get(k)}' for k in keys)}); "
                         "drop --merge or pick another --out")
    return found
