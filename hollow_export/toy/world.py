"""A toy world of captioned 128 px photos: the data the embedded pipeline is pretrained on (numpy + PIL, no torch).

In:  a seed (and, for a subject, how many photos).
Out: `Scene` values (what is in the picture), their caption ("a red striped ball on the beach") and their
     rendered RGB image (uint8 [128, 128, 3]).

One object per picture: a class (ball, box, cup, star, heart) with a colour, a surface pattern (plain,
striped, dotted, checked), a size, a position and a rotation, in one of five contexts whose backgrounds
differ at a glance (beach, snow, grass, night, indoors). Everything is a function of the seed.

Held out by rule: a patterned (class, colour, pattern) combination with `held_out(...)` true never
appears in the pretraining distribution (`sample_scene`); those combinations are the *subjects* that
personalization has to teach (`subject(seed)`, `subject_photos(seed, n)`). Every class, colour, pattern,
class x colour and class x pattern still appears in pretraining, so a subject is new only as a whole.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, replace

import numpy as np

RESOLUTION = 128
SUPERSAMPLE = 2  # shapes are drawn at 2x and box-filtered down: smooth edges without a blur pass

CLASSES = ("ball", "box", "cup", "star", "heart")
COLOURS = {
    "red": (214, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 220),
    "yellow": (245, 200, 30),
    "purple": (140, 50, 180),
    "orange": (245, 130, 20),
    "pink": (240, 120, 190),
}
COLOUR_NAMES = tuple(COLOURS)
PATTERNS = ("plain", "striped", "dotted", "checked")
CONTEXTS = ("beach", "snow", "grass", "night", "indoors")
CONTEXT_PHRASES = {
    "beach": "on the beach",
    "snow": "in the snow",
    "grass": "on the grass",
    "night": "at night",
    "indoors": "indoors",
}
INSTANCE_TOKEN = "sks"
# Every word the world's captions and prompts use: the pretrained pipeline's tokenizer has each as one token,
# as a real CLIP vocabulary has its common words (and the rare "sks", which pretraining never shows).
WORDS = tuple(dict.fromkeys(["a", *CLASSES, *COLOURS, *PATTERNS[1:],
                             *" ".join(CONTEXT_PHRASES.values()).split(), INSTANCE_TOKEN]))

# Caption ablation in pretraining: each attribute word is left out with this probability, so that short
# prompts ("a ball", "a ball on the beach") mean "any of them" and the class prompt has a real prior.
DROP_COLOUR = 0.15
DROP_PATTERN = 0.15
DROP_CONTEXT = 0.15


@dataclass(frozen=True)
class Scene:
    """What one picture shows; `render(scene)` draws it and `caption(scene)` describes it."""

    cls: str
    colour: str
    pattern: str
    context: str
    size: float  # object radius as a fraction of the image side
    cx: float  # centre, fraction of the image side
    cy: float
    angle: float  # object rotation, degrees
    pattern_angle: float  # stripes/checks rotation relative to the object, degrees
    pattern_scale: float  # stripe/dot/check period as a fraction of the object radius
    background_seed: int  # small variations of the background (horizon, clutter)
    say_colour: bool = True
    say_pattern: bool = True
    say_context: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


def held_out(cls: str, colour: str, pattern: str) -> bool:
    """True for the combinations pretraining never shows: patterned, and one class per (colour, pattern)."""
    if pattern == "plain":
        return False
    c, k, p = CLASSES.index(cls), COLOUR_NAMES.index(colour), PATTERNS.index(pattern)
    return (c + 2 * k + 3 * p) % len(CLASSES) == 0


HELD_OUT = tuple(
    (c, k, p) for c in CLASSES for k in COLOUR_NAMES for p in PATTERNS if held_out(c, k, p)
)
SEEN = tuple(
    (c, k, p) for c in CLASSES for k in COLOUR_NAMES for p in PATTERNS if not held_out(c, k, p)
)


# ----------------------------------------------------------------------------------------------- captions

def caption(scene: Scene) -> str:
    """The grammar: "a [colour] [pattern] class [context phrase]" with "plain" never said."""
    words = ["a"]
    if scene.say_colour:
        words.append(scene.colour)
    if scene.say_pattern and scene.pattern != "plain":
        words.append(scene.pattern)
    words.append(scene.cls)
    if scene.say_context:
        words.append(CONTEXT_PHRASES[scene.context])
    return " ".join(words)


def class_prompt(cls: str, context: str | None = None) -> str:
    """The DreamBooth class prompt ("a ball"), optionally in a context ("a ball on the beach")."""
    return f"a {cls}" + (f" {CONTEXT_PHRASES[context]}" if context else "")


def instance_prompt(cls: str, context: str | None = None) -> str:
    """The DreamBooth instance prompt ("a sks ball"), optionally in a context."""
    return f"a {INSTANCE_TOKEN} {cls}" + (f" {CONTEXT_PHRASES[context]}" if context else "")


def parse_prompt(prompt: str) -> dict:
    """The class and context a prompt asks for (None where it does not say): the judge's target."""
    words = prompt.lower().split()
    cls = next((c for c in CLASSES if c in words), None)
    context = next((k for k, phrase in CONTEXT_PHRASES.items() if phrase in prompt.lower()), None)
    colour = next((c for c in COLOUR_NAMES if c in words), None)
    pattern = next((p for p in PATTERNS[1:] if p in words), None)
    return {"cls": cls, "context": context, "colour": colour, "pattern": pattern}


