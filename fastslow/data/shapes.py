"""Built-in synthetic retrieval data: compositional shape scenes (images) and moving shapes (videos).

The shapes data is the project's default dataset. It is written to disk in the Karpathy format (images) and in
the VATEX format (videos), so the real loaders read it unchanged, and it is built to exercise the two things the
method is about.

**Why minimal pairs (the Fast/Slow gap must be real).** The val and test splits are made of groups of
``group_size`` scenes that hold the same objects with one thing swapped: the positions of the two described
objects (their relation), their colours, their shapes or their sizes. Within a group the full captions use the
same bag of words ("a small red circle left of a large blue square" vs "a small blue circle left of a large red
square" vs "a large blue square left of a small red circle"), and the images share their pixel statistics, so a
model must bind each attribute to the right object and the relation to the right order. A cross-attention
captioner can look at the object a word is about; a dual encoder has to squeeze the binding into one vector. Every
test caption is true of its own image and of no other image of the whole split (checked by the generator with
:func:`caption_fits` under a lenient relation margin of 0, and asserted again in the tests), so a miss is a real
miss, never an unlucky tie. For video the groups pair each clip with its exact time reversal (same frames in
reverse order, so any order-blind pooling of frame features sees identical input) and with its order swap
("left then up" vs "up then left": same words, different order), plus attribute swaps between two objects.

**Why partial captions (distillation must be useful).** Train captions say more or less, as real captions do:
some are full (two objects with size, colour, shape and their relation), others drop attributes ("a circle left
of a square"), replace an object by "something" ("something above a blue square") or name a single object ("a
red circle"). A partial caption is true of many images, so some in-batch "negatives" are in fact positives; a
captioner teacher scores them high and its soft scores carry information that one-hot contrastive labels do not.
Every caption keeps a structured spec next to its text (``shapes_meta.json``), and :func:`caption_fits` /
:func:`video_caption_fits` decide whether a spec is true of a scene, so false in-batch negatives can be measured.

**Canonicalisation.** "A left of B" and "B right of A" state one fact. Specs are stored in canonical form: the
relation is always ``left`` or ``above`` (``right``/``below`` swap the two objects), and video conjunctions list
their clauses in a fixed order. The raw text may use either surface form; each val/test image gets the canonical
sentence and its paraphrase (``test_captions_per_image=2``), both true of that image only. A relation caption is
generated only when the two centres differ by more than ``REL_MARGIN`` along its axis, so it is never ambiguous.

**Video features.** VATEX ships I3D clip features; we have no I3D, so each frame is rendered small
(``frame_size``), and mapped by a fixed Rademacher (+-1) random projection, seeded independently of the data seed
(like a fixed pretrained extractor), to ``feature_dim`` floats. A frame shows only where the objects are and what
they look like; the motion order exists only in the sequence. The projection runs on integer pixel values with
+-1 weights, so every partial sum is an exact float32 integer and the features are bit-identical whatever BLAS
and thread count computes them.

Layout written by :func:`generate_shapes`::

    out_dir/dataset_shapes.json     Karpathy format (no "filepath": images live directly in out_dir/images/)
    out_dir/images/{split}_{i:06d}.png
    out_dir/shapes_meta.json        scene + caption specs per image (the Karpathy reader ignores it)

Layout written by :func:`generate_shapes_video`::

    out_dir/vatex_training_v1.0.json     [{videoID, enCap[10], chCap[10]}], train videos
    out_dir/vatex_validation_v1.0.json   val videos first, then test videos (``summary["n_val"]`` are val)
    out_dir/features/<videoID>.npy       float32, (1, T, D) for even global index, (T, D) for odd (both VATEX shapes)
    out_dir/shapes_video_meta.json       video + caption specs per video

``chCap`` holds 10 empty strings per video: the shapes data has no Chinese captions, but the field and its length
are part of the VATEX format.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "ATTRS",
    "COLORS",
    "DIRECTIONS",
    "REL_MARGIN",
    "SHAPES",
    "SIZES",
    "canonicalize",
    "canonicalize_video",
    "caption_fits",
    "caption_text",
    "generate_shapes",
    "generate_shapes_video",
    "is_full_caption",
    "is_full_video_caption",
    "render_scene",
    "render_video_frames",
    "frame_features",
    "video_caption_fits",
]

# ----------------------------------------------------------------------------------------------------------------
# Vocabulary
# ----------------------------------------------------------------------------------------------------------------

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
# Well separated in hue *and* in the G channel, so they stay distinct after the 2x box downsampling at 64x64
# and after the random projection of the video frames.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 45, 45),
    "green": (45, 175, 70),
    "blue": (50, 100, 240),
    "yellow": (240, 215, 40),
    "purple": (165, 70, 215),
    "white": (240, 240, 240),
}
SIZES = ("small", "large")
ATTRS = ("size", "color", "shape")  # also the word order of a description: "a small red circle"
DIRECTIONS = ("left", "right", "up", "down")

# Normalised radii (fraction of the image side). A small object is ~5 px at 64x64, large ~10 px: both shapes stay
# recognisable and the size difference is never in doubt (jitter is only +-5%).
IMAGE_RADIUS = {"small": 0.085, "large": 0.15}
VIDEO_RADIUS = {"small": 0.11, "large": 0.17}
_RADIUS_JITTER = 0.05
_PAD = 0.02  # keep objects this far inside the border
_GAP = 0.04  # minimum free space between two objects

# A relation is stated only when the centres differ by more than this along its axis (~10 px at 64x64), so a
# generated relation caption is never ambiguous. The exclusivity check of val/test uses margin 0 instead (a
# distractor must not even weakly satisfy another image's caption).
REL_MARGIN = 0.15

_INVERSE = {"left": "right", "right": "left", "above": "below", "below": "above"}
_CANONICAL = {"left": "left", "above": "above", "right": "left", "below": "above"}
_REL_TEXT = {"left": "left of", "right": "right of", "above": "above", "below": "below"}
_REVERSE_DIR = {"left": "right", "right": "left", "up": "down", "down": "up"}
_DIR_VEC = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}  # y grows downwards
_VERBS = ("moves", "goes", "slides", "travels", "glides")
_VIDEO_CAPTIONS = 10  # VATEX: exactly 10 English captions per video
_PROJECTION_SEED = 20210617  # fixed "feature extractor", independent of the data seed
_SUPERSAMPLE = 2  # draw at 2x and box-downsample: cheap anti-aliasing, keeps small shapes readable

Desc = dict[str, Any]  # {"size": str | None, "color": str | None, "shape": str | None}
Spec = dict[str, Any]
Scene = dict[str, Any]
Video = dict[str, Any]


# ----------------------------------------------------------------------------------------------------------------
# Image captions: structure, semantics, text
# ----------------------------------------------------------------------------------------------------------------


def _desc(obj: dict[str, Any], keep: tuple[str, ...] = ATTRS) -> Desc:
    return {k: (obj[k] if k in keep else None) for k in ATTRS}


def _desc_matches(desc: Desc, obj: dict[str, Any]) -> bool:
    return all(desc.get(k) is None or desc[k] == obj[k] for k in ATTRS)


def _desc_is_full(desc: Desc | None) -> bool:
    return desc is not None and all(desc.get(k) is not None for k in ATTRS)


def _desc_text(desc: Desc) -> str:
    words = [desc[k] for k in ("size", "color") if desc.get(k)]
    if desc.get("shape") is None and not words:
        return "something"
    words.append(desc.get("shape") or "shape")
    article = "an" if words[0][0] in "aeiou" else "a"
    return f"{article} {' '.join(words)}"


def _relation_holds(rel: str, a: dict[str, Any], b: dict[str, Any], margin: float) -> bool:
    if rel == "left":
        return b["x"] - a["x"] > margin
    if rel == "right":
        return a["x"] - b["x"] > margin
    if rel == "above":  # image y grows downwards
        return b["y"] - a["y"] > margin
    if rel == "below":
        return a["y"] - b["y"] > margin
    raise ValueError(f"unknown relation {rel!r}; expected one of {sorted(_INVERSE)}")


def canonicalize(spec: Spec) -> Spec:
    """Return the canonical form of an image caption spec.

    "B right of A" becomes "A left of B" and "B below A" becomes "A above B", so two paraphrases of one fact have
    equal specs.

    Args:
        spec: ``{"a": Desc, "rel": "left"|"right"|"above"|"below"|None, "b": Desc|None}``; a Desc is
            ``{"size", "color", "shape"}`` with ``None`` for an unstated attribute.

    Returns:
        A new spec whose ``rel`` is ``left``, ``above`` or ``None``.
    """
    rel = spec.get("rel")
    a, b = dict(spec["a"]), (dict(spec["b"]) if spec.get("b") is not None else None)
    if rel is None:
        return {"a": a, "rel": None, "b": None}
    if rel in ("right", "below"):
        a, b = b, a
    return {"a": a, "rel": _CANONICAL[rel], "b": b}


def caption_fits(spec: Spec, scene: Scene, *, margin: float = REL_MARGIN) -> bool:
    """Decide whether an image caption is true of a scene.

    Existential semantics: "a red circle left of a blue square" is true when some red circle and some other blue
    square stand in that relation; unstated attributes match anything ("something" matches every object).

    Args:
        spec: caption spec (canonical or not), see :func:`canonicalize`.
        scene: ``{"objects": [{"shape", "color", "size", "x", "y", "r"}, ...], ...}``; ``x``, ``y`` are the
            normalised centre (0..1, y downwards).
        margin: a relation holds when the centres differ by more than this along its axis. The default is the
            margin used to generate captions; 0 gives the lenient reading used to check that distractors are true
            distractors.

    Returns:
        True when the caption is true of the scene.
    """
    objs = scene["objects"]
    cands_a = [o for o in objs if _desc_matches(spec["a"], o)]
    rel = spec.get("rel")
    if rel is None:
        return bool(cands_a)
    cands_b = [o for o in objs if _desc_matches(spec["b"], o)]
    return any(oa is not ob and _relation_holds(rel, oa, ob, margin) for oa in cands_a for ob in cands_b)


def is_full_caption(spec: Spec) -> bool:
    """True for a fully specified image caption: a relation between two objects with all attributes stated."""
    return spec.get("rel") is not None and _desc_is_full(spec["a"]) and _desc_is_full(spec.get("b"))


def caption_text(spec: Spec) -> str:
    """Render an image caption spec as lowercase words, e.g. ``"a small red circle left of a large blue square"``.

    The relation is written as given (``right`` stays "right of"), so a non-canonical spec renders the paraphrase.
    """
    text = _desc_text(spec["a"])
    if spec.get("rel") is None:
        return text
    return f"{text} {_REL_TEXT[spec['rel']]} {_desc_text(spec['b'])}"


def _parse_desc(words: list[str]) -> Desc | None:
    if words == ["something"]:
        return {k: None for k in ATTRS}
    if len(words) < 2 or words[0] != ("an" if words[1][0] in "aeiou" else "a"):
        return None
    words, desc = words[1:], {k: None for k in ATTRS}
    if words[-1] != "shape":
        desc["shape"] = words[-1]
        if desc["shape"] not in SHAPES:
            return None
    rest = words[:-1]
    if rest and rest[0] in SIZES:
        desc["size"], rest = rest[0], rest[1:]
    if rest and rest[0] in COLORS:
        desc["color"], rest = rest[0], rest[1:]
    if rest or (words[-1] == "shape" and desc["size"] is None and desc["color"] is None):
        return None  # words out of order ("a red small circle") or a bare "a shape": never generated
    return desc


def parse_caption(text: str) -> Spec | None:
    """The spec of an image caption written by :func:`caption_text`, or None when ``text`` is not one.

    Used to judge texts the generator never wrote (a caption with two words swapped, as the distillation's
    oracle does): a string outside the caption grammar is true of no scene.
    """
    words = text.split()
    for rel, phrase in _REL_TEXT.items():
        rel_words = phrase.split()
        for i in range(1, len(words) - len(rel_words) + 1):
            if words[i : i + len(rel_words)] == rel_words:
                a, b = _parse_desc(words[:i]), _parse_desc(words[i + len(rel_words) :])
                return None if a is None or b is None else {"a": a, "rel": rel, "b": b}
    desc = _parse_desc(words)
    return None if desc is None else {"a": desc, "rel": None, "b": None}


def _obj_type(obj: dict[str, Any]) -> tuple[str, str, str]:
    return (obj["size"], obj["color"], obj["shape"])


# ----------------------------------------------------------------------------------------------------------------
# Image scenes
# ----------------------------------------------------------------------------------------------------------------


def _sample_objects(rng: np.random.Generator, n: int, radius: dict[str, float]) -> list[dict[str, Any]]:
    # Distinct (shape, colour) per scene: a description then names one object, which keeps captions readable
    # and attribute swaps meaningful. Sizes are free.
    combos = rng.choice(len(SHAPES) * len(COLORS), size=n, replace=False)
    colors = list(COLORS)
    objs = []
    for c in combos:
        size = SIZES[int(rng.integers(len(SIZES)))]
        r = radius[size] * (1.0 + float(rng.uniform(-_RADIUS_JITTER, _RADIUS_JITTER)))
        objs.append(
            {
                "shape": SHAPES[int(c) // len(colors)],
                "color": colors[int(c) % len(colors)],
                "size": size,
                "x": 0.0,
                "y": 0.0,
                "r": round(r, 4),
            }
        )
    return objs


def _fits_canvas(objs: list[dict[str, Any]]) -> bool:
    for i, o in enumerate(objs):
        if not (o["r"] + _PAD <= o["x"] <= 1 - o["r"] - _PAD and o["r"] + _PAD <= o["y"] <= 1 - o["r"] - _PAD):
            return False
        for p in objs[:i]:
            if math.hypot(o["x"] - p["x"], o["y"] - p["y"]) < o["r"] + p["r"] + _GAP:
                return False
    return True


def _place_objects(rng: np.random.Generator, objs: list[dict[str, Any]], tries: int = 100) -> bool:
    # Rejection sampling of continuous centres; coordinates are rounded to 4 decimals *before* any check, so the
    # stored scene is exactly what was rendered and judged.
    for i, o in enumerate(objs):
        lo, hi = o["r"] + _PAD, 1 - o["r"] - _PAD
        for _ in range(tries):
            o["x"], o["y"] = (round(float(v), 4) for v in rng.uniform(lo, hi, size=2))
            if _fits_canvas(objs[: i + 1]):
                break
        else:
            return False
    return True


def _clear_facts(scene: Scene) -> list[tuple[int, str, int]]:
    """All canonical relations (i, left|above, j) that hold with the generation margin."""
    objs = scene["objects"]
    return [
        (i, rel, j)
        for i, j in itertools.permutations(range(len(objs)), 2)
        for rel in ("left", "above")
        if _relation_holds(rel, objs[i], objs[j], REL_MARGIN)
    ]


def _sample_scene(rng: np.random.Generator, n_objects: tuple[int, int]) -> Scene:
    while True:
        n = int(rng.integers(n_objects[0], n_objects[1] + 1))
        objs = _sample_objects(rng, n, IMAGE_RADIUS)
        scene = {"objects": objs, "background": int(rng.integers(35, 71))}
        if _place_objects(rng, objs) and _clear_facts(scene):
            return scene


def _scene_key(scene: Scene) -> tuple:
    return tuple(sorted((_obj_type(o), o["x"], o["y"]) for o in scene["objects"]))


def _swap_variant(scene: Scene, ia: int, ib: int, swaps: tuple[str, ...]) -> Scene | None:
    out = copy.deepcopy(scene)
    a, b = out["objects"][ia], out["objects"][ib]
    for k in swaps:
        keys = ("x", "y") if k == "position" else ("size", "r") if k == "size" else (k,)
        for key in keys:
            a[key], b[key] = b[key], a[key]
    objs = out["objects"]
    if len({(o["shape"], o["color"]) for o in objs}) < len(objs) or not _fits_canvas(objs):
        return None
    return out


def _focus_fact(scene: Scene, ia: int, ib: int, axis: str) -> tuple[int, str, int]:
    a, b = scene["objects"][ia], scene["objects"][ib]
    coord = "x" if axis == "left" else "y"
    return (ia, axis, ib) if a[coord] < b[coord] else (ib, axis, ia)


def _sample_group(rng: np.random.Generator, group_size: int, n_objects: tuple[int, int]) -> list[dict[str, Any]]:
    """One minimal-pair group: a base scene and variants with the focus pair's position/colour/shape/size swapped."""
    swap_kinds = ("position", "color", "shape", "size")
    while True:
        base = _sample_scene(rng, n_objects)
        objs = base["objects"]
        # The focus pair must differ in shape and colour, so every swap changes what a full caption says.
        facts = [
            f
            for f in _clear_facts(base)
            if objs[f[0]]["shape"] != objs[f[2]]["shape"] and objs[f[0]]["color"] != objs[f[2]]["color"]
        ]
        if not facts:
            continue
        ia, axis, ib = facts[int(rng.integers(len(facts)))]
        # Single swaps first (the minimal pairs proper), then double and triple swaps if the group needs more.
        pool = []
        for k in (1, 2, 3):
            combos = list(itertools.combinations(swap_kinds, k))
            pool += [combos[i] for i in rng.permutation(len(combos))]
        members = [{"scene": base, "variant": "base", "fact": _focus_fact(base, ia, ib, axis)}]
        seen = {_scene_key(base)}
        for swaps in pool:
            if len(members) == group_size:
                break
            var = _swap_variant(base, ia, ib, swaps)
            if var is None or _scene_key(var) in seen:
                continue
            seen.add(_scene_key(var))
            members.append({"scene": var, "variant": "+".join(swaps), "fact": _focus_fact(var, ia, ib, axis)})
        if len(members) == group_size:
            return members


