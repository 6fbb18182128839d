"""The U-Net as a flat sequence of units, and the hollow plan cut from it.

In:  a diffusers `UNet2DConditionModel` (real, random or on the meta device),
     a hollow depth `k` or a target hollowed fraction, and a `LoraSpec`.
Out: `walk(unet)` -> the list of `Unit`s; `make_plan(...)` -> a `HollowPlan`,
     a small JSON-serialisable value that every later stage takes as given.

Unit walk (the paper's Section 3, in diffusers' module names): `conv_in`, then down units (each
resnet(+attention) layer of a down block and each downsampler), each pushing
one skip tensor; the mid block; then up units (each resnet(+attention) layer
of an up block pops one skip; an upsampler closes an up block); then the
head. Depth `k` hollows the innermost `k` skip pairs: the last `k` skip
producers, the mid block, and every up unit before the `k+1`-th up layer.

U-Nets without a mid block (the BK-SDM family, `mid_block_type: null`) walk
the same way with no mid unit: depth `k` still hollows the innermost `k` skip
pairs, so depth 0 would hollow nothing and their depths start at 1 (the
innermost skip pair: the last down unit and the first up layer).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..errors import HollowError

SUPPORTED_DOWN = ("CrossAttnDownBlock2D", "DownBlock2D")
SUPPORTED_UP = ("CrossAttnUpBlock2D", "UpBlock2D")
SUPPORTED_MID = ("UNetMidBlock2DCrossAttn",)

# LoRA target presets: module-name suffixes inside the adapted blocks.
ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # the paper's set (207K params at r=1 on SD2.1)
TARGET_PRESETS = {
    "attn": ATTENTION_TARGETS,
    "attn+conv": ATTENTION_TARGETS + ("conv1", "conv2", "conv_shortcut"),
}


class PlanError(HollowError, ValueError):
    """A depth, fraction, resolution or U-Net variant the plan cannot serve (message names the fix)."""


@dataclass(frozen=True)
class Unit:
    """One step of the U-Net's forward: `kind` in stem|down|downsample|mid|up|upsample|head."""

    kind: str
    modules: tuple[str, ...]  # dotted module names in the U-Net, in call order
    skip: int | None = None  # index of the skip tensor pushed (down units) or popped (up layers)


@dataclass(frozen=True)
class LoraSpec:
    """What LoRA adapts: rank, alpha, target preset, and optionally only some blocks (Block-wise LoRA)."""

    rank: int = 128
    alpha: float | None = None  # None: alpha = rank (scale 1)
    targets: str = "attn"
    blocks: tuple[str, ...] = ()  # e.g. ("up_blocks.1", "up_blocks.2.attentions.0"); empty: all kept blocks

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    def selects(self, name: str) -> bool:
        """True if the module named `name` is a LoRA target under this spec."""
        if self.targets not in TARGET_PRESETS:
            raise PlanError(f"unknown LoRA targets {self.targets!r}; choose one of {', '.join(TARGET_PRESETS)}")
        if not any(name == s or name.endswith("." + s) for s in TARGET_PRESETS[self.targets]):
            return False
        if "attentions" not in name and "transformer_blocks" not in name and self.targets == "attn":
            return False
        return not self.blocks or any(name == b or name.startswith(b + ".") for b in self.blocks)


@dataclass
class HollowPlan:
    """What is hollowed and what is kept, with the numbers that follow from it."""

    depth: int
    max_depth: int  # valid depths: 0 (1 without a mid block) .. max_depth
    units: list[Unit]
    hollowed_modules: list[str]  # module names removed while fine-tuning
    kept_modules: list[str]  # module names of the kept layers (the HollowedNet, trained), original names
    precompute: list[str]  # module names on the precompute path
    unet_params: int
    hollowed_params: int
    kept_params: int
    precompute_params: int
    lora: LoraSpec
    lora_targets: list[str]
    lora_params: int
    resolution: int  # image pixels per side
    latent_shape: list[int]  # per sample: [C, H, W]
    buffer_shape: list[int]  # per sample: the hidden state entering the first kept up layer
    encoder_shape: list[int]  # per sample: [tokens, cross_attention_dim]
    kept_units: list[Unit] = field(default_factory=list)
    hollowed_units: list[Unit] = field(default_factory=list)

    @property
    def hollowed_fraction(self) -> float:
        return self.hollowed_params / self.unet_params

    @property
    def buffer_bytes_fp32(self) -> int:
        n = 4
        for d in self.buffer_shape:
            n *= d
        return n

    def to_json(self) -> dict:
        """The plan as the bundle format stores it (format v1 keys: `hollowed`, `kept`)."""
        out = asdict(self)
        out["hollowed"], out["kept"] = out.pop("hollowed_modules"), out.pop("kept_modules")
        out["hollowed_fraction"] = self.hollowed_fraction
        out["buffer_bytes_fp32"] = self.buffer_bytes_fp32
        out["lora"]["lora_alpha"] = self.lora.lora_alpha
        return out

    @staticmethod
    def from_json(data: dict) -> "HollowPlan":
        data = {k: v for k, v in data.items() if k not in ("hollowed_fraction", "buffer_bytes_fp32")}
        data["hollowed_modules"], data["kept_modules"] = data.pop("hollowed"), data.pop("kept")
        lora = dict(data.pop("lora"))
        lora.pop("lora_alpha", None)
        lora["blocks"] = tuple(lora.get("blocks", ()))
        units = {key: [Unit(u["kind"], tuple(u["modules"]), u["skip"]) for u in data.pop(key)]
                 for key in ("units", "kept_units", "hollowed_units")}
        return HollowPlan(lora=LoraSpec(**lora), **units, **data)