# ------------------------------------------------------------------------------------------------ sampling

def _rng(*key) -> np.random.Generator:
    """An independent generator per key (stable across numpy versions: seeded from sha256, PCG64)."""
    digest = hashlib.sha256(repr(key).encode()).digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(digest[:8], "little")))


def _pose(rng: np.random.Generator) -> dict:
    size = float(rng.uniform(0.17, 0.30))
    return dict(
        size=size,
        cx=float(rng.uniform(0.5 - (0.48 - size) * 0.7, 0.5 + (0.48 - size) * 0.7)),
        cy=float(rng.uniform(0.55 - (0.45 - size) * 0.5, 0.55 + (0.45 - size) * 0.5)),
        angle=float(rng.uniform(-25, 25)),
        background_seed=int(rng.integers(0, 2**31)),
    )


def sample_scene(seed: int, split: str = "train") -> Scene:
    """One scene of the pretraining distribution (never a held-out combination). `split` names the stream."""
    rng = _rng("scene", split, int(seed))
    cls, colour, pattern = SEEN[int(rng.integers(len(SEEN)))]
    return Scene(
        cls=cls,
        colour=colour,
        pattern=pattern,
        context=CONTEXTS[int(rng.integers(len(CONTEXTS)))],
        pattern_angle=float(rng.uniform(-60, 60)),
        pattern_scale=float(rng.uniform(0.35, 0.6)),
        say_colour=bool(rng.random() >= DROP_COLOUR),
        say_pattern=bool(rng.random() >= DROP_PATTERN),
        say_context=bool(rng.random() >= DROP_CONTEXT),
        **_pose(rng),
    )


def sample_batch(start: int, n: int, split: str = "train") -> tuple[np.ndarray, list[str], list[Scene]]:
    """Images uint8 [n, 128, 128, 3], captions and scenes for seeds start .. start+n-1."""
    scenes = [sample_scene(s, split) for s in range(start, start + n)]
    return np.stack([render(s) for s in scenes]), [caption(s) for s in scenes], scenes