def _fact_spec(scene: Scene, fact: tuple[int, str, int], surface: str) -> Spec:
    """Spec of a full relation caption for ``fact`` written in the ``surface`` form (canonical or inverse)."""
    i, rel, j = fact
    a, b = _desc(scene["objects"][i]), _desc(scene["objects"][j])
    return {"a": a, "rel": rel, "b": b} if surface == rel else {"a": b, "rel": _INVERSE[rel], "b": a}


def _n_partial(rng: np.random.Generator, n: int, frac: float) -> int:
    # Stochastic rounding keeps the expected fraction exact for any n.
    x = n * frac
    return min(n, int(x) + int(rng.random() < x - int(x)))


def _random_keep(rng: np.random.Generator, p: float = 0.6) -> tuple[str, ...]:
    return tuple(k for k in ATTRS if rng.random() < p)


def _partial_image_spec(rng: np.random.Generator, scene: Scene) -> Spec:
    objs = scene["objects"]
    facts = _clear_facts(scene)
    while True:
        if rng.random() < 0.35:  # a single object: "a red circle", "a small shape"
            keep = _random_keep(rng)
            if keep:
                return {"a": _desc(objs[int(rng.integers(len(objs)))], keep), "rel": None, "b": None}
            continue
        i, rel, j = facts[int(rng.integers(len(facts)))]
        ka, kb = _random_keep(rng), _random_keep(rng)
        # Not full (that is a full caption) and not "something <rel> something" (true of nearly everything).
        if len(ka) + len(kb) == 2 * len(ATTRS) or not (ka or kb):
            continue
        surface = rel if rng.random() < 0.5 else _INVERSE[rel]
        a, b = _desc(objs[i], ka), _desc(objs[j], kb)
        return {"a": a, "rel": rel, "b": b} if surface == rel else {"a": b, "rel": surface, "b": a}


