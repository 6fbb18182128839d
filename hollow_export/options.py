"""What the command line accepts: click parameter types and the option groups several commands share.

In:  nothing (definitions only). Out: the value types (`Finite`, `Share` and the ranges `POSITIVE`, `SHARE`,
`COUNT`, ...), which refuse bad values with a message naming the fix, and decorators adding the shared
options (`model_options`, `plan_options`, `variant_option`, `overwrite_option`) and turning the plan
options into `plan_from_options` arguments (`plan_kwargs`). The commands themselves are in `cli.py`.
"""

from __future__ import annotations

import math

import click

from .hollow.plan import TARGET_PRESETS
from .models.registry import ARCHS, VARIANTS


class Finite(click.FloatRange):
    """A float range that also refuses nan and inf (click's FloatRange lets nan through)."""

    name = "finite float"

    def convert(self, value, param, ctx):
        value = super().convert(value, param, ctx)
        if not math.isfinite(value):
            self.fail(f"{value} is not a finite number", param, ctx)
        return value


class Share(Finite):
    """A share of U-Net parameters: a finite number between 0 and 1."""

    name = "share"

    def __init__(self):
        super().__init__(min=0, max=1)

    def convert(self, value, param, ctx):
        number = click.FLOAT.convert(value, param, ctx)  # "not a valid float" for text
        try:
            return super().convert(number, param, ctx)
        except click.BadParameter:
            self.fail(f"{value} is not between 0 and 1 (a share of U-Net parameters, e.g. 0.4)", param, ctx)


POSITIVE = Finite(min=0, min_open=True)
NON_NEGATIVE = Finite(min=0)
SHARE = Share()
BETA = Finite(min=0, max=1, max_open=True)
COUNT = click.IntRange(min=1)
SEED = click.IntRange(min=0, max=2**63 - 1)
SIDE = click.IntRange(min=8)
DEPTH = click.IntRange(min=0)
TIMED_STEPS = click.IntRange(min=2)  # the first step of a measurement is warm-up


def overwrite_option(what: str):
    return click.option("--overwrite", is_flag=True,
                        help=f"Replace an earlier {what} at --out (only if it holds nothing else).")


def variant_option(default_text="the plain weight files"):
    return click.option("--variant", type=click.Choice(VARIANTS), default=None,
                        help="Diffusers weight variant --model was saved as (fp16: diffusion_pytorch_model.fp16"
                             f".safetensors; computed in fp32). Default: {default_text}.")


def model_options(f):
    f = variant_option()(f)
    f = click.option("--arch", type=click.Choice(ARCHS), default=None,
                     help="Built-in architecture: tiny-toy (default: the tiny pipeline pretrained on the toy world, "
                          "models/tiny-toy), tiny (the same architecture, random weights), tiny-bk-small/"
                          "tiny-bk-tiny (small BK-SDM-shaped pipelines), or random weights for sd15, sd21, "
                          "bk-sdm-base/small/tiny.")(f)
    f = click.option("--model", type=click.Path(), default=None,
                     help="Local diffusers Stable Diffusion folder (loaded with from_pretrained, local files only).")(f)
    return f


def plan_options(f):
    for opt in reversed([
        click.option("--fraction", type=SHARE, default=None,
                     help="Target hollowed share of U-Net parameters (default 0.4, the paper's)."),
        click.option("--depth", type=DEPTH, default=None, help="Hollow depth k (innermost skip pairs removed)."),
        click.option("--rank", type=COUNT, default=128, show_default=True, help="LoRA rank."),
        click.option("--alpha", type=POSITIVE, default=None, help="LoRA alpha (default: equal to the rank)."),
        click.option("--targets", type=click.Choice(sorted(TARGET_PRESETS)), default="attn", show_default=True,
                     help="LoRA targets: attn = to_q/to_k/to_v/to_out.0 (the paper's); attn+conv adds resnet convs."),
        click.option("--blocks", default="", help="Block-wise LoRA: comma-separated blocks to adapt, "
                     "e.g. up_blocks.1,up_blocks.2 (default: every kept block)."),
        click.option("--resolution", type=SIDE, default=None, help="Image side in pixels (default: the model's)."),
    ]):
        f = opt(f)
    return f


def plan_kwargs(fraction, depth, rank, alpha, targets, blocks, resolution) -> dict:
    """The plan options as `hollow.plan.plan_from_options` takes them."""
    return dict(fraction=fraction, depth=depth, rank=rank, alpha=alpha, targets=targets, blocks=blocks,
                resolution=resolution)