@dataclass(frozen=True)
class Subject:
    """A unique subject: a held-out combination with its own fixed pattern geometry."""

    seed: int
    cls: str
    colour: str
    pattern: str
    pattern_angle: float
    pattern_scale: float
    photo_contexts: tuple[str, ...]  # contexts the reference photos show
    novel_contexts: tuple[str, ...]  # contexts they never show: the prompts that test personalization

    @property
    def class_prompt(self) -> str:
        return class_prompt(self.cls)

    @property
    def instance_prompt(self) -> str:
        return instance_prompt(self.cls)

    @property
    def description(self) -> str:
        return f"a {self.colour} {self.pattern} {self.cls}"

    def to_dict(self) -> dict:
        return asdict(self)


def subject(seed: int) -> Subject:
    """The subject of `seed`: a held-out (class, colour, pattern) combination; any seed gives one."""
    rng = _rng("subject", int(seed))
    cls, colour, pattern = HELD_OUT[int(rng.integers(len(HELD_OUT)))]
    contexts = list(rng.permutation(len(CONTEXTS)))
    return Subject(
        seed=int(seed),
        cls=cls,
        colour=colour,
        pattern=pattern,
        pattern_angle=float(rng.uniform(-60, 60)),
        pattern_scale=float(rng.uniform(0.35, 0.6)),
        photo_contexts=tuple(CONTEXTS[i] for i in sorted(contexts[:2])),
        novel_contexts=tuple(CONTEXTS[i] for i in sorted(contexts[2:])),
    )


def subject_scenes(seed: int, n: int = 5) -> list[Scene]:
    """`n` (4-6 recommended) photos of the subject in varied poses, alternating its photo contexts."""
    sub = subject(seed)
    rng = _rng("subject-photos", int(seed))
    return [
        Scene(
            cls=sub.cls,
            colour=sub.colour,
            pattern=sub.pattern,
            context=sub.photo_contexts[i % len(sub.photo_contexts)],
            pattern_angle=sub.pattern_angle,
            pattern_scale=sub.pattern_scale,
            **_pose(rng),
        )
        for i in range(n)
    ]


def subject_photos(seed: int, n: int = 5) -> list[np.ndarray]:
    """The reference photos of subject `seed` (uint8 [128, 128, 3] each)."""
    return [render(s) for s in subject_scenes(seed, n)]


def save_subject_photos(seed: int, folder, n: int = 5) -> list:
    """Write the subject's photos as PNG files (the input a user gives `personalize --images`)."""
    from pathlib import Path

    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(subject_photos(seed, n)):
        path = folder / f"subject{seed}_{i}.png"
        Image.fromarray(img).save(path)
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------------ drawing