def _train_image_captions(
    rng: np.random.Generator, scene: Scene, n: int, partial_frac: float, focus: tuple[int, str, int] | None
) -> list[Spec]:
    """``n`` true captions for a train scene; the first full one states ``focus`` when given (minimal pairs)."""
    n_partial = _n_partial(rng, n, partial_frac)
    facts = _clear_facts(scene)
    specs: list[Spec] = []
    texts: set[str] = set()
    for k in range(n):
        for _attempt in range(20):  # avoid repeating a sentence; give up gracefully on tiny scenes
            if k >= n_partial:
                fact = focus if (focus is not None and k == n_partial) else facts[int(rng.integers(len(facts)))]
                surface = fact[1] if rng.random() < 0.5 else _INVERSE[fact[1]]
                spec = _fact_spec(scene, fact, surface)
            else:
                spec = _partial_image_spec(rng, scene)
            if caption_text(spec) not in texts:
                break
        texts.add(caption_text(spec))
        specs.append(spec)
    return specs


def _eval_image_captions(rng: np.random.Generator, scene: Scene, fact: tuple[int, str, int], n: int) -> list[Spec]:
    # The canonical sentence and its paraphrase: both true of this image only, and within a group every image's
    # caption set has the same bag of words.
    surfaces = [fact[1], _INVERSE[fact[1]]]
    if n == 1:
        surfaces = [surfaces[int(rng.integers(2))]]
    return [_fact_spec(scene, fact, s) for s in surfaces]


# ----------------------------------------------------------------------------------------------------------------
# Exclusivity of eval captions over a whole split
# ----------------------------------------------------------------------------------------------------------------