def check_supported(unet) -> None:
    """Raise PlanError naming what is unsupported, if the U-Net is not an SD-style U-Net."""
    cfg = unet.config
    problems = []
    if type(unet).__name__ != "UNet2DConditionModel":
        problems.append(f"model class {type(unet).__name__} (need UNet2DConditionModel)")
    for key in ("class_embed_type", "num_class_embeds", "addition_embed_type", "encoder_hid_dim",
                "time_cond_proj_dim", "time_embedding_act_fn"):
        if cfg.get(key) is not None:
            problems.append(f"{key}={cfg.get(key)!r} (SDXL/conditioning variants are not walked)")
    for i, block in enumerate(unet.down_blocks):
        if type(block).__name__ not in SUPPORTED_DOWN:
            problems.append(f"down_blocks.{i} is {type(block).__name__}")
    for i, block in enumerate(unet.up_blocks):
        if type(block).__name__ not in SUPPORTED_UP:
            problems.append(f"up_blocks.{i} is {type(block).__name__}")
    if unet.mid_block is not None and type(unet.mid_block).__name__ not in SUPPORTED_MID:
        problems.append(f"mid_block is {type(unet.mid_block).__name__}")
    if unet.conv_norm_out is None:
        problems.append("no conv_norm_out")
    if problems:
        raise PlanError(
            "this U-Net variant is not supported by the unit walk: " + "; ".join(problems)
            + ". Supported: Stable Diffusion 1.x/2.x U-Nets (blocks "
            + ", ".join(SUPPORTED_DOWN + SUPPORTED_MID + SUPPORTED_UP) + "; no mid block, as BK-SDM, is fine)."
        )


def walk(unet) -> list[Unit]:
    """The U-Net's forward as a flat list of units with their skip indices."""
    check_supported(unet)
    units = [Unit("stem", ("time_embedding",)), Unit("down", ("conv_in",), skip=0)]
    skip = 1
    for b, block in enumerate(unet.down_blocks):
        for i in range(len(block.resnets)):
            names = [f"down_blocks.{b}.resnets.{i}"]
            if hasattr(block, "attentions"):
                names.append(f"down_blocks.{b}.attentions.{i}")
            units.append(Unit("down", tuple(names), skip=skip))
            skip += 1
        if block.downsamplers is not None:
            units.append(Unit("downsample", (f"down_blocks.{b}.downsamplers.0",), skip=skip))
            skip += 1
    if unet.mid_block is not None:  # BK-SDM U-Nets have none: the last down unit feeds the first up layer
        units.append(Unit("mid", ("mid_block",)))
    for b, block in enumerate(unet.up_blocks):
        for i in range(len(block.resnets)):
            skip -= 1
            names = [f"up_blocks.{b}.resnets.{i}"]
            if hasattr(block, "attentions"):
                names.append(f"up_blocks.{b}.attentions.{i}")
            units.append(Unit("up", tuple(names), skip=skip))
        if block.upsamplers is not None:
            units.append(Unit("upsample", (f"up_blocks.{b}.upsamplers.0",)))
    units.append(Unit("head", ("conv_norm_out", "conv_out")))
    if skip != 0:
        raise PlanError(f"skip producers and up layers do not pair up (left over: {skip}); unsupported U-Net")
    return units