def _background(context: str, seed: int, side: int) -> np.ndarray:
    """float32 [side, side, 3] in 0..255: a context at a glance (sky/ground split, colours, clutter)."""
    rng = _rng("background", context, seed)
    y = np.linspace(0.0, 1.0, side, dtype=np.float32)[:, None, None]
    horizon = float(rng.uniform(0.35, 0.5))
    img = np.empty((side, side, 3), np.float32)

    def fill(rows, top, bottom):
        t = np.clip((y[rows] - y[rows].min()) / max(1e-6, float(np.ptp(y[rows]))), 0, 1)
        img[rows] = np.asarray(top, np.float32) * (1 - t) + np.asarray(bottom, np.float32) * t

    h = int(horizon * side)
    sky, ground = slice(0, h), slice(h, side)
    if context == "beach":
        fill(sky, (120, 185, 240), (185, 225, 250))
        sea = int(h + 0.12 * side)
        fill(slice(h, sea), (30, 110, 170), (60, 150, 190))
        fill(slice(sea, side), (235, 210, 150), (215, 185, 120))
    elif context == "snow":
        fill(sky, (170, 180, 195), (205, 212, 222))
        fill(ground, (245, 247, 252), (225, 232, 242))
    elif context == "grass":
        fill(sky, (90, 160, 235), (160, 205, 245))
        fill(ground, (90, 165, 60), (50, 120, 35))
    elif context == "night":
        fill(sky, (8, 10, 35), (25, 30, 70))
        fill(ground, (20, 25, 40), (10, 12, 20))
    elif context == "indoors":
        fill(sky, (200, 170, 140), (185, 155, 125))  # wall
        fill(ground, (140, 90, 50), (110, 65, 35))  # wooden floor
    else:
        raise ValueError(f"unknown context {context!r}")

    # Texture that tells the contexts apart beyond colour.
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    if context == "indoors":
        boards = (np.floor(xx * 8 + 0.3 * yy * 8) % 2 == 0) & (yy > horizon)
        img[boards] *= 0.88
        stripes = (np.floor(xx * 12) % 2 == 0) & (yy <= horizon)
        img[stripes] *= 0.94
    elif context == "night":
        n = 25
        sx, sy = rng.uniform(0, 1, n), rng.uniform(0, horizon * 0.9, n)
        for px, py in zip(sx, sy):
            r = 0.006 + 0.004 * rng.random()
            img[((xx - px) ** 2 + (yy - py) ** 2) < r * r] = (255, 250, 210)
        mx, my = rng.uniform(0.1, 0.9), rng.uniform(0.08, horizon * 0.6)
        img[((xx - mx) ** 2 + (yy - my) ** 2) < 0.06 ** 2] = (245, 240, 200)
    elif context == "snow":
        n = 60
        for px, py in zip(rng.uniform(0, 1, n), rng.uniform(0, 1, n)):
            img[((xx - px) ** 2 + (yy - py) ** 2) < 0.007 ** 2] = (255, 255, 255)
    elif context == "grass":
        blades = (np.sin(xx * 180 + np.sin(yy * 40) * 2) > 0.6) & (yy > horizon)
        img[blades] *= 0.8
    elif context == "beach":
        waves = (np.sin(xx * 60 + yy * 20) > 0.85) & (yy > horizon) & (yy < horizon + 0.12)
        img[waves] = (220, 235, 245)
    noise = rng.normal(0, 4, (side, side, 1)).astype(np.float32)
    return img + noise


def _shape_mask(scene: Scene, side: int) -> np.ndarray:
    """float32 [side, side] coverage of the object (PIL polygons/ellipses at the supersampled size)."""
    from PIL import Image, ImageDraw

    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    r = scene.size * side
    cx, cy = scene.cx * side, scene.cy * side
    a = math.radians(scene.angle)

    def rot(points):
        return [(cx + x * math.cos(a) - y * math.sin(a), cy + x * math.sin(a) + y * math.cos(a)) for x, y in points]

    if scene.cls == "ball":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif scene.cls == "box":
        s = r * 0.8
        d = r * 0.35  # depth of the visible top and side faces
        draw.polygon(rot([(-s, -s + d), (s - d, -s + d), (s - d, s), (-s, s)]), fill=255)  # front
        draw.polygon(rot([(-s, -s + d), (-s + d, -s), (s, -s), (s - d, -s + d)]), fill=200)  # top
        draw.polygon(rot([(s - d, -s + d), (s, -s), (s, s - d), (s - d, s)]), fill=160)  # side
    elif scene.cls == "cup":
        body = [(-0.7 * r, -0.8 * r), (0.55 * r, -0.8 * r), (0.4 * r, 0.85 * r), (-0.55 * r, 0.85 * r)]
        draw.polygon(rot(body), fill=255)
        # handle: a thick ring on the right
        hx, hy = 0.6 * r, -0.05 * r
        hcx, hcy = rot([(hx, hy)])[0]
        ro, ri = 0.42 * r, 0.22 * r
        draw.ellipse([hcx - ro, hcy - ro, hcx + ro, hcy + ro], fill=255)
        draw.ellipse([hcx - ri, hcy - ri, hcx + ri, hcy + ri], fill=0)
        draw.polygon(rot(body), fill=255)
        rim = [(-0.075 * r + 0.625 * r * math.cos(t), -0.8 * r + 0.14 * r * math.sin(t))
               for t in np.linspace(0, 2 * math.pi, 24, endpoint=False)]
        draw.polygon(rot(rim), fill=170)  # the opening, seen from slightly above
    elif scene.cls == "star":
        pts = []
        for i in range(10):
            rr = r if i % 2 == 0 else r * 0.45
            t = math.pi * i / 5 - math.pi / 2
            pts.append((rr * math.cos(t), rr * math.sin(t)))
        draw.polygon(rot(pts), fill=255)
    elif scene.cls == "heart":
        pts = []
        for i in range(60):
            t = 2 * math.pi * i / 60
            x = 16 * math.sin(t) ** 3
            y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
            pts.append((x * r / 17, y * r / 17 + 0.05 * r))
        draw.polygon(rot(pts), fill=255)
    else:
        raise ValueError(f"unknown class {scene.cls!r}")
    return np.asarray(mask, np.float32) / 255.0