class _ExclusiveSplit:
    """Accepts groups of (item, full caption specs) only if no caption is true of another item of the split.

    Full captions name fully specified objects, so an item can only satisfy a caption if it holds all of the
    caption's object types: an index by type keeps the check near-linear instead of |captions| x |items|.
    """

    def __init__(
        self, fits: Callable[[Spec, Any], bool], item_types: Callable[[Any], set], caption_types: Callable[[Spec], set]
    ):
        self.fits, self.item_types, self.caption_types = fits, item_types, caption_types
        self.items: list[Any] = []
        self.captions: list[tuple[Spec, int]] = []  # (spec, owner item)
        self.items_by_type: dict[Any, set[int]] = defaultdict(set)
        self.captions_by_type: dict[Any, set[int]] = defaultdict(set)
        self.rejected = 0

    def _candidate_items(self, types: set) -> set[int]:
        sets = [self.items_by_type.get(t, set()) for t in types]
        return set.intersection(*sets) if sets else set(range(len(self.items)))

    def try_add(self, items: list[Any], captions: list[list[Spec]]) -> bool:
        for k, specs in enumerate(captions):
            for spec in specs:
                if not self.fits(spec, items[k]):
                    raise AssertionError(f"generated caption is not true of its own item: {spec}")
                others = [it for m, it in enumerate(items) if m != k]
                others += [self.items[m] for m in self._candidate_items(self.caption_types(spec))]
                if any(self.fits(spec, it) for it in others):
                    self.rejected += 1
                    return False
        for item in items:
            types = self.item_types(item)
            cand = set().union(*(self.captions_by_type.get(t, set()) for t in types)) if types else set()
            for c in cand:
                spec = self.captions[c][0]
                if self.caption_types(spec) <= types and self.fits(spec, item):
                    self.rejected += 1
                    return False
        for item, specs in zip(items, captions):
            idx = len(self.items)
            self.items.append(item)
            for t in self.item_types(item):
                self.items_by_type[t].add(idx)
            for spec in specs:
                cidx = len(self.captions)
                self.captions.append((spec, idx))
                for t in self.caption_types(spec):
                    self.captions_by_type[t].add(cidx)
        return True


def _scene_types(scene: Scene) -> set:
    return {_obj_type(o) for o in scene["objects"]}


def _caption_types(spec: Spec) -> set:
    return {tuple(d[k] for k in ATTRS) for d in (spec["a"], spec.get("b")) if _desc_is_full(d)}


# ----------------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------------


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple[int, int, int]
) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        h = 0.85 * r  # slightly inset so a square and a circle of one size have similar area
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "triangle":
        # Upward equilateral triangle, centred on its bounding box rather than its centroid.
        h = 1.7 * r
        half = h / math.sqrt(3)
        draw.polygon([(cx, cy - h / 2), (cx + half, cy + h / 2), (cx - half, cy + h / 2)], fill=fill)
    elif shape == "diamond":
        w = 0.8 * r  # taller than wide, so it never reads as a rotated square
        draw.polygon([(cx, cy - r), (cx + w, cy), (cx, cy + r), (cx - w, cy)], fill=fill)
    elif shape == "cross":
        t = 0.36 * r
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _render(objects: list[tuple[str, str, float, float, float]], background: int, size: int) -> np.ndarray:
    s = size * _SUPERSAMPLE
    img = Image.new("RGB", (s, s), (background,) * 3)
    draw = ImageDraw.Draw(img)
    for shape, color, x, y, r in objects:
        _draw_shape(draw, shape, x * s, y * s, r * s, COLORS[color])
    return np.asarray(img.reduce(_SUPERSAMPLE))


def _add_noise(arr: np.ndarray, rng: np.random.Generator, std: float) -> np.ndarray:
    if std <= 0:
        return arr
    noisy = arr.astype(np.int16) + np.rint(rng.normal(0.0, std, size=arr.shape)).astype(np.int16)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def render_scene(
    scene: Scene, image_size: int = 64, *, noise: float = 0.0, seed: int | Sequence[int] | None = None
) -> Image.Image:
    """Render a scene to an RGB image.

    Args:
        scene: ``{"objects": [{"shape", "color", "x", "y", "r", ...}], "background": int}`` (normalised coords).
        image_size: side in pixels.
        noise: std of additive Gaussian pixel noise (0-255 scale); 0 for none.
        seed: seed of the noise.

    Returns:
        A ``PIL.Image`` of mode RGB and size ``(image_size, image_size)``.
    """
    objects = [(o["shape"], o["color"], o["x"], o["y"], o["r"]) for o in scene["objects"]]
    arr = _add_noise(_render(objects, scene["background"], image_size), np.random.default_rng(seed), noise)
    return Image.fromarray(arr)


# ----------------------------------------------------------------------------------------------------------------
# Image dataset
# ----------------------------------------------------------------------------------------------------------------

_SPLIT_CODE = {"train": 1, "val": 2, "test": 3}


def _eval_groups(
    rng: np.random.Generator, n_groups: int, group_size: int, n_objects: tuple[int, int], captions_per_image: int
) -> tuple[list[dict[str, Any]], int]:
    excl = _ExclusiveSplit(lambda s, sc: caption_fits(s, sc, margin=0.0), _scene_types, _caption_types)
    out = []
    for g in range(n_groups):
        while True:
            members = _sample_group(rng, group_size, n_objects)
            caps = [_eval_image_captions(rng, m["scene"], m["fact"], captions_per_image) for m in members]
            if excl.try_add([m["scene"] for m in members], caps):
                break
        for m, c in zip(members, caps):
            out.append({"scene": m["scene"], "group": g, "variant": m["variant"], "specs": c})
    return out, excl.rejected