def split_units(units: list[Unit], depth: int) -> tuple[list[Unit], list[Unit]]:
    """(hollowed units, kept units) at hollow depth `depth`, each in forward order."""
    producers = [u for u in units if u.skip is not None and u.kind in ("down", "downsample")]
    cut_skip = len(producers) - depth  # skips with index >= cut_skip are hollowed pairs
    hollowed, kept = [], []
    up_layers_seen = 0
    for unit in units:
        if unit.kind in ("down", "downsample"):
            (hollowed if unit.skip >= cut_skip else kept).append(unit)
        elif unit.kind == "mid":
            hollowed.append(unit)
        elif unit.kind in ("up", "upsample"):
            if unit.kind == "up":
                up_layers_seen += 1
            # every up unit before the (depth+1)-th up layer is hollowed, upsamplers included
            (hollowed if up_layers_seen <= depth else kept).append(unit)
        else:
            kept.append(unit)
    return hollowed, kept


def max_depth(units: list[Unit]) -> int:
    """Deepest cut that still keeps `conv_in` and one up layer."""
    return sum(1 for u in units if u.kind in ("down", "downsample")) - 1


def min_depth(units: list[Unit]) -> int:
    """Shallowest cut that hollows something: 0 (the mid block alone), or 1 for a U-Net without a mid block."""
    return 0 if any(u.kind == "mid" for u in units) else 1


def depth_range_text(units: list[Unit]) -> str:
    """The valid depths in words, for error messages."""
    low = min_depth(units)
    what = "mid block only" if low == 0 else "the innermost skip pair; this U-Net has no mid block"
    return f"between {low} ({what}) and {max_depth(units)}"


def _param_count(unet, names) -> int:
    return sum(p.numel() for n in names for p in unet.get_submodule(n).parameters())


def _out_channels(unet, unit: Unit) -> int:
    module = unet.get_submodule(unit.modules[0])
    if unit.kind == "mid":
        return module.resnets[-1].out_channels
    return module.out_channels


def _buffer_shape(unet, units: list[Unit], hollowed: list[Unit], latent_hw: int) -> list[int]:
    downsamples = sum(1 for u in units if u.kind == "downsample")
    upsamples = sum(1 for u in hollowed if u.kind == "upsample")
    side = latent_hw // 2**downsamples * 2**upsamples
    last = [u for u in hollowed if u.kind in ("mid", "up")][-1]
    return [_out_channels(unet, last), side, side]


def depth_for_fraction(unet, fraction: float) -> int:
    """The hollow depth whose hollowed share of U-Net parameters is closest to `fraction`."""
    if not 0.0 < fraction < 1.0:
        raise PlanError(f"--fraction must lie strictly between 0 and 1 (got {fraction}); 0.4 is the paper's")
    units = walk(unet)
    total = sum(p.numel() for p in unet.parameters())
    shares = []
    depths = list(range(min_depth(units), max_depth(units) + 1))
    for depth in depths:
        hollowed, _ = split_units(units, depth)
        shares.append(abs(_param_count(unet, _names(hollowed)) / total - fraction))
    return depths[min(range(len(shares)), key=shares.__getitem__)]


def _names(units: list[Unit]) -> list[str]:
    return [n for u in units for n in u.modules]


def select_lora_targets(unet, lora: LoraSpec, within: list[str] | None = None) -> list[str]:
    """Names of the modules LoRA adapts under `lora`, restricted to modules under `within` (None: all)."""
    def inside(name):
        return within is None or any(name == k or name.startswith(k + ".") for k in within)
    return [name for name, _ in unet.named_modules() if name and inside(name) and lora.selects(name)]


def fan_in(weight) -> int:
    """Inputs per output of a Linear or Conv2d weight (or of a LoRA A matrix shaped like it)."""
    return weight.shape[1] * (weight[0, 0].numel() if weight.dim() == 4 else 1)


def lora_param_count(unet, targets: list[str], rank: int) -> int:
    """Parameters of rank-`rank` LoRA on `targets`: r * (fan_in + fan_out) per layer."""
    total = 0
    for name in targets:
        weight = unet.get_submodule(name).weight
        total += rank * (fan_in(weight) + weight.shape[0])
    return total