def _texture(scene: Scene, side: int) -> np.ndarray:
    """float32 [side, side, 3]: the object's colour with its pattern, in the object's own frame."""
    base = np.asarray(COLOURS[scene.colour], np.float32)
    second = np.asarray((250, 250, 250), np.float32)
    r = scene.size * side
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    x, y = xx - scene.cx * side, yy - scene.cy * side
    a = math.radians(scene.angle + scene.pattern_angle)
    u = (x * math.cos(a) + y * math.sin(a)) / (r * scene.pattern_scale)
    v = (-x * math.sin(a) + y * math.cos(a)) / (r * scene.pattern_scale)
    if scene.pattern == "plain":
        on = np.zeros((side, side), bool)
    elif scene.pattern == "striped":
        on = np.floor(u * 2) % 2 == 1
    elif scene.pattern == "dotted":
        on = ((u - np.round(u)) ** 2 + (v - np.round(v)) ** 2) < 0.28 ** 2
    elif scene.pattern == "checked":
        on = (np.floor(u * 1.5) + np.floor(v * 1.5)) % 2 == 1
    else:
        raise ValueError(f"unknown pattern {scene.pattern!r}")
    tex = np.where(on[..., None], second, base)
    if scene.cls == "ball":  # a little shading makes a ball a sphere, not a disc
        d2 = ((x + 0.35 * r) ** 2 + (y + 0.35 * r) ** 2) / (1.6 * r) ** 2
        tex = tex * np.clip(1.15 - 0.55 * d2, 0.5, 1.15)[..., None]
    return tex


def render(scene: Scene) -> np.ndarray:
    """The picture of `scene`: uint8 [128, 128, 3]."""
    side = RESOLUTION * SUPERSAMPLE
    img = _background(scene.context, scene.background_seed, side)
    mask = _shape_mask(scene, side)
    coverage = (mask > 0).astype(np.float32)
    shade = np.where(mask > 0, 0.75 + 0.25 * mask, 1.0)  # box faces (and the cup's rim) darker
    tex = _texture(scene, side) * shade[..., None]
    # A soft shadow under the object grounds it in the scene.
    sh = np.roll(coverage, (int(0.04 * side), int(0.03 * side)), axis=(0, 1))
    img = img * (1 - 0.35 * sh[..., None] * (1 - coverage[..., None]))
    # A dark outline (coverage minus an eroded copy) keeps shapes readable on any background.
    eroded = coverage.copy()
    for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1), (2, 0), (-2, 0), (0, 2), (0, -2)):
        eroded = np.minimum(eroded, np.roll(coverage, (dy, dx), axis=(0, 1)))
    tex = np.where((coverage - eroded)[..., None] > 0, tex * 0.45, tex)
    img = img * (1 - coverage[..., None]) + tex * coverage[..., None]
    img = img.reshape(RESOLUTION, SUPERSAMPLE, RESOLUTION, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def with_caption_words(scene: Scene) -> Scene:
    """The scene with every attribute said in its caption (for evaluation prompts)."""
    return replace(scene, say_colour=True, say_pattern=True, say_context=True)