def generate_shapes(
    out_dir: str | Path,
    *,
    seed: int = 0,
    n_train: int = 6000,
    n_val_groups: int = 50,
    n_test_groups: int = 100,
    group_size: int = 4,
    image_size: int = 64,
    captions_per_image: int = 5,
    test_captions_per_image: int = 2,
    partial_caption_frac: float = 0.4,
    train_minimal_pairs: bool = False,
    n_objects: tuple[int, int] = (2, 4),
    noise: float = 0.0,
) -> dict[str, Any]:
    """Write the shapes image dataset (Karpathy format) and its structured side file.

    Args:
        out_dir: output folder; ``dataset_shapes.json``, ``shapes_meta.json`` and ``images/`` are written there.
        seed: everything (scenes, captions, noise) follows from it; splits use independent streams, so the val
            and test splits do not change when ``n_train`` changes.
        n_train: number of train images.
        n_val_groups: number of val minimal-pair groups (``n_val_groups * group_size`` images).
        n_test_groups: number of test minimal-pair groups.
        group_size: scenes per minimal-pair group (2..8).
        image_size: image side in pixels.
        captions_per_image: captions per train image (Karpathy: 5).
        test_captions_per_image: full captions per val/test image: 2 = the canonical sentence and its paraphrase,
            1 = one of the two at random.
        partial_caption_frac: expected fraction of partial captions among train captions.
        train_minimal_pairs: if True, train scenes also come in consecutive minimal-pair groups (hard negatives
            within a batch when batches are built from consecutive items); the first full caption of each then
            states the group's focus fact.
        n_objects: (min, max) objects per scene.
        noise: std of the Gaussian pixel noise.

    Returns:
        Summary: ``ann_file``, ``image_dir``, ``meta_file``, ``images`` and ``captions`` per split,
        ``rejected_groups`` (val/test groups redrawn for exclusivity) and ``seconds`` (scenes, render, total).
    """
    if not 2 <= group_size <= 8:
        raise ValueError(f"group_size must be in 2..8, got {group_size}")
    if test_captions_per_image not in (1, 2):
        raise ValueError(f"test_captions_per_image must be 1 or 2, got {test_captions_per_image}")
    if not (2 <= n_objects[0] <= n_objects[1] <= 5):
        raise ValueError(f"n_objects must satisfy 2 <= min <= max <= 5, got {n_objects}")
    t0 = time.perf_counter()
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)

    entries: list[dict[str, Any]] = []  # {split, scene, group, variant, specs}
    rng = np.random.default_rng([seed, _SPLIT_CODE["train"]])
    if train_minimal_pairs:
        g = 0
        while len(entries) < n_train:
            for m in _sample_group(rng, group_size, n_objects)[: n_train - len(entries)]:
                specs = _train_image_captions(rng, m["scene"], captions_per_image, partial_caption_frac, m["fact"])
                entries.append(
                    {"split": "train", "scene": m["scene"], "group": g, "variant": m["variant"], "specs": specs}
                )
            g += 1
    else:
        for _ in range(n_train):
            scene = _sample_scene(rng, n_objects)
            specs = _train_image_captions(rng, scene, captions_per_image, partial_caption_frac, None)
            entries.append({"split": "train", "scene": scene, "group": None, "variant": None, "specs": specs})
    rejected = 0
    for split, n_groups in (("val", n_val_groups), ("test", n_test_groups)):
        rng = np.random.default_rng([seed, _SPLIT_CODE[split]])
        items, rej = _eval_groups(rng, n_groups, group_size, n_objects, test_captions_per_image)
        rejected += rej
        entries += [{"split": split, **it} for it in items]
    t_scenes = time.perf_counter() - t0

    images, meta_images = [], []
    counters = dict.fromkeys(_SPLIT_CODE, 0)
    sentid = 0
    for imgid, e in enumerate(entries):
        split = e["split"]
        filename = f"{split}_{counters[split]:06d}.png"
        counters[split] += 1
        sentences, caps_meta = [], []
        for spec in e["specs"]:
            raw = caption_text(spec)
            sentences.append({"raw": raw, "tokens": raw.split(), "imgid": imgid, "sentid": sentid})
            caps_meta.append({"sentid": sentid, "spec": canonicalize(spec), "full": is_full_caption(spec)})
            sentid += 1
        images.append(
            {
                "filename": filename,
                "split": split,
                "imgid": imgid,
                "sentids": [s["sentid"] for s in sentences],
                "sentences": sentences,
            }
        )
        meta_images.append(
            {
                "imgid": imgid,
                "filename": filename,
                "split": split,
                "group": e["group"],
                "variant": e["variant"],
                "scene": e["scene"],
                "captions": caps_meta,
            }
        )
        img = render_scene(e["scene"], image_size, noise=noise, seed=[seed, _SPLIT_CODE[split], imgid, 7])
        # compress_level=1: much faster than the default for a small size cost.
        img.save(out / "images" / filename, compress_level=1)
    t_render = time.perf_counter() - t0 - t_scenes

    ann_file, meta_file = out / "dataset_shapes.json", out / "shapes_meta.json"
    ann_file.write_text(json.dumps({"dataset": "shapes", "images": images}))
    params = {
        "seed": seed,
        "n_train": n_train,
        "n_val_groups": n_val_groups,
        "n_test_groups": n_test_groups,
        "group_size": group_size,
        "image_size": image_size,
        "captions_per_image": captions_per_image,
        "test_captions_per_image": test_captions_per_image,
        "partial_caption_frac": partial_caption_frac,
        "train_minimal_pairs": train_minimal_pairs,
        "n_objects": list(n_objects),
        "noise": noise,
    }
    meta = {
        "dataset": "shapes",
        "version": 1,
        "params": params,
        "rel_margin": REL_MARGIN,
        "vocab": {"shapes": list(SHAPES), "colors": list(COLORS), "sizes": list(SIZES)},
        "images": meta_images,
    }
    meta_file.write_text(json.dumps(meta))
    total = time.perf_counter() - t0
    return {
        "ann_file": str(ann_file),
        "image_dir": str(out / "images"),
        "meta_file": str(meta_file),
        "images": dict(counters),
        "captions": {s: sum(len(i["sentences"]) for i in images if i["split"] == s) for s in _SPLIT_CODE},
        "rejected_groups": rejected,
        "seconds": {"scenes": round(t_scenes, 3), "render": round(t_render, 3), "total": round(total, 3)},
    }


# ----------------------------------------------------------------------------------------------------------------
# Video captions: structure, semantics, text
# ----------------------------------------------------------------------------------------------------------------


def _clause_fits(clause: dict[str, Any], obj: dict[str, Any]) -> bool:
    if not _desc_matches(clause["obj"], obj):
        return False
    dirs = clause["dirs"]
    # Two directions state the order; one direction says only that the object moves that way at some point.
    return list(obj["motion"]) == list(dirs) if len(dirs) == 2 else dirs[0] in obj["motion"]


def video_caption_fits(spec: Spec, video: Video) -> bool:
    """Decide whether a video caption is true of a video.

    A caption is a conjunction of clauses ("a small red circle moves left then up and a large blue square moves
    down then right"); it is true when distinct objects of the video satisfy the clauses. A clause with two
    directions requires that exact order; with one direction, that the object moves that way in either segment.

    Args:
        spec: ``{"clauses": [{"obj": Desc, "dirs": [d] | [d1, d2]}, ...]}``.
        video: ``{"objects": [{"shape", "color", "size", "motion": [d1, d2], ...}], ...}``.

    Returns:
        True when the caption is true of the video.
    """
    objs, clauses = video["objects"], spec["clauses"]
    return any(
        all(_clause_fits(c, objs[i]) for c, i in zip(clauses, perm))
        for perm in itertools.permutations(range(len(objs)), len(clauses))
    )


def canonicalize_video(spec: Spec) -> Spec:
    """Canonical video caption spec: clauses in a fixed order (a conjunction does not depend on it)."""
    clauses = sorted(spec["clauses"], key=lambda c: json.dumps(c, sort_keys=True))
    return {"clauses": [{"obj": dict(c["obj"]), "dirs": list(c["dirs"])} for c in clauses]}


def is_full_video_caption(spec: Spec, video: Video) -> bool:
    """True when the caption describes every object of ``video`` with all attributes and both directions."""
    clauses = spec["clauses"]
    return len(clauses) == len(video["objects"]) and all(
        _desc_is_full(c["obj"]) and len(c["dirs"]) == 2 for c in clauses
    )