def make_plan(unet, depth: int | None = None, fraction: float | None = None,
              lora: LoraSpec | None = None, resolution: int | None = None, tokens: int = 77) -> HollowPlan:
    """Cut `unet` at `depth`, or at the depth closest to `fraction` of its parameters."""
    units = walk(unet)
    deepest = max_depth(units)
    if (depth is None) == (fraction is None):
        raise PlanError("give exactly one of --depth K or --fraction F")
    if depth is None:
        depth = depth_for_fraction(unet, fraction)
    if not min_depth(units) <= depth <= deepest:
        raise PlanError(f"--depth must be {depth_range_text(units)} for this U-Net (got {depth})")
    lora = lora or LoraSpec()
    if lora.rank < 1:
        raise PlanError(f"--rank must be at least 1 (got {lora.rank})")
    vae_scale = 8
    resolution = resolution or unet.config.sample_size * vae_scale
    latent_hw = resolution // vae_scale
    downsamples = sum(1 for u in units if u.kind == "downsample")
    if resolution % vae_scale or latent_hw % 2**downsamples:
        raise PlanError(f"--resolution must be a multiple of {vae_scale * 2**downsamples} (got {resolution})")
    hollowed, kept = split_units(units, depth)
    hollowed_names, kept_names = _names(hollowed), _names(kept)
    precompute_units = [u for u in units if u.kind in ("stem", "down", "downsample")] + hollowed
    precompute_names = list(dict.fromkeys(_names(precompute_units)))
    targets = select_lora_targets(unet, lora, kept_names)
    if not targets:
        raise PlanError("the LoRA spec selects no module among the kept layers; check --targets/--blocks")
    return HollowPlan(
        depth=depth,
        max_depth=deepest,
        units=units,
        hollowed_modules=hollowed_names,
        kept_modules=kept_names,
        precompute=precompute_names,
        unet_params=sum(p.numel() for p in unet.parameters()),
        hollowed_params=_param_count(unet, hollowed_names),
        kept_params=_param_count(unet, kept_names),
        precompute_params=_param_count(unet, precompute_names),
        lora=lora,
        lora_targets=targets,
        lora_params=lora_param_count(unet, targets, lora.rank),
        resolution=resolution,
        latent_shape=[unet.config.in_channels, latent_hw, latent_hw],
        buffer_shape=_buffer_shape(unet, units, hollowed, latent_hw),
        encoder_shape=[tokens, unet.config.cross_attention_dim],
        kept_units=kept,
        hollowed_units=hollowed,
    )


DEFAULT_FRACTION = 0.4  # the paper's


def plan_from_options(unet, fraction: float | None = None, depth: int | None = None, rank: int = 128,
                      alpha: float | None = None, targets: str = "attn", blocks: str = "",
                      resolution: int | None = None) -> HollowPlan:
    """The plan from command-line style options: `blocks` comma-separated, fraction 0.4 if neither is given."""
    if fraction is None and depth is None:
        fraction = DEFAULT_FRACTION
    spec = LoraSpec(rank=rank, alpha=alpha, targets=targets,
                    blocks=tuple(b.strip() for b in blocks.split(",") if b.strip()))
    return make_plan(unet, depth=depth, fraction=fraction, lora=spec, resolution=resolution)


def decimal_bytes(n: int) -> str:
    """1,310,720 -> '1.31 MB', 2,048 -> '2.05 kB', 512 -> '512 bytes' (three significant digits)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}" if n / size < 100 else f"{n / size:.0f} {unit}"
    return f"{n} bytes"


def plan_table(plan: HollowPlan) -> str:
    """The plan as a short readable table."""
    def m(n):
        return f"{n / 1e6:,.2f}M"
    rows = [
        ("hollow depth", f"{plan.depth} of {min_depth(plan.units)}..{plan.max_depth}"),
        ("hollowed fraction", f"{plan.hollowed_fraction:.1%} of U-Net parameters"),
        ("U-Net parameters", f"{plan.unet_params:,} ({m(plan.unet_params)})"),
        ("hollowed (removed) params", f"{plan.hollowed_params:,} ({m(plan.hollowed_params)})"),
        ("kept (trained) base params", f"{plan.kept_params:,} ({m(plan.kept_params)})"),
        ("precompute-path params", f"{plan.precompute_params:,} ({m(plan.precompute_params)})"),
        ("LoRA", f"rank {plan.lora.rank}, alpha {plan.lora.lora_alpha:g}, targets {plan.lora.targets}"
                 + (f", blocks {', '.join(plan.lora.blocks)}" if plan.lora.blocks else "")),
        ("LoRA params", f"{plan.lora_params:,} ({m(plan.lora_params)}) in {len(plan.lora_targets)} layers"),
        ("resolution", f"{plan.resolution} px -> latent {'x'.join(map(str, plan.latent_shape))}"),
        ("buffer per sample", f"{'x'.join(map(str, plan.buffer_shape))} fp32 = "
                              f"{decimal_bytes(plan.buffer_bytes_fp32)}"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines.append("hollowed modules:")
    lines += [f"  - {n}" for n in plan.hollowed_modules]
    return "\n".join(lines)



def plan_for_model(model: str | None = None, arch: str | None = None, variant: str | None = None,
                   **plan_options) -> HollowPlan:
    """`hollow-export plan`: the plan of a model's U-Net, built on the meta device (no weights read)."""
    from ..models.load import load_unet

    return plan_from_options(load_unet(model, arch, meta=True, variant=variant), **plan_options)