def _clause_text(clause: dict[str, Any], verb: str, style: int) -> str:
    d, dirs = _desc_text(clause["obj"]), clause["dirs"]
    if len(dirs) == 1:
        return f"{d} {verb} {dirs[0]}"
    if style == 0:
        return f"{d} {verb} {dirs[0]} then {dirs[1]}"
    if style == 1:
        return f"{d} {verb} {dirs[0]} and then {dirs[1]}"
    return f"{d} first {verb} {dirs[0]} then {dirs[1]}"


def _video_text(rng: np.random.Generator, spec: Spec) -> str:
    """One random surface form of a (possibly non-canonical) video spec; clause order is kept as given."""
    parts = [_clause_text(c, _VERBS[int(rng.integers(len(_VERBS)))], int(rng.integers(3))) for c in spec["clauses"]]
    return (" and " if rng.random() < 0.5 else " while ").join(parts)


# ----------------------------------------------------------------------------------------------------------------
# Video sampling and rendering
# ----------------------------------------------------------------------------------------------------------------


def _trajectory(obj: dict[str, Any], n_frames: int) -> np.ndarray:
    """Centres [T, 2] of an object moving ``lengths[0]`` along ``motion[0]`` then ``lengths[1]`` along ``motion[1]``.

    Each segment takes half the clip, so frame t and frame T-1-t of a clip and of its time reversal coincide.
    """
    u = np.linspace(0.0, 1.0, n_frames)
    v1, v2 = (np.array(_DIR_VEC[d]) for d in obj["motion"])
    l1, l2 = obj["lengths"]
    first = np.clip(2 * u, 0, 1)[:, None] * l1 * v1
    second = np.clip(2 * u - 1, 0, 1)[:, None] * l2 * v2
    return np.array(obj["start"])[None, :] + first + second


def _sample_motion(rng: np.random.Generator, perpendicular: bool) -> list[str]:
    d1 = DIRECTIONS[int(rng.integers(4))]
    # Eval clips need perpendicular segments: "right then left" is its own time reversal, so it cannot make a
    # reversal minimal pair. Train clips may also turn back.
    options = [d for d in DIRECTIONS if d != d1 and (not perpendicular or d != _REVERSE_DIR[d1])]
    return [d1, options[int(rng.integers(len(options)))]]


def _place_track(rng: np.random.Generator, obj: dict[str, Any], tries: int = 20) -> bool:
    lo, hi = obj["r"] + _PAD, 1 - obj["r"] - _PAD
    v1, v2 = (np.array(_DIR_VEC[d]) for d in obj["motion"])
    for _ in range(tries):
        l1, l2 = (round(float(v), 4) for v in rng.uniform(0.2, 0.35, size=2))
        offsets = np.stack([np.zeros(2), l1 * v1, l1 * v1 + l2 * v2])
        smin, smax = lo - offsets.min(0), hi - offsets.max(0)
        if np.all(smin < smax):
            obj["start"] = [round(float(v), 4) for v in rng.uniform(smin, smax)]
            obj["lengths"] = [l1, l2]
            return True
    return False


def _tracks_apart(objs: list[dict[str, Any]], n_frames: int) -> bool:
    if len(objs) < 2:
        return True
    ta, tb = _trajectory(objs[0], n_frames), _trajectory(objs[1], n_frames)
    return bool(np.min(np.linalg.norm(ta - tb, axis=1)) >= objs[0]["r"] + objs[1]["r"] + _GAP)


def _sample_video(rng: np.random.Generator, n_obj: int, n_frames: int, *, eval_group: bool) -> Video:
    while True:
        objs = _sample_objects(rng, n_obj, VIDEO_RADIUS)
        for o in objs:
            del o["x"], o["y"]
            o["motion"] = _sample_motion(rng, eval_group)
        if (
            eval_group
            and n_obj == 2
            and (objs[0]["motion"] == objs[1]["motion"] or objs[0]["color"] == objs[1]["color"])
        ):
            continue  # distinct motions and colours make the attribute swap a real minimal pair
        if not all(_place_track(rng, o) for o in objs):
            continue
        video = {"objects": objs, "n_frames": n_frames, "background": int(rng.integers(30, 61))}
        if _tracks_apart(objs, n_frames) and (not eval_group or _tracks_apart(_swap_order(video)["objects"], n_frames)):
            return video


def _end(obj: dict[str, Any]) -> list[float]:
    return [round(float(v), 4) for v in _trajectory(obj, 2)[-1]]


def _reverse(video: Video) -> Video:
    out = copy.deepcopy(video)
    for o, src in zip(out["objects"], video["objects"]):
        o["start"], o["motion"] = _end(src), [_REVERSE_DIR[d] for d in src["motion"][::-1]]
        o["lengths"] = src["lengths"][::-1]
    return out


def _swap_order(video: Video) -> Video:
    # Same start, same end, same segment lengths in the other order: the words stay, the order changes.
    out = copy.deepcopy(video)
    for o in out["objects"]:
        o["motion"], o["lengths"] = o["motion"][::-1], o["lengths"][::-1]
    return out


def _swap_colors(video: Video) -> Video:
    out = copy.deepcopy(video)
    a, b = out["objects"]
    a["color"], b["color"] = b["color"], a["color"]
    return out


def _sample_video_group(rng: np.random.Generator, group_size: int, n_frames: int, n_obj: int) -> list[dict]:
    """Reversal twins (base, rev), then (swap, rev of swap), (attr, rev of attr), (attr+swap, rev) as needed."""
    base = _sample_video(rng, n_obj, n_frames, eval_group=True)
    pairs = [("swap", _swap_order(base))]
    if n_obj == 2:
        pairs += [("attr", _swap_colors(base)), ("attr+swap", _swap_colors(_swap_order(base)))]
    order = [0] + [1 + int(i) for i in rng.permutation(len(pairs))]
    pairs = [("base", base)] + pairs
    members: list[dict] = []
    for i in order:
        name, video = pairs[i]
        members.append({"video": video, "variant": name, "reverse_of": None})
        members.append({"video": _reverse(video), "variant": f"{name}+rev", "reverse_of": len(members) - 1})
    return members[:group_size]


def _full_video_spec(video: Video) -> Spec:
    return {"clauses": [{"obj": _desc(o), "dirs": list(o["motion"])} for o in video["objects"]]}


def _eval_video_captions(rng: np.random.Generator, video: Video) -> list[tuple[Spec, str]]:
    """10 distinct paraphrases of the one full fact of ``video`` (clause order, verb, connective vary)."""
    spec = _full_video_spec(video)
    texts: list[str] = []
    while len(texts) < _VIDEO_CAPTIONS:
        clauses = spec["clauses"]
        if len(clauses) == 2 and rng.random() < 0.5:
            clauses = clauses[::-1]
        text = _video_text(rng, {"clauses": clauses})
        if text not in texts:
            texts.append(text)
    return [(canonicalize_video(spec), t) for t in texts]


def _partial_video_spec(rng: np.random.Generator, video: Video) -> Spec:
    objs = video["objects"]
    while True:
        chosen = objs if (len(objs) == 1 or rng.random() < 0.5) else [objs[int(rng.integers(2))]]
        clauses = []
        for o in chosen:
            dirs = list(o["motion"]) if rng.random() < 0.6 else [o["motion"][int(rng.integers(2))]]
            clauses.append({"obj": _desc(o, _random_keep(rng)), "dirs": dirs})
        spec = {"clauses": clauses}
        if not is_full_video_caption(spec, video):
            return spec


def _train_video_captions(rng: np.random.Generator, video: Video, partial_frac: float) -> list[tuple[Spec, str]]:
    n_partial = _n_partial(rng, _VIDEO_CAPTIONS, partial_frac)
    out: list[tuple[Spec, str]] = []
    for k in range(_VIDEO_CAPTIONS):
        for _attempt in range(20):
            if k < n_partial:
                spec = _partial_video_spec(rng, video)
            else:
                spec = _full_video_spec(video)
                if len(spec["clauses"]) == 2 and rng.random() < 0.5:
                    spec["clauses"] = spec["clauses"][::-1]
            text = _video_text(rng, spec)
            if all(text != t for _, t in out):
                break
        out.append((canonicalize_video(spec), text))
    return out


def render_video_frames(
    video: Video, frame_size: int = 32, *, noise: float = 0.0, seed: int | Sequence[int] | None = None
) -> np.ndarray:
    """Render every frame of a video spec.

    Args:
        video: ``{"objects": [{"shape", "color", "r", "start", "motion", "lengths"}], "n_frames", "background"}``.
        frame_size: side of a frame in pixels.
        noise: std of additive Gaussian pixel noise.
        seed: seed of the noise.

    Returns:
        uint8 array [T, frame_size, frame_size, 3].
    """
    n_frames = video["n_frames"]
    tracks = [_trajectory(o, n_frames) for o in video["objects"]]
    frames = np.stack(
        [
            _render(
                [
                    (o["shape"], o["color"], float(tr[t, 0]), float(tr[t, 1]), o["r"])
                    for o, tr in zip(video["objects"], tracks)
                ],
                video["background"],
                frame_size,
            )
            for t in range(n_frames)
        ]
    )
    return _add_noise(frames, np.random.default_rng(seed), noise)


@lru_cache(maxsize=4)
def _projection(n_in: int, dim: int) -> np.ndarray:
    rng = np.random.default_rng(_PROJECTION_SEED)
    return (rng.integers(0, 2, size=(n_in, dim), dtype=np.int8) * 2 - 1).astype(np.float32)


def frame_features(frames: np.ndarray, feature_dim: int = 256) -> np.ndarray:
    """Map frames to per-frame feature vectors, the stand-in for I3D clip features.

    A fixed Rademacher random projection (Johnson-Lindenstrauss: distances between frames are roughly kept) of the
    centred pixels. Inputs are integers in [-255, 255] and weights are +-1, so every partial sum is an integer
    below 2**24 and float32 arithmetic is exact: the result does not depend on the BLAS or its thread count.

    Args:
        frames: uint8 [T, S, S, 3] with ``3 * S * S * 255 < 2**24`` (S <= 148).
        feature_dim: output dimension D.

    Returns:
        float32 [T, D].
    """
    n_t = frames.shape[0]
    x = frames.reshape(n_t, -1).astype(np.float32) * 2.0 - 255.0
    n_in = x.shape[1]
    if n_in * 255 >= 2**24:
        raise ValueError(f"frames too large for an exact projection: {frames.shape}")
    return (x @ _projection(n_in, feature_dim)) * np.float32(1.0 / (255.0 * math.sqrt(n_in)))


# ----------------------------------------------------------------------------------------------------------------
# Video dataset
# ----------------------------------------------------------------------------------------------------------------


def _video_types(video: Video) -> set:
    return {_obj_type(o) for o in video["objects"]}


def _video_caption_types(spec: Spec) -> set:
    return {tuple(c["obj"][k] for k in ATTRS) for c in spec["clauses"] if _desc_is_full(c["obj"])}


def generate_shapes_video(
    out_dir: str | Path,
    *,
    seed: int = 0,
    n_train: int = 4000,
    n_val_groups: int = 25,
    n_test_groups: int = 50,
    group_size: int = 4,
    n_frames: tuple[int, int] = (8, 16),
    feature_dim: int = 256,
    frame_size: int = 32,
    partial_caption_frac: float = 0.5,
    two_object_frac: float = 0.5,
    train_minimal_pairs: bool = False,
    noise: float = 2.0,
) -> dict[str, Any]:
    """Write the shapes video dataset (VATEX format: caption files and per-video feature files).

    Args:
        out_dir: output folder.
        seed: everything follows from it (the feature projection is fixed, like a pretrained extractor).
        n_train: number of train videos.
        n_val_groups: val minimal-pair groups; ``summary["n_val"]`` val videos come first in the validation file.
        n_test_groups: test minimal-pair groups; they follow the val videos in the validation file.
        group_size: videos per group (2..8; above 4 every eval video has two objects, to have enough variants).
        n_frames: (min, max) frames per video, inclusive; T varies per video (per group for val/test).
        feature_dim: per-frame feature dimension D.
        frame_size: side of the rendered frame that is projected to features.
        partial_caption_frac: expected fraction of partial captions among the 10 train captions of a video.
        two_object_frac: fraction of videos with two moving objects (the rest have one).
        train_minimal_pairs: if True, train videos also come in consecutive minimal-pair groups.
        noise: std of the Gaussian pixel noise before projection.

    Returns:
        Summary: ``train_file``, ``val_file``, ``feature_dir``, ``meta_file``, ``n_val`` (the number of val videos
        at the head of the validation file), ``videos`` per split, ``rejected_groups``, ``disk_bytes`` and
        ``seconds`` (specs, features, total).
    """
    if not 2 <= group_size <= 8:
        raise ValueError(f"group_size must be in 2..8, got {group_size}")
    if not 2 <= n_frames[0] <= n_frames[1]:
        raise ValueError(f"n_frames must satisfy 2 <= min <= max, got {n_frames}")
    t0 = time.perf_counter()
    out = Path(out_dir)
    (out / "features").mkdir(parents=True, exist_ok=True)

    def n_objects(rng: np.random.Generator, force_two: bool) -> int:
        return 2 if force_two or rng.random() < two_object_frac else 1

    entries: list[dict[str, Any]] = []  # {split, video, group, variant, reverse_of (entry index), caps}
    rng = np.random.default_rng([seed, _SPLIT_CODE["train"], 99])
    g = 0
    while len(entries) < n_train:
        t = int(rng.integers(n_frames[0], n_frames[1] + 1))
        if train_minimal_pairs:
            members = _sample_video_group(rng, group_size, t, n_objects(rng, group_size > 4))
        else:
            members = [
                {
                    "video": _sample_video(rng, n_objects(rng, False), t, eval_group=False),
                    "variant": None,
                    "reverse_of": None,
                }
            ]
        first = len(entries)
        for m in members[: n_train - len(entries)]:
            entries.append(
                {
                    "split": "train",
                    "video": m["video"],
                    "variant": m["variant"],
                    "group": g if train_minimal_pairs else None,
                    "reverse_of": None if m["reverse_of"] is None else first + m["reverse_of"],
                    "caps": _train_video_captions(rng, m["video"], partial_caption_frac),
                }
            )
        g += 1
    rejected = 0
    for split, n_groups in (("val", n_val_groups), ("test", n_test_groups)):
        rng = np.random.default_rng([seed, _SPLIT_CODE[split], 99])
        excl = _ExclusiveSplit(video_caption_fits, _video_types, _video_caption_types)
        for g in range(n_groups):
            t = int(rng.integers(n_frames[0], n_frames[1] + 1))
            n_obj = n_objects(rng, group_size > 4)  # drawn once, so redraws keep the 1/2-object mix as asked
            while True:
                members = _sample_video_group(rng, group_size, t, n_obj)
                caps = [_eval_video_captions(rng, m["video"]) for m in members]
                # All 10 captions of a video share one canonical spec, so checking it once is enough.
                if excl.try_add([m["video"] for m in members], [[c[0][0]] for c in caps]):
                    break
            first = len(entries)
            for m, c in zip(members, caps):
                entries.append(
                    {
                        "split": split,
                        "video": m["video"],
                        "variant": m["variant"],
                        "group": g,
                        "reverse_of": None if m["reverse_of"] is None else first + m["reverse_of"],
                        "caps": c,
                    }
                )
        rejected += excl.rejected
    t_specs = time.perf_counter() - t0

    counters = dict.fromkeys(_SPLIT_CODE, 0)
    frames_cache: dict[int, np.ndarray] = {}
    disk = 0
    records: dict[str, list] = {"train": [], "eval": []}
    meta_videos = []
    for idx, e in enumerate(entries):
        split = e["split"]
        vid = f"{split}_{counters[split]:06d}"
        counters[split] += 1
        e["videoID"] = vid
        if e["reverse_of"] is not None:
            # The exact time reversal of its twin (noise included): the two clips hold the same multiset of frames.
            frames = frames_cache.pop(e["reverse_of"])[::-1]
        else:
            frames = render_video_frames(e["video"], frame_size, noise=noise, seed=[seed, _SPLIT_CODE[split], idx, 11])
            if idx + 1 < len(entries) and entries[idx + 1]["reverse_of"] == idx:
                frames_cache[idx] = frames
        feats = frame_features(frames, feature_dim)
        # Real VATEX ships (1, T, 1024); (T, D) also occurs in the wild. Alternate so readers meet both.
        feats = feats[None] if idx % 2 == 0 else feats
        path = out / "features" / f"{vid}.npy"
        np.save(path, feats)
        disk += path.stat().st_size
        records["train" if split == "train" else "eval"].append(
            {"videoID": vid, "enCap": [t for _, t in e["caps"]], "chCap": [""] * _VIDEO_CAPTIONS}
        )
        meta_videos.append(
            {
                "videoID": vid,
                "split": split,
                "group": e["group"],
                "variant": e["variant"],
                "reverse_of": None if e["reverse_of"] is None else entries[e["reverse_of"]]["videoID"],
                "video": e["video"],
                "captions": [{"spec": s, "full": is_full_video_caption(s, e["video"])} for s, _ in e["caps"]],
            }
        )
    t_feats = time.perf_counter() - t0 - t_specs

    train_file, val_file = out / "vatex_training_v1.0.json", out / "vatex_validation_v1.0.json"
    meta_file = out / "shapes_video_meta.json"
    train_file.write_text(json.dumps(records["train"]))
    val_file.write_text(json.dumps(records["eval"]))
    params = {
        "seed": seed,
        "n_train": n_train,
        "n_val_groups": n_val_groups,
        "n_test_groups": n_test_groups,
        "group_size": group_size,
        "n_frames": list(n_frames),
        "feature_dim": feature_dim,
        "frame_size": frame_size,
        "partial_caption_frac": partial_caption_frac,
        "two_object_frac": two_object_frac,
        "train_minimal_pairs": train_minimal_pairs,
        "noise": noise,
    }
    meta = {
        "dataset": "shapes_video",
        "version": 1,
        "n_val": counters["val"],
        "params": params,
        "feature": {
            "dim": feature_dim,
            "frame_size": frame_size,
            "projection": "rademacher",
            "projection_seed": _PROJECTION_SEED,
        },
        "vocab": {"shapes": list(SHAPES), "colors": list(COLORS), "sizes": list(SIZES), "directions": list(DIRECTIONS)},
        "videos": meta_videos,
    }
    meta_file.write_text(json.dumps(meta))
    disk += sum(p.stat().st_size for p in (train_file, val_file, meta_file))
    total = time.perf_counter() - t0
    return {
        "train_file": str(train_file),
        "val_file": str(val_file),
        "feature_dir": str(out / "features"),
        "meta_file": str(meta_file),
        "n_val": counters["val"],
        "videos": dict(counters),
        "rejected_groups": rejected,
        "disk_bytes": disk,
        "seconds": {"specs": round(t_specs, 3), "features": round(t_feats, 3), "total": round(total, 3)},
    }


# ----------------------------------------------------------------------------------------------------------------
# Ground truth for a loaded split (benchmarks: the oracle teacher, false negatives among mined candidates)
# ----------------------------------------------------------------------------------------------------------------


class GroundTruth:
    """Which caption of a loaded shapes split is true of which item, from the generator's meta file.

    Args:
        meta_file: ``shapes_meta.json`` or ``shapes_video_meta.json`` written beside the data.
        item_ids: the split's item ids (Karpathy filenames or VATEX videoIDs), in the split's order.
        text_to_visual: the split's caption -> item map; an item's captions are the first ones of its meta
            entry, in order (as the readers load them, ``max_captions`` included).
    """

    def __init__(self, meta_file: str | Path, item_ids: Sequence[str], text_to_visual: Sequence[int]):
        meta = json.loads(Path(meta_file).read_text())
        self.video = meta["dataset"] == "shapes_video"
        entries = {e["videoID" if self.video else "filename"]: e for e in meta["videos" if self.video else "images"]}
        missing = [i for i in item_ids if i not in entries]
        if missing:
            raise KeyError(f"{meta_file}: no entry for items {missing[:3]}; was the data regenerated since loading?")
        self.scenes = [entries[i]["video" if self.video else "scene"] for i in item_ids]
        seen: dict[int, int] = {}
        self.specs = []
        for item in text_to_visual:
            k = seen.get(item, 0)
            seen[item] = k + 1
            self.specs.append(entries[item_ids[item]]["captions"][k]["spec"])

    def fits(self, text_idx: Sequence[int], item_idx: Sequence[int]) -> np.ndarray:
        """[P] bool: caption text_idx[p] is true of item item_idx[p]."""
        check = video_caption_fits if self.video else caption_fits
        return np.array([check(self.specs[t], self.scenes[i]) for t, i in zip(text_idx, item_idx)], dtype=bool)

    def fits_text(self, texts: Sequence[str], item_idx: Sequence[int]) -> np.ndarray:
        """[P] bool: the written caption texts[p] (which need not be in the split) is true of item item_idx[p]."""
        if self.video:
            raise NotImplementedError("judging free text needs a caption parser; only image captions have one "
                                      "(fastslow.data.shapes.parse_caption): run loss.oracle with recipe=shapes")
        specs = [parse_caption(t) for t in texts]
        return np.array([s is not None and caption_fits(s, self.scenes[i]) for s, i in zip(specs, item_idx)],
                        dtype=bool)
