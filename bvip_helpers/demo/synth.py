"""Synthetic street scenes: the course's built-in stand-in for the SENSATION data set.

Each scene is a cartoon street drawn with PIL: a perspective sidewalk (left, center, right,
or ``Outside`` when only a far strip of it is visible), a road beside it, crossing in front
or absent, and the six object classes plus grass, plants and trees. Close objects are large
and low in the image, far ones small near the horizon. The labels are sampled first, with the
real label frequencies (hard-coded below), and then drawn, so every label can be read off the
pixels: an object annotated ``Left`` lies entirely in the left third of the image.

The output mimics the two real CSVs byte for byte in layout (``complete_captions_sensation.csv``
and ``annotations_with_obj_pos.csv``), including a few of their quirks, plus
``synth_scenes.jsonl`` with the geometry and the deliberate caption flaws of every scene.

    bvip synth --out_dir data/synthetic --n 1000 --seed 0
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import multiprocessing
import os
import sys
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from bvip_helpers.io import (
    ANNOTATIONS_FILE,
    CAPTIONS_FILE,
    atomic_path,
    iter_jsonl,
    load_image,
    resolve,
    safe_image_path,
)
from bvip_helpers.schema import OBJECT_CLASSES, SCENERY_COLUMNS

# --- Output layout ------------------------------------------------------------

SCENES_FILE = "synth_scenes.jsonl"
CAPTION_COLUMNS = ["image_path", "target", "split"]
NEAR_COLUMNS = ["m_bicycle", "m_car", "m_person", "m_traffic_sign", "traffic_light", "m_obstacle",
                "m_grass", "m_plants", "m_trees"]
FAR_COLUMNS = [f"{c}_outside" for c in NEAR_COLUMNS]
#: The exact header of the real ``annotations_with_obj_pos.csv``.
ANNOTATION_COLUMNS = ["image", "status", "sidewalk_pos", "road_pos", "Object_present", "Object_present_outside",
                      *NEAR_COLUMNS, *FAR_COLUMNS]
SPLIT_DIRS = {"train": "training", "val": "validation", "test": "testing"}
#: Real split sizes 2581 / 317 / 333.
SPLIT_FRACTIONS = {"train": 0.799, "val": 0.098, "test": 0.103}
MIN_EVAL_SPLIT = 8  # small samples still get a usable val and test split
EMPTY_CELL = "not present"
ROAD_ABSENT = "Not present"

# column -> drawn kind
COLUMN_KIND: dict[str, str] = {o.near_column: o.name for o in OBJECT_CLASSES}
COLUMN_KIND.update({o.far_column: o.name for o in OBJECT_CLASSES})
COLUMN_KIND.update({c: c[2:] for c in SCENERY_COLUMNS})
COLUMN_KIND.update({f"{c}_outside": c[2:] for c in SCENERY_COLUMNS})

# --- Real label frequencies (SENSATION, 3,233 well-formed annotation rows) -----

#: P(sidewalk_pos, road_pos) in the real annotations.
REAL_SIDEWALK_ROAD: dict[tuple[str, str], float] = {
    ("Center", "Front"): 0.0430, ("Center", "Left"): 0.2088, ("Center", "Not present"): 0.2122,
    ("Center", "Right"): 0.1534, ("Left", "Front"): 0.0139, ("Left", "Left"): 0.0145,
    ("Left", "Not present"): 0.0331, ("Left", "Right"): 0.0795, ("Outside", "Front"): 0.0186,
    ("Outside", "Left"): 0.0019, ("Outside", "Not present"): 0.0074, ("Outside", "Right"): 0.0015,
    ("Right", "Front"): 0.0220, ("Right", "Left"): 0.1287, ("Right", "Not present"): 0.0421,
    ("Right", "Right"): 0.0195,
}
#: P(cell value) per object column; the remaining mass is ``not present``. Values seen in
#: fewer than 3 real rows are folded into the others, keeping the real presence rate.
REAL_CELL_VALUES: dict[str, dict[str, float]] = {
    "m_bicycle": {"Left": 0.0233, "Right": 0.0128, "Center": 0.0071, "Right-Right": 0.0024, "Left-Left-Left": 0.0020,
                  "Left-Left": 0.0020, "Left-Center": 0.0013, "Right-Right-Right": 0.0010},
    "m_car": {"Left": 0.0108, "Right": 0.0078, "Center": 0.0064, "Right-Right": 0.0010},
    "m_person": {"Center": 0.0476, "Left": 0.0264, "Right": 0.0228, "Left-Center": 0.0059, "Center-Right": 0.0042,
                 "Left-Left": 0.0036, "Left-Right": 0.0036, "Right-Right": 0.0033, "Right-Center": 0.0029,
                 "Center-Center": 0.0026, "Center-Left": 0.0023, "Center-Center-Center": 0.0010,
                 "Left-Left-Left": 0.0010},
    "m_traffic_sign": {"Right": 0.0360, "Left": 0.0345, "Center": 0.0237, "Left-Right": 0.0022,
                       "Right-Right": 0.0022, "Left-Left": 0.0009},
    "traffic_light": {"Left": 0.0139, "Right": 0.0126, "Center": 0.0103},
    "m_obstacle": {"Right": 0.0700, "Left": 0.0645, "Center": 0.0526, "Left-Right": 0.0129, "Right-Right": 0.0113,
                   "Left-Left": 0.0110, "Center-Center": 0.0097, "Right-Left": 0.0048, "Center-Left": 0.0039,
                   "Center-Right": 0.0035, "Left-Center": 0.0032, "Right-Center": 0.0032,
                   "Left-Left-Left-Left": 0.0013, "Center-Left-Right": 0.0010, "Right-Right-Right": 0.0010},
    "m_grass": {"Right": 0.0031, "Left": 0.0031, "Center": 0.0019},
    "m_plants": {"Left": 0.0104, "Right": 0.0067, "Left-Right": 0.0017, "Center": 0.0013},
    "m_trees": {"Right": 0.0104, "Left": 0.0088, "Center": 0.0062},
    "m_bicycle_outside": {"Right": 0.0150, "Left": 0.0133, "Center": 0.0047, "Left-Left-Left": 0.0010},
    "m_car_outside": {"Left": 0.1362, "Right": 0.0974, "Center": 0.0125, "Left-Left": 0.0100, "Right-Right": 0.0085,
                      "Left-Left-Left": 0.0041, "Left-Right": 0.0038, "Right-Right-Right": 0.0022,
                      "Left-Center": 0.0016, "Center-Left": 0.0016, "Right-Left": 0.0016, "Center-Right": 0.0013},
    "m_person_outside": {"Center": 0.0189, "Right": 0.0183, "Left": 0.0111},
    "m_traffic_sign_outside": {"Left": 0.0322, "Right": 0.0319, "Center": 0.0073, "Left-Right": 0.0032},
    "traffic_light_outside": {"Right": 0.0068, "Center": 0.0051, "Left": 0.0035, "Left-Right": 0.0010},
    "m_obstacle_outside": {"Right": 0.0780, "Left": 0.0673, "Left-Right": 0.0120, "Center": 0.0117,
                           "Right-Left": 0.0047, "Left-Left": 0.0028, "Right-Right": 0.0019, "Center-Left": 0.0009,
                           "Left-Center": 0.0009, "Left-Left-Right": 0.0009},
    "m_grass_outside": {"Right": 0.0487, "Left": 0.0427, "Left-Right": 0.0405, "Right-Left": 0.0051,
                        "Center": 0.0032},
    "m_plants_outside": {"Right": 0.0495, "Left": 0.0329, "Left-Right": 0.0093, "Right-Left": 0.0022,
                         "Center": 0.0022},
    "m_trees_outside": {"Left": 0.0511, "Right": 0.0355, "Left-Right": 0.0125, "Center": 0.0032,
                        "Right-Left": 0.0019, "Center-Right": 0.0019, "Left-Center": 0.0013},
}


def real_marginals() -> dict[str, dict[str, float]]:
    """Expected frequencies per column: sidewalk/road values and, per object column, ``present``."""
    out: dict[str, dict[str, float]] = {"sidewalk_pos": {}, "road_pos": {}}
    for (side, road), p in REAL_SIDEWALK_ROAD.items():
        out["sidewalk_pos"][side] = out["sidewalk_pos"].get(side, 0.0) + p
        out["road_pos"][road] = out["road_pos"].get(road, 0.0) + p
    for column, values in REAL_CELL_VALUES.items():
        out[column] = {"present": sum(values.values())}
    return out


# --- Scene description ----------------------------------------------------------

POSITIONS = ("Left", "Center", "Right")


@dataclass
class Item:
    """One annotated thing drawn in a scene (an object or a grass/plants/trees patch)."""

    column: str
    kind: str
    position: str  # Left / Center / Right: which third of the image holds it
    near: bool
    x: float  # center x, output pixels
    y_base: float  # where it touches the ground
    width: float
    height: float
    variant: str = ""
    meters: int = 0  # distance the caption states, from the perspective depth
    box: tuple[int, int, int, int] = (0, 0, 0, 0)
    mask_id: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"column": self.column, "kind": self.kind, "position": self.position, "near": self.near,
                "variant": self.variant, "box": list(self.box), "meters": self.meters}


@dataclass
class Scene:
    """Labels, geometry and caption of one synthetic image."""

    index: int
    split: str
    width: int
    height: int
    sidewalk_pos: str
    road_pos: str
    cells: dict[str, str]
    horizon: float = 0.0
    vanish_x: float = 0.0
    items: list[Item] = field(default_factory=list)
    borders: dict[str, str] = field(default_factory=dict)  # left/right -> what lines the sidewalk
    crossing_meters: int = 0
    caption: str = ""
    caption_flaws: dict[str, Any] = field(default_factory=dict)
    quirk: str = ""
    has_mask: bool = False

    @property
    def image_name(self) -> str:
        return f"{self.index:06d}.jpg"

    @property
    def image_path(self) -> str:
        return f"{SPLIT_DIRS[self.split]}/images/{self.image_name}"

    @property
    def mask_path(self) -> str:
        """The label mask (PNG, values as in :data:`MASK_SIDEWALK` and friends) beside the image folder."""
        return f"{SPLIT_DIRS[self.split]}/masks/{self.index:06d}.png"


# Mask values returned by render_scene(with_mask=True): items get ITEM_MASK_BASE + index.
MASK_SIDEWALK, MASK_ROAD, ITEM_MASK_BASE = 1, 2, 16

# Real-world size (height, width) in meters; pixels per meter grow linearly below the horizon.
KIND_SIZE = {
    "person": (1.75, 0.6), "car": (1.5, 1.9), "car_side": (1.5, 4.0), "bicycle": (1.05, 1.75),
    "cone": (0.75, 0.5), "barrier": (1.0, 1.6), "bollard": (0.9, 0.3), "bin": (1.0, 0.7),
    "traffic sign": (2.6, 0.75), "traffic light": (3.0, 0.5),
    "grass": (0.5, 3.0), "plants": (0.9, 1.5), "trees": (5.0, 2.8),
}
PX_PER_METER_PER_PX_BELOW_HORIZON = 0.7
NEAR_DEPTH, FAR_DEPTH = (0.5, 0.95), (0.06, 0.22)  # fraction of the ground between horizon and bottom


def _meters_for_depth(depth: float) -> int:
    """Distance implied by the perspective: 2.2 m at the bottom edge, farther toward the horizon."""
    meters = 2.2 / max(depth, 0.02)
    return int(round(meters)) if meters < 6 else int(5 * round(meters / 5))


def _pick(rng: np.random.Generator, options: dict[Any, float]) -> Any:
    keys = list(options)
    p = np.array([options[k] for k in keys], dtype=float)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def _sample_cell(rng: np.random.Generator, column: str) -> str:
    values = REAL_CELL_VALUES[column]
    u = rng.random()
    for value, p in values.items():
        if u < p:
            return value
        u -= p
    return EMPTY_CELL


def sample_labels(rng: np.random.Generator) -> tuple[str, str, dict[str, str]]:
    """(sidewalk_pos, road_pos, {object column: cell}) drawn with the real frequencies."""
    sidewalk, road = _pick(rng, REAL_SIDEWALK_ROAD)
    cells = {c: _sample_cell(rng, c) for c in (*NEAR_COLUMNS, *FAR_COLUMNS)}
    return sidewalk, road, cells


# --- Drawing ---------------------------------------------------------------------

Color = tuple[int, int, int]


class Painter:
    """Draws at ``scale`` x resolution (anti-aliasing by downsampling) and, optionally, a label mask."""

    def __init__(self, width: int, height: int, scale: int, base: Image.Image, with_mask: bool):
        self.s = scale
        self.image = base
        self.draw = ImageDraw.Draw(self.image)
        self.mask = Image.new("L", (width * scale, height * scale), 0) if with_mask else None
        self.mdraw = ImageDraw.Draw(self.mask) if self.mask is not None else None
        self.mask_value: int | None = None  # None: leave the mask alone

    def _pts(self, pts: list[tuple[float, float]]) -> list[tuple[float, float]]:
        return [(x * self.s, y * self.s) for x, y in pts]

    def poly(self, pts: list[tuple[float, float]], fill: Color) -> None:
        pts = self._pts(pts)
        self.draw.polygon(pts, fill=fill)
        if self.mdraw is not None and self.mask_value is not None:
            self.mdraw.polygon(pts, fill=self.mask_value)

    def rect(self, x0: float, y0: float, x1: float, y1: float, fill: Color) -> None:
        self.poly([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], fill)

    def ellipse(self, x0: float, y0: float, x1: float, y1: float, fill: Color,
                outline: Color | None = None, width: float = 0) -> None:
        box = [x0 * self.s, y0 * self.s, max(x1, x0 + 0.5) * self.s, max(y1, y0 + 0.5) * self.s]
        lw = max(1, int(round(width * self.s))) if outline else 0
        self.draw.ellipse(box, fill=fill, outline=outline, width=lw)
        if self.mdraw is not None and self.mask_value is not None:
            self.mdraw.ellipse(box, fill=self.mask_value, outline=self.mask_value if outline else None, width=lw)

    def line(self, pts: list[tuple[float, float]], fill: Color, width: float) -> None:
        pts = self._pts(pts)
        lw = max(1, int(round(width * self.s)))
        self.draw.line(pts, fill=fill, width=lw)
        if self.mdraw is not None and self.mask_value is not None:
            self.mdraw.line(pts, fill=self.mask_value, width=lw)


def _jitter(rng: np.random.Generator, color: Color, amount: int = 14) -> Color:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in color)  # type: ignore[return-value]


SKIN = [(241, 200, 170), (224, 172, 130), (190, 135, 95), (140, 95, 65), (95, 65, 45)]
CLOTHES = [(200, 40, 40), (40, 90, 200), (240, 200, 40), (40, 150, 70), (150, 60, 160), (30, 30, 30),
           (240, 240, 240), (230, 120, 30), (90, 160, 200)]
CAR_PAINT = [(200, 30, 30), (30, 60, 170), (230, 230, 230), (40, 40, 45), (160, 160, 170), (230, 190, 30),
             (40, 130, 60), (120, 30, 120)]
SIDEWALK_PAVING = [(188, 186, 180), (206, 192, 164), (176, 104, 84), (200, 172, 160), (168, 168, 175)]
OUTER_GROUND = [(122, 110, 94), (108, 102, 96), (138, 120, 92), (96, 92, 84)]
ASPHALT = [(66, 66, 72), (80, 78, 82), (56, 58, 64)]
FACADES = [(180, 160, 130), (150, 90, 70), (200, 200, 190), (120, 120, 130), (210, 180, 140), (170, 130, 110)]


def _draw_person(p: Painter, it: Item, rng: np.random.Generator) -> None:
    x, yb, h, w = it.x, it.y_base, it.height, it.width
    head_r = h * 0.09
    shirt, trousers, skin = (_jitter(rng, CLOTHES[rng.integers(len(CLOTHES))]),
                             _jitter(rng, [(40, 40, 60), (60, 50, 40), (30, 30, 30), (70, 90, 140)][rng.integers(4)]),
                             SKIN[rng.integers(len(SKIN))])
    stride = w * (0.35 if it.variant == "walking" else 0.12)
    leg_w = max(w * 0.2, 1.2)
    hip = yb - h * 0.47
    p.line([(x - w * 0.1, hip), (x - stride, yb)], trousers, leg_w)
    p.line([(x + w * 0.1, hip), (x + stride, yb)], trousers, leg_w)
    p.poly([(x - w * 0.32, hip + h * 0.03), (x + w * 0.32, hip + h * 0.03), (x + w * 0.38, yb - h * 0.8),
            (x - w * 0.38, yb - h * 0.8)], shirt)
    arm = max(w * 0.14, 1.0)
    p.line([(x - w * 0.38, yb - h * 0.78), (x - w * 0.5, hip)], shirt, arm)
    p.line([(x + w * 0.38, yb - h * 0.78), (x + w * 0.5, hip)], shirt, arm)
    p.ellipse(x - head_r, yb - h + 0.0 * h, x + head_r, yb - h + 2 * head_r, skin)
    p.ellipse(x - head_r, yb - h - head_r * 0.1, x + head_r, yb - h + head_r * 0.8,
              [(30, 20, 10), (90, 60, 30), (200, 170, 80), (20, 20, 20)][rng.integers(4)])


def _draw_car(p: Painter, it: Item, rng: np.random.Generator) -> None:
    x, yb, h, w = it.x, it.y_base, it.height, it.width
    paint = _jitter(rng, CAR_PAINT[rng.integers(len(CAR_PAINT))])
    glass = (120, 160, 190)
    if it.variant == "side":
        wheel = h * 0.38
        p.poly([(x - w / 2, yb - wheel * 0.5), (x + w / 2, yb - wheel * 0.5), (x + w / 2, yb - h * 0.55),
                (x - w / 2, yb - h * 0.6)], paint)
        p.poly([(x - w * 0.28, yb - h * 0.6), (x + w * 0.22, yb - h * 0.6), (x + w * 0.12, yb - h),
                (x - w * 0.18, yb - h)], paint)
        p.poly([(x - w * 0.22, yb - h * 0.63), (x + w * 0.17, yb - h * 0.63), (x + w * 0.09, yb - h * 0.93),
                (x - w * 0.15, yb - h * 0.93)], glass)
        for cx in (x - w * 0.3, x + w * 0.3):
            p.ellipse(cx - wheel / 2, yb - wheel, cx + wheel / 2, yb, (25, 25, 25))
            p.ellipse(cx - wheel / 5, yb - wheel * 0.7, cx + wheel / 5, yb - wheel * 0.3, (170, 170, 170))
        p.rect(x + w * 0.44, yb - h * 0.5, x + w / 2, yb - h * 0.42, (250, 230, 120))
        return
    # rear view: wide body, rear window, two tail lights, tyres below
    p.rect(x - w * 0.45, yb - h * 0.22, x - w * 0.3, yb, (25, 25, 25))
    p.rect(x + w * 0.3, yb - h * 0.22, x + w * 0.45, yb, (25, 25, 25))
    p.poly([(x - w / 2, yb - h * 0.15), (x + w / 2, yb - h * 0.15), (x + w / 2, yb - h * 0.58),
            (x - w / 2, yb - h * 0.58)], paint)
    p.poly([(x - w * 0.42, yb - h * 0.58), (x + w * 0.42, yb - h * 0.58), (x + w * 0.32, yb - h),
            (x - w * 0.32, yb - h)], paint)
    p.poly([(x - w * 0.36, yb - h * 0.62), (x + w * 0.36, yb - h * 0.62), (x + w * 0.28, yb - h * 0.94),
            (x - w * 0.28, yb - h * 0.94)], glass)
    p.rect(x - w * 0.47, yb - h * 0.5, x - w * 0.3, yb - h * 0.4, (230, 20, 20))
    p.rect(x + w * 0.3, yb - h * 0.5, x + w * 0.47, yb - h * 0.4, (230, 20, 20))
    p.rect(x - w * 0.14, yb - h * 0.36, x + w * 0.14, yb - h * 0.27, (235, 235, 225))


def _draw_bicycle(p: Painter, it: Item, rng: np.random.Generator) -> None:
    x, yb, h, w = it.x, it.y_base, it.height, it.width
    frame = _jitter(rng, CLOTHES[rng.integers(len(CLOTHES))], 20)
    r = min(h * 0.33, w * 0.27)
    lw = max(r * 0.3, 1.5)  # thick tyres and tubes: thinner lines vanish at a twin's 112-px input
    back, front = (x - w / 2 + r, yb - r), (x + w / 2 - r, yb - r)
    for cx, cy in (back, front):
        p.ellipse(cx - r, cy - r, cx + r, cy + r, None, (20, 20, 20), lw)  # type: ignore[arg-type]
    seat, bar = (x - w * 0.08, yb - h * 0.85), (x + w * 0.22, yb - h * 0.92)
    crank = (x, yb - r)
    p.line([back, crank, (x + w * 0.18, yb - h * 0.72), back], frame, lw)
    p.line([(x + w * 0.18, yb - h * 0.72), seat], frame, lw)
    p.line([crank, seat], frame, lw)
    p.line([(x + w * 0.18, yb - h * 0.72), front], frame, lw)
    p.line([front, bar], frame, lw)
    p.line([(bar[0] - w * 0.06, bar[1]), (bar[0] + w * 0.05, bar[1])], (30, 30, 30), lw)
    p.line([(seat[0] - w * 0.07, seat[1]), (seat[0] + w * 0.05, seat[1])], (30, 30, 30), lw * 1.4)


def _draw_obstacle(p: Painter, it: Item, rng: np.random.Generator) -> None:
    x, yb, h, w = it.x, it.y_base, it.height, it.width
    if it.variant == "cone":
        p.poly([(x - w / 2, yb), (x + w / 2, yb), (x + w * 0.38, yb - h * 0.1), (x - w * 0.38, yb - h * 0.1)],
               (240, 110, 20))
        p.poly([(x - w * 0.36, yb - h * 0.1), (x + w * 0.36, yb - h * 0.1), (x + w * 0.06, yb - h),
                (x - w * 0.06, yb - h)], (250, 110, 10))
        p.poly([(x - w * 0.24, yb - h * 0.42), (x + w * 0.24, yb - h * 0.42), (x + w * 0.17, yb - h * 0.6),
                (x - w * 0.17, yb - h * 0.6)], (245, 245, 245))
    elif it.variant == "barrier":
        leg = max(w * 0.05, 1.0)
        for lx in (x - w * 0.4, x + w * 0.4):
            p.line([(lx, yb), (lx, yb - h * 0.95)], (240, 240, 240), leg)
        p.rect(x - w / 2, yb - h, x + w / 2, yb - h * 0.6, (245, 245, 245))
        stripes = 5
        for i in range(stripes):
            x0 = x - w / 2 + i * w / stripes
            p.poly([(x0, yb - h * 0.6), (x0 + w / stripes / 2, yb - h * 0.6),
                    (x0 + w / stripes, yb - h), (x0 + w / stripes / 2, yb - h)], (220, 30, 30))
    elif it.variant == "bollard":
        grey = _jitter(rng, (110, 110, 115), 20)
        p.rect(x - w / 2, yb - h * 0.9, x + w / 2, yb, grey)
        p.ellipse(x - w / 2, yb - h, x + w / 2, yb - h * 0.8, grey)
        p.rect(x - w / 2, yb - h * 0.75, x + w / 2, yb - h * 0.65, (240, 240, 240))
    else:  # bin
        body = _jitter(rng, [(40, 110, 60), (70, 70, 75), (30, 80, 150)][rng.integers(3)], 10)
        p.poly([(x - w * 0.45, yb), (x + w * 0.45, yb), (x + w / 2, yb - h * 0.88), (x - w / 2, yb - h * 0.88)], body)
        p.rect(x - w * 0.54, yb - h, x + w * 0.54, yb - h * 0.86, (30, 30, 30))


def _draw_pole(p: Painter, x: float, yb: float, top: float, w: float) -> None:
    p.rect(x - w / 2, top, x + w / 2, yb, (125, 128, 132))


def _draw_traffic_sign(p: Painter, it: Item, rng: np.random.Generator) -> None:
    x, yb, h, w = it.x, it.y_base, it.height, it.width
    _draw_pole(p, x, yb, yb - h * 0.75, max(w * 0.09, 1.0))
    cy, r = yb - h + w / 2, w / 2
    if it.variant == "round":  # prohibition sign: red ring on white
        p.ellipse(x - r, cy - r, x + r, cy + r, (205, 20, 25))
        p.ellipse(x - r * 0.72, cy - r * 0.72, x + r * 0.72, cy + r * 0.72, (245, 245, 245))
        p.rect(x - r * 0.5, cy - r * 0.12, x + r * 0.5, cy + r * 0.12, (205, 20, 25))
    elif it.variant == "blue":  # information sign: blue square with a white mark
        p.rect(x - r, cy - r, x + r, cy + r, (25, 70, 180))
        p.ellipse(x - r * 0.35, cy - r * 0.35, x + r * 0.35, cy + r * 0.35, (245, 245, 245))
    else:  # warning sign: red-bordered triangle
        p.poly([(x, cy - r), (x + r, cy + r * 0.8), (x - r, cy + r * 0.8)], (205, 20, 25))
        p.poly([(x, cy - r * 0.55), (x + r * 0.62, cy + r * 0.55), (x - r * 0.62, cy + r * 0.55)], (245, 245, 245))


def _draw_traffic_light(p: Painter, it: Item, rng: np.random.Generator) -> None:
    x, yb, h, w = it.x, it.y_base, it.height, it.width
    _draw_pole(p, x, yb, yb - h * 0.7, max(w * 0.16, 1.0))
    top, box_h = yb - h, h * 0.36
    p.rect(x - w / 2, top, x + w / 2, top + box_h, (28, 28, 30))
    lit = {"red": 0, "amber": 1, "green": 2}[it.variant]
    colors = [((230, 20, 20), (70, 20, 20)), ((250, 180, 20), (70, 55, 20)), ((30, 220, 80), (20, 60, 30))]
    r = min(w * 0.32, box_h / 7)
    for i, (on, off) in enumerate(colors):
        cy = top + box_h * (i + 0.5) / 3
        p.ellipse(x - r, cy - r, x + r, cy + r, on if i == lit else off)


def _draw_grass(p: Painter, it: Item, rng: np.random.Generator) -> None:
    x, yb, h, w = it.x, it.y_base, it.height, it.width
    green = _jitter(rng, (70, 150, 50), 20)
    n = 10
    pts = [(x + w / 2 * math.cos(2 * math.pi * k / n) * (0.85 + 0.15 * rng.random()),
            yb - h / 2 + h / 2 * math.sin(2 * math.pi * k / n) * (0.8 + 0.2 * rng.random())) for k in range(n)]
    p.poly(pts, green)
    dark = tuple(int(c * 0.75) for c in green)
    for _ in range(6):
        bx = x + (rng.random() - 0.5) * w * 0.7
        by = yb - h * (0.25 + 0.5 * rng.random())
        p.line([(bx, by), (bx + w * 0.02, by - h * 0.35)], dark, max(w * 0.015, 0.6))  # type: ignore[arg-type]


def _draw_plants(p: Painter, it: Item, rng: np.random.Generator) -> None:
    x, yb, h, w = it.x, it.y_base, it.height, it.width
    leaf = _jitter(rng, (40, 110, 45), 15)
    for k in range(5):
        cx = x + (k - 2) / 2 * w * 0.26
        r = w * (0.18 + 0.06 * rng.random())  # the outer leaves end at the item's width
        cy = yb - r * (1.0 + 0.5 * (k % 2))
        p.ellipse(cx - r, max(cy - r, yb - h), cx + r, min(cy + r, yb), tuple(int(c * (0.85 + 0.1 * (k % 3))) for c in leaf))  # type: ignore[arg-type]
    if it.variant == "flowers":
        for _ in range(5):
            fx, fy = x + (rng.random() - 0.5) * w * 0.7, yb - h * (0.3 + 0.5 * rng.random())
            fr = max(w * 0.03, 0.6)
            p.ellipse(fx - fr, fy - fr, fx + fr, fy + fr, (235, 80, 160))


def _draw_tree(p: Painter, it: Item, rng: np.random.Generator) -> None:
    x, yb, h, w = it.x, it.y_base, it.height, it.width
    trunk_w = max(w * 0.12, 1.0)
    p.rect(x - trunk_w / 2, yb - h * 0.55, x + trunk_w / 2, yb, (100, 70, 40))
    crown = _jitter(rng, (50, 125, 45), 18)
    for dx, dy, rr in ((0, 0.72, 0.48), (-0.2, 0.6, 0.3), (0.2, 0.6, 0.3), (0, 0.9, 0.3)):  # stays within width
        r = w * rr
        cy = yb - h * dy
        p.ellipse(x + dx * w - r, cy - r, x + dx * w + r, cy + r, crown)


DRAWERS: dict[str, Callable[[Painter, Item, np.random.Generator], None]] = {
    "person": _draw_person, "car": _draw_car, "bicycle": _draw_bicycle, "obstacle": _draw_obstacle,
    "traffic sign": _draw_traffic_sign, "traffic light": _draw_traffic_light,
    "grass": _draw_grass, "plants": _draw_plants, "trees": _draw_tree,
}
VARIANTS = {
    "person": ("walking", "standing"), "car": ("rear",), "bicycle": ("",), "obstacle": ("cone", "barrier", "bollard", "bin"),
    "traffic sign": ("round", "blue", "triangle"), "traffic light": ("red", "amber", "green"),
    "grass": ("",), "plants": ("bush", "flowers"), "trees": ("",),
}


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def _item_size(kind: str, variant: str, y_base: float, scene: Scene, jitter: tuple[float, float],
               near: bool) -> tuple[float, float]:
    """(width, height) in pixels at ``y_base``: perspective size, shrunk to fit its third and the frame."""
    ppm = PX_PER_METER_PER_PX_BELOW_HORIZON * (y_base - scene.horizon) * (scene.height / 192)
    size_key = "car_side" if variant == "side" else variant if kind == "obstacle" else kind
    h_m, w_m = KIND_SIZE[size_key]
    h, w = h_m * ppm * jitter[0], w_m * ppm * jitter[1]
    # Narrower than its third, so one occluder never hides everything behind it.
    max_w = scene.width / 3 * (0.6 if near else 0.45)
    if w > max_w:  # shrink, keep the aspect ratio
        h, w = h * max_w / w, max_w
    max_h = y_base - 3 if kind != "trees" else y_base * 1.3  # only tree crowns may leave the frame
    if h > max_h:
        h, w = max_h, w * max_h / h
    return w, h


def _place_items(scene: Scene, rng: np.random.Generator, tries: int = 8) -> None:
    """Give every annotated token a spot inside its third, sized by perspective.

    Near items are placed first; each one takes the least-covered of a few candidate spots
    (position and depth), so occlusion stays partial and every labelled object remains visible.
    """
    W, H, hy = scene.width, scene.height, scene.horizon
    third = W / 3
    placed: list[tuple[float, float, float, float]] = []
    for column in (*NEAR_COLUMNS, *FAR_COLUMNS):
        cell = scene.cells[column]
        if cell == EMPTY_CELL:
            continue
        near = column in NEAR_COLUMNS
        kind = COLUMN_KIND[column]
        for token in cell.split("-"):
            variant = str(VARIANTS[kind][rng.integers(len(VARIANTS[kind]))])
            if kind == "car":
                variant = "rear" if near else "side"
            jitter = (rng.uniform(0.85, 1.15), rng.uniform(0.85, 1.15))
            depths = rng.uniform(*(NEAR_DEPTH if near else FAR_DEPTH), size=tries)
            offsets = rng.random(size=tries)
            best: tuple[float, float, float, float, float] | None = None  # covered share, x, y, w, h
            for depth, offset in zip(depths, offsets, strict=True):
                y_base = hy + depth * (H - hy)
                w, h = _item_size(kind, variant, y_base, scene, jitter, near)
                x = POSITIONS.index(token) * third + w / 2 + 3 + offset * max(third - w - 6, 0.0)
                box = (x - w / 2, y_base - h, x + w / 2, y_base)
                covered = sum(_overlap(box, other) for other in placed) / max(w * h, 1e-6)
                if best is None or covered < best[0]:
                    best = (covered, x, y_base, w, h)
            assert best is not None
            _, x, y_base, w, h = best
            placed.append((x - w / 2, y_base - h, x + w / 2, y_base))
            depth = (y_base - hy) / (H - hy)
            scene.items.append(Item(column, kind, token, near, float(x), float(y_base), float(w), float(h),
                                    variant, _meters_for_depth(depth)))


def _ground_line_x(x_bottom: float, y: float, scene: Scene) -> float:
    """x of the line from (x_bottom, H) to the vanishing point, at height y."""
    t = (scene.height - y) / (scene.height - scene.horizon)
    return x_bottom + (scene.vanish_x - x_bottom) * t


def _wedge(x_a: float, x_b: float, scene: Scene, y_top: float | None = None) -> list[tuple[float, float]]:
    """Ground polygon between two lines through the vanishing point, from the bottom edge up to y_top."""
    H = scene.height
    if y_top is None:
        return [(x_a, H), (x_b, H), (scene.vanish_x, scene.horizon)]
    return [(x_a, H), (x_b, H), (_ground_line_x(x_b, y_top, scene), y_top), (_ground_line_x(x_a, y_top, scene), y_top)]


def _draw_facade(p: Painter, scene: Scene, x_base: float, side: str, color: Color, rng: np.random.Generator) -> None:
    """A building wall standing along one side of the street, receding to the vanishing point."""
    H, hy, vx = scene.height, scene.horizon, scene.vanish_x
    roof_bottom = -H * rng.uniform(0.0, 0.6)  # roof height where the wall meets the bottom edge
    t_end = rng.uniform(0.75, 0.93)
    edge = 0.0 if side == "left" else float(scene.width)

    def at(t: float, y0: float) -> tuple[float, float]:
        return (x_base + (vx - x_base) * t, y0 + (hy - y0) * t)

    # roof line at the image edge (extrapolated)
    slope = (hy - roof_bottom) / (vx - x_base) if vx != x_base else 0.0
    roof_edge = (edge, roof_bottom + slope * (edge - x_base))
    p.poly([(x_base, H), at(t_end, H), at(t_end, roof_bottom), roof_edge, (edge, H)], color)
    window = tuple(int(c * 0.55) for c in color)
    for k in range(6):  # windows in perspective
        t0 = 0.08 + k * (t_end - 0.1) / 6
        t1 = t0 + (t_end - 0.1) / 12
        for lo, hi in ((0.3, 0.45), (0.6, 0.75)):
            yb0, yb1 = H + (roof_bottom - H) * lo, H + (roof_bottom - H) * hi
            p.poly([at(t0, yb0), at(t1, yb0), at(t1, yb1), at(t0, yb1)], window)  # type: ignore[arg-type]


def _side_is_busy(scene: Scene, side: str) -> bool:
    """A wall on this side would hide far items or sit on grass, plants or trees there."""
    position = side.capitalize()
    return any(it.position == position and (not it.near or it.kind in ("grass", "plants", "trees"))
               for it in scene.items)


def _draw_ground(p: Painter, scene: Scene, rng: np.random.Generator) -> None:
    """Sidewalk, curbs, road and facades; records what borders the sidewalk on each side."""
    W, H, hy = scene.width, scene.height, scene.horizon
    side, road = scene.sidewalk_pos, scene.road_pos
    paving = _jitter(rng, SIDEWALK_PAVING[rng.integers(len(SIDEWALK_PAVING))], 8)
    asphalt = _jitter(rng, ASPHALT[rng.integers(len(ASPHALT))], 6)
    curb = (205, 205, 200)
    centers = {"Center": (0.42, 0.58), "Left": (0.0, 0.17), "Right": (0.83, 1.0), "Outside": (0.45, 0.55)}
    center = W * rng.uniform(*centers[side])
    half = W * (rng.uniform(0.17, 0.27) if side == "Center" else rng.uniform(0.13, 0.2))
    if side == "Left" and road == "Left":  # leave room for the road at the left edge
        center, half = W * rng.uniform(0.14, 0.17), W * rng.uniform(0.1, 0.13)
    if side == "Right" and road == "Right":
        center, half = W * rng.uniform(0.83, 0.86), W * rng.uniform(0.1, 0.13)
    left_edge, right_edge = center - half, center + half
    curb_w, road_w = W * rng.uniform(0.02, 0.035), W * rng.uniform(0.55, 0.9)

    # Crossing road band (Front): for Outside the viewer stands at the road, so it reaches the bottom.
    band: tuple[float, float] | None = None
    if road == "Front":
        if side == "Outside":
            band = (hy + (H - hy) * rng.uniform(0.14, 0.24), H + 1)
        else:
            top = hy + (H - hy) * rng.uniform(0.28, 0.42)
            band = (top, top + (H - hy) * rng.uniform(0.18, 0.28))
        scene.crossing_meters = _meters_for_depth((band[1] - hy) / (H - hy)) if band[1] <= H else 0

    # side roads
    if road in ("Left", "Right"):
        if side == "Outside":
            road_edges = (W * rng.uniform(-0.4, -0.2), W * rng.uniform(0.3, 0.4)) if road == "Left" else (
                W * rng.uniform(0.6, 0.7), W * rng.uniform(1.2, 1.4))
        elif road == "Left":
            road_edges = (left_edge - curb_w - road_w, left_edge - curb_w)
        else:
            road_edges = (right_edge + curb_w, right_edge + curb_w + road_w)
        p.mask_value = MASK_ROAD
        p.poly(_wedge(*road_edges, scene), asphalt)
        p.mask_value = None
        mid = sum(road_edges) / 2
        marking = (240, 240, 235) if rng.random() < 0.6 else (235, 200, 40)
        for k in range(7):  # dashed center line, dashes shrink toward the horizon
            t0 = 1 - 0.82 ** (k * 1.6)
            t1 = 1 - 0.82 ** (k * 1.6 + 0.8)
            y0, y1 = H - t0 * (H - hy), H - t1 * (H - hy)
            xa0, xa1 = _ground_line_x(mid - 2, y0, scene), _ground_line_x(mid - 2, y1, scene)
            xb0, xb1 = _ground_line_x(mid + 2, y0, scene), _ground_line_x(mid + 2, y1, scene)
            p.poly([(xa0, y0), (xb0, y0), (xb1, y1), (xa1, y1)], marking)

    # facades on sides without a road
    for border_side in ("left", "right"):
        has_road = road.lower() == border_side and side != "Outside"
        if has_road:
            scene.borders[border_side] = "a road"
        elif side != "Outside" and rng.random() < 0.6 and not _side_is_busy(scene, border_side):
            # the wall must lie well outside the vanishing point, or it would stand across the street
            x_base = (min(left_edge - curb_w - W * rng.uniform(0.05, 0.25), scene.vanish_x - 0.35 * W)
                      if border_side == "left"
                      else max(right_edge + curb_w + W * rng.uniform(0.05, 0.25), scene.vanish_x + 0.35 * W))
            _draw_facade(p, scene, x_base, border_side,
                         _jitter(rng, FACADES[rng.integers(len(FACADES))], 10), rng)
            scene.borders[border_side] = "a building"
        else:
            scene.borders[border_side] = "a paved area"

    if side == "Outside":  # only a thin far strip of sidewalk near the horizon
        y0 = hy + (H - hy) * rng.uniform(0.03, 0.06)
        y1 = y0 + (H - hy) * rng.uniform(0.05, 0.08)
        p.mask_value = MASK_SIDEWALK
        p.rect(-1, y0, W + 1, y1, paving)
        p.mask_value = None
        p.rect(-1, y1, W + 1, y1 + (H - hy) * 0.015 + 0.5, curb)
    else:
        p.poly(_wedge(left_edge - curb_w, left_edge, scene), curb)
        p.poly(_wedge(right_edge, right_edge + curb_w, scene), curb)
        p.mask_value = MASK_SIDEWALK
        p.poly(_wedge(left_edge, right_edge, scene), paving)
        p.mask_value = None
        seam = tuple(int(c * 0.8) for c in paving)
        for k in range(1, 12):  # paving seams, closer together with distance
            y = H - (1 - 0.8 ** k) * (H - hy)
            p.line([(_ground_line_x(left_edge, y, scene), y), (_ground_line_x(right_edge, y, scene), y)],
                   seam, 0.5)  # type: ignore[arg-type]

    if band is not None:
        p.mask_value = MASK_ROAD
        p.rect(-1, band[0], W + 1, band[1], asphalt)
        p.mask_value = None
        p.rect(-1, band[0], W + 1, band[0] + 1.2, curb)
        if band[1] < H:
            p.rect(-1, band[1] - 1.2, W + 1, band[1], curb)
        # zebra stripes where the walkway crosses
        mid_y = (band[0] + band[1]) / 2
        if side == "Outside":
            xa, xb = W * 0.3, W * 0.7
        else:
            xa, xb = _ground_line_x(left_edge, mid_y, scene), _ground_line_x(right_edge, mid_y, scene)
        n = 6
        for k in range(n):
            x0 = xa + (xb - xa) * k / n
            p.rect(x0, band[0] + 2.5, x0 + (xb - xa) / n * 0.55, band[1] - 2.5, (238, 238, 232))
        scene.borders.setdefault("front", "a road")


def _draw_sky_and_skyline(base: np.ndarray, scene: Scene, rng: np.random.Generator, scale: int) -> None:
    """Sky gradient above the horizon, outer ground colour below (numpy, in place)."""
    hy = int(scene.horizon * scale)
    overcast = rng.random() < 0.3
    top = np.array((170, 175, 180) if overcast else (90, 150, 225), dtype=np.float32)
    bottom = np.array((210, 212, 215) if overcast else (190, 215, 240), dtype=np.float32)
    ramp = np.linspace(0, 1, hy, dtype=np.float32)[:, None]
    base[:hy] = (top + (bottom - top) * ramp)[:, None, :]
    base[hy:] = np.array(_jitter(rng, OUTER_GROUND[rng.integers(len(OUTER_GROUND))], 8), dtype=np.float32)


def _draw_background(p: Painter, scene: Scene, rng: np.random.Generator) -> None:
    """Clouds and a skyline of distant buildings resting on the horizon."""
    W, hy = scene.width, scene.horizon
    for _ in range(int(rng.integers(0, 4))):
        cx, cy, r = rng.uniform(0, W), rng.uniform(0, hy * 0.6), rng.uniform(8, 22)
        for dx in (-0.8, 0, 0.8):
            p.ellipse(cx + dx * r - r * 0.7, cy - r * 0.45, cx + dx * r + r * 0.7, cy + r * 0.45, (245, 245, 248))
    x = -rng.uniform(0, 20)
    while x < W:
        bw, bh = rng.uniform(14, 40), rng.uniform(0.15, 0.75) * hy
        color = _jitter(rng, FACADES[rng.integers(len(FACADES))], 18)
        muted = tuple(int(c * 0.75 + 200 * 0.25) for c in color)  # aerial perspective
        p.rect(x, hy - bh, x + bw, hy + 0.5, muted)  # type: ignore[arg-type]
        win = tuple(int(c * 0.7) for c in muted)
        for wy in np.arange(hy - bh + 4, hy - 4, 7):
            p.rect(x + 3, wy, x + bw - 3, wy + 2, win)  # type: ignore[arg-type]
        x += bw + rng.uniform(-4, 6)


def _apply_light_and_noise(img: Image.Image, rng: np.random.Generator, scene: Scene) -> Image.Image:
    """Global exposure, colour cast, an occasional cast shadow and sensor noise."""
    arr = np.asarray(img, dtype=np.float32)
    gain = rng.uniform(0.7, 1.2)
    cast = rng.normal(0, 6, size=3).astype(np.float32)
    arr = arr * gain + cast
    if rng.random() < 0.35:  # a soft building shadow over part of the ground
        H, W = arr.shape[:2]
        xs = np.arange(W, dtype=np.float32)[None, :]
        ys = np.arange(H, dtype=np.float32)[:, None]
        slope, offset = rng.uniform(-1.2, 1.2), rng.uniform(0.2, 0.8) * W
        shade = (xs - offset - slope * (ys - scene.horizon) < 0) if rng.random() < 0.5 else (
            xs - offset - slope * (ys - scene.horizon) > 0)
        shade &= ys > scene.horizon
        arr[shade] *= rng.uniform(0.6, 0.8)
    sigma = rng.uniform(1.0, 7.0)
    arr += rng.normal(0, sigma, size=arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def render_scene(scene: Scene, rng: np.random.Generator, *, with_mask: bool = False,
                 scale: int = 2) -> tuple[Image.Image, np.ndarray | None]:
    """Draw the scene. With ``with_mask`` also return a label mask (sidewalk 1, road 2, items 16+i)."""
    W, H = scene.width, scene.height
    base = np.zeros((H * scale, W * scale, 3), dtype=np.float32)
    _draw_sky_and_skyline(base, scene, rng, scale)
    painter = Painter(W, H, scale, Image.fromarray(base.astype(np.uint8)), with_mask)
    _draw_background(painter, scene, rng)
    _draw_ground(painter, scene, rng)
    for index, item in sorted(enumerate(scene.items), key=lambda pair: pair[1].y_base):  # far first
        item.mask_id = ITEM_MASK_BASE + index
        painter.mask_value = item.mask_id
        DRAWERS[item.kind](painter, item, rng)
        painter.mask_value = None
        item.box = (int(item.x - item.width / 2), int(item.y_base - item.height), int(math.ceil(item.x + item.width / 2)),
                    int(math.ceil(item.y_base)))
    image = painter.image.resize((W, H), Image.Resampling.BOX)
    image = _apply_light_and_noise(image, rng, scene)
    mask = None
    if painter.mask is not None:
        mask = np.asarray(painter.mask.resize((W, H), Image.Resampling.NEAREST))
    return image, mask


# --- Captions ----------------------------------------------------------------------

_SIDEWALK_PHRASES = {
    "Center": ("The sidewalk is centered in the view", "The sidewalk runs straight ahead in the center of the view",
               "The sidewalk is in the center"),
    "Left": ("The sidewalk is on the left side of the view", "The sidewalk is located on the left side of the view"),
    "Right": ("The sidewalk is on the right side of the view", "The sidewalk is located on the right side of the view"),
}
_NUMBER_WORDS = {1: "A", 2: "Two", 3: "Three", 4: "Four"}
_NEAR_VERBS = {
    "person": ("is walking", "are walking", "stands", "stand"), "car": ("is parked", "are parked"),
    "bicycle": ("is parked", "are parked"), "obstacle": ("stands", "stand"),
    "traffic sign": ("stands", "stand"), "traffic light": ("stands", "stand"), "trees": ("stands", "stand"),
    "plants": ("grows", "grow"), "grass": ("lies", "lie"),
}
_NOUNS = {
    "person": ("person", "people"), "car": ("car", "cars"), "bicycle": ("bicycle", "bicycles"),
    "obstacle": ("obstacle", "obstacles"), "cone": ("cone", "cones"), "barrier": ("barrier", "barriers"),
    "bollard": ("bollard", "bollards"), "traffic sign": ("traffic sign", "traffic signs"),
    "traffic light": ("traffic light", "traffic lights"), "trees": ("tree", "trees"),
    "plants": ("bush", "bushes"), "grass": ("patch of grass", "patches of grass"),
}
_SIDE_WORDS = {"Left": "on the left side", "Right": "on the right side", "Center": "in the center of the path"}


def _where(positions: list[str]) -> str:
    unique = list(dict.fromkeys(positions))
    if len(unique) == 1:
        return _SIDE_WORDS[unique[0]]
    words = [p.lower() for p in unique]
    return "on the " + " and ".join(words)


def _object_sentence(kind: str, items: list[Item], near: bool) -> str:
    variants = {it.variant for it in items}
    noun_key = variants.pop() if kind == "obstacle" and len(variants) == 1 and items[0].variant != "bin" else kind
    singular, plural = _NOUNS[noun_key]
    count = len(items)
    noun = singular if count == 1 else plural
    article = "An" if count == 1 and noun[0] in "aeiou" else _NUMBER_WORDS.get(count, str(count))
    where = _where([it.position for it in items])
    if not near:
        meters = max(it.meters for it in items)
        return f"{article} {noun} {'is' if count == 1 else 'are'} visible further ahead {where}, about {meters} meters away."
    verbs = _NEAR_VERBS[kind]
    verb = verbs[0] if count == 1 else verbs[1]
    meters = min(it.meters for it in items)
    sentence = f"{article} {noun} {verb} approximately {meters} meters ahead {where}"
    if kind == "traffic light" and count == 1:
        sentence += f", showing a {items[0].variant} signal"
    if kind in ("obstacle", "person", "bicycle", "car") and any(it.position == "Center" for it in items):
        sentence += ", partially obstructing the path"
    return sentence + "."


def compose_target(scene: Scene, rng: np.random.Generator, *, omit_rate: float = 0.3,
                   contradiction_rate: float = 0.03) -> str:
    """A free-text caption in the style of the real ``target`` column.

    Like the real ones it sometimes leaves out close objects (``omit_rate`` of the scenes that
    have any) and, rarely, contradicts the annotation about the sidewalk (``contradiction_rate``).
    Both flaws are recorded in ``scene.caption_flaws``.
    """
    side, road = scene.sidewalk_pos, scene.road_pos
    sentences: list[str] = []
    said_side = side
    if side != "Outside" and rng.random() < contradiction_rate:
        said_side = str(rng.choice([s for s in POSITIONS if s != side]))
        scene.caption_flaws["contradiction"] = {"field": "sidewalk_pos", "said": said_side, "true": side}
    left, right = scene.borders.get("left", "a paved area"), scene.borders.get("right", "a paved area")
    for column, border in (("m_grass", "a grassy area"), ("m_plants", "bushes"), ("m_trees", "trees")):
        tokens = scene.cells[column].split("-") if scene.cells[column] != EMPTY_CELL else []
        if "Left" in tokens and left != "a road":
            left = border
        if "Right" in tokens and right != "a road":
            right = border
    if side == "Outside":
        if road == "Front":
            sentences.append("A road is directly in front of you, with a sidewalk visible on the opposite side.")
            sentences.append("Cross the road carefully to reach the sidewalk.")
        else:
            sentences.append("There is no sidewalk directly ahead; a sidewalk is visible further away.")
            if road in ("Left", "Right"):
                sentences.append(f"A road runs on the {road.lower()} side.")
    else:
        opening = str(rng.choice(_SIDEWALK_PHRASES[said_side]))
        if road == "Front":
            sentences.append(f"{opening}, leading to a pedestrian crossing.")
            sentences.append(f"A road crosses the path approximately {max(scene.crossing_meters, 3)} meters ahead.")
        elif road in ("Left", "Right") and rng.random() < 0.5:
            other = right if road == "Left" else left
            sentences.append(f"{opening}, bordered by {other} on the {'right' if road == 'Left' else 'left'}.")
            sentences.append(f"A road runs parallel to the sidewalk on the {road.lower()} side.")
        elif left == right:
            sentences.append(f"{opening}, with {left} on both sides.")
        else:
            sentences.append(f"{opening}, bordered by {left} on the left and {right} on the right.")

    near_kinds = [k for k in ("person", "bicycle", "car", "obstacle", "traffic sign", "traffic light", "trees")
                  if any(it.kind == k and it.near for it in scene.items)]
    omitted: list[str] = []
    if near_kinds and rng.random() < omit_rate:
        omitted = near_kinds if rng.random() < 0.5 else [str(rng.choice(near_kinds))]
        scene.caption_flaws["omitted_near"] = omitted
    for kind in near_kinds:
        if kind not in omitted:
            sentences.append(_object_sentence(kind, [it for it in scene.items if it.kind == kind and it.near], True))
    far_kinds = [k for k in ("car", "person", "bicycle", "traffic light", "traffic sign", "obstacle")
                 if any(it.kind == k and not it.near for it in scene.items)]
    if far_kinds and rng.random() < 0.6:
        for kind in far_kinds[:2]:
            sentences.append(_object_sentence(kind, [it for it in scene.items if it.kind == kind and not it.near], False))
    blocked = any(it.near and it.position == "Center" and it.kind in ("person", "obstacle", "bicycle", "car")
                  for it in scene.items)
    if blocked:
        sentences.append(str(rng.choice(["Caution is required to navigate.", "Walk slowly and keep to the side."])))
    else:
        sentences.append(str(rng.choice(["The path is clear for next 10 meters.", "The path is clear for navigation.",
                                         "The path appears clear for navigation."])))
    return " ".join(sentences)


# --- Scenes and data set -------------------------------------------------------------


def make_scene(index: int, seed: int = 0, image_size: tuple[int, int] = (256, 192), split: str = "train",
               *, with_mask: bool = False) -> tuple[Scene, Image.Image, np.ndarray | None]:
    """Sample, draw and caption scene ``index``; the same (index, seed) always gives the same scene."""
    rng = np.random.default_rng([seed, index])
    W, H = image_size
    sidewalk, road, cells = sample_labels(rng)
    scene = Scene(index, split, W, H, sidewalk, road, cells)
    scene.horizon = H * rng.uniform(0.36, 0.46)
    vanish = {"Center": (0.44, 0.56), "Left": (0.3, 0.4), "Right": (0.6, 0.7), "Outside": (0.4, 0.6)}[sidewalk]
    scene.vanish_x = W * rng.uniform(*vanish)
    _place_items(scene, rng)
    image, mask = render_scene(scene, rng, with_mask=with_mask)
    scene.caption = compose_target(scene, rng)
    return scene, image, mask


def assign_splits(n: int, seed: int) -> list[str]:
    """Shuffled train/val/test labels in the real proportions, at least a few val/test for small n."""
    n_val = max(round(n * SPLIT_FRACTIONS["val"]), min(MIN_EVAL_SPLIT, n // 5))
    n_test = max(round(n * SPLIT_FRACTIONS["test"]), min(MIN_EVAL_SPLIT, n // 5))
    splits = ["val"] * n_val + ["test"] * n_test + ["train"] * (n - n_val - n_test)
    order = np.random.default_rng([seed, 10**9]).permutation(n)
    return [splits[i] for i in order]


def annotation_row(scene: Scene) -> list[str]:
    near_present = any(scene.cells[c] != EMPTY_CELL for c in NEAR_COLUMNS)
    far_present = any(scene.cells[c] != EMPTY_CELL for c in FAR_COLUMNS)
    return [scene.image_name, "done", scene.sidewalk_pos, scene.road_pos, "Yes" if near_present else "No",
            "Yes" if far_present else "No", *(scene.cells[c] for c in (*NEAR_COLUMNS, *FAR_COLUMNS))]


def _csv_bytes(header: list[str], rows: list[list[str]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def _write_jpeg(path: Path, image: Image.Image, quality: int) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="JPEG", quality=quality)


def _write_png(path: Path, image: Image.Image) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", optimize=True)


def _draw_and_write(task: tuple[int, int, tuple[int, int], str, bool, Path, int]) -> Scene:
    """Draw one scene and write its image (and mask); a worker of :func:`generate_dataset`."""
    index, seed, image_size, split, masks, out, jpeg_quality = task
    scene, image, mask = make_scene(index, seed, image_size, split, with_mask=masks)
    _write_jpeg(out / scene.image_path, image, jpeg_quality)
    if mask is not None:
        _write_png(out / scene.mask_path, Image.fromarray(mask.astype(np.uint8), mode="L"))
        scene.has_mask = True
    return scene


def generate_dataset(out_dir: str | Path, n: int = 1000, seed: int = 0, image_size: tuple[int, int] = (256, 192),
                     show_progress: bool = True, quirks: bool = True, jpeg_quality: int = 85,
                     masks: bool = True, workers: int = 0) -> dict[str, Path]:
    """Draw ``n`` scenes into ``out_dir`` and write the two SENSATION-style CSVs.

    With ``masks`` each scene's label mask is saved as a PNG (``<split dir>/masks/``, pixel values
    0 ground/sky/buildings, :data:`MASK_SIDEWALK`, :data:`MASK_ROAD`, and :data:`ITEM_MASK_BASE` + i
    for ``items[i]`` of ``synth_scenes.jsonl``): the dense ground truth the tiny twin's vision
    tower is pre-trained on (:mod:`bvip_helpers.demo.pretrain`). The real data set has no such masks.

    With ``quirks`` (the default) the annotations carry two of the real file's flaws so the
    dataset builder's checks have something to report: one exact duplicate row and one row
    whose object cells are all empty (like the real ``0066.jpg``). ``workers`` processes draw the
    scenes (0: one per CPU core); every scene depends only on (index, seed), so the files are the same
    for any number. Returns the paths ``captions_csv``, ``annotations_csv``, ``image_root`` and
    ``scenes_jsonl``.
    """
    if n < 1:
        raise ValueError(f"--n must be at least 1, got {n}")
    out = resolve(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    splits = assign_splits(n, seed)
    tasks = [(index, seed, image_size, splits[index], masks, out, jpeg_quality) for index in range(n)]
    workers = min(workers or os.cpu_count() or 1, max(1, n // 64))  # a pool only pays off for many scenes
    with ExitStack() as stack:
        if workers > 1:  # spawned, not forked: safe inside a Jupyter kernel that already runs torch threads
            pool = stack.enter_context(multiprocessing.get_context("spawn").Pool(workers))
            drawn: Any = pool.imap(_draw_and_write, tasks, chunksize=16)
        else:
            drawn = map(_draw_and_write, tasks)
        if show_progress:
            from tqdm.auto import tqdm

            drawn = tqdm(drawn, total=n, desc="synth", unit="scene")
        scenes: list[Scene] = list(drawn)

    rows = [annotation_row(s) for s in scenes]
    if quirks and n >= 4:
        blank = n // 2
        rows[blank] = [*rows[blank][:4], "N", "", *([""] * (len(NEAR_COLUMNS) + len(FAR_COLUMNS)))]
        scenes[blank].quirk = "empty_object_cells"
        duplicate = n // 3
        rows.insert(2 * n // 3 + 1, list(rows[duplicate]))
        scenes[duplicate].quirk = "duplicate_annotation_row"
    captions = sorted(([s.image_path, s.caption, s.split] for s in scenes), key=lambda r: r[0])

    paths = {"captions_csv": out / CAPTIONS_FILE, "annotations_csv": out / ANNOTATIONS_FILE,
             "image_root": out, "scenes_jsonl": out / SCENES_FILE}
    for key, header, body in (("captions_csv", CAPTION_COLUMNS, captions),
                              ("annotations_csv", ANNOTATION_COLUMNS, rows)):
        with atomic_path(paths[key]) as tmp:
            tmp.write_text(_csv_bytes(header, body), encoding="utf-8", newline="")
    with atomic_path(paths["scenes_jsonl"]) as tmp:
        tmp.write_text("".join(json.dumps(scene_record(s)) + "\n" for s in scenes), encoding="utf-8")
    return paths


# --- Reading scenes back ------------------------------------------------------


def read_scenes(image_root: str | os.PathLike[str], split: str = "train",
                allow_empty: bool = False) -> list[dict[str, Any]]:
    """The scenes of one split from ``synth_scenes.jsonl`` (written by ``bvip synth``); an empty split
    raises unless ``allow_empty``."""
    path = resolve(image_root) / SCENES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: vision pre-training needs synthetic scenes and their label masks; "
                                f"draw them with `bvip synth --out_dir {image_root}`")
    scenes = [s for s in iter_jsonl(path) if s.get("split") == split]
    if not scenes and not allow_empty:
        raise ValueError(f"{path}: no scenes in split {split!r}")
    return scenes


def scene_picture_and_mask(loaded: dict[str, tuple[Any, Any]], image_root: Path,
                           scene: dict[str, Any]) -> tuple[Any, Any]:
    """A training scene's image and label mask, read from disk once."""
    if scene["image_path"] not in loaded:
        loaded[scene["image_path"]] = (load_image(safe_image_path(image_root, scene["image_path"])),
                                       load_mask(image_root, scene))
    return loaded[scene["image_path"]]


def load_mask(image_root: str | os.PathLike[str], scene: dict[str, Any]) -> Any:
    """A scene's label mask as a 2-D uint8 array (values as :func:`generate_dataset` describes)."""
    image_root = Path(image_root)
    if not scene.get("mask_path"):
        raise FileNotFoundError(f"{image_root / SCENES_FILE}: scene {scene['image_path']} has no label mask; "
                                f"redraw the scenes with `bvip synth --out_dir {image_root}` (masks are on by default)")
    with Image.open(safe_image_path(image_root, scene["mask_path"])) as mask:
        return np.asarray(mask.convert("L"))


def scene_record(scene: Scene) -> dict[str, Any]:
    """What ``synth_scenes.jsonl`` keeps per scene: geometry and the deliberate caption flaws."""
    return {"image": scene.image_name, "image_path": scene.image_path, "split": scene.split,
            "sidewalk_pos": scene.sidewalk_pos, "road_pos": scene.road_pos,
            "horizon": round(scene.horizon, 2), "vanish_x": round(scene.vanish_x, 2),
            "items": [it.as_dict() for it in scene.items], "caption_flaws": scene.caption_flaws,
            "quirk": scene.quirk, "mask_path": scene.mask_path if scene.has_mask else None}


# --- Comparing with the real labels ------------------------------------------------------


def _label_table(frame: Any) -> dict[tuple[str, str], float]:
    """(column, value) -> frequency: sidewalk/road values, Object_present rates, per-column presence."""
    out: dict[tuple[str, str], float] = {}
    frame = frame[frame["status"] == "done"]
    for column in ("sidewalk_pos", "road_pos", "Object_present", "Object_present_outside"):
        for value, freq in frame[column].value_counts(normalize=True).items():
            out[(column, str(value))] = float(freq)
    for column in (*NEAR_COLUMNS, *FAR_COLUMNS):
        cells = frame[column].fillna("").astype(str).str.strip().str.lower()
        out[(column, "present")] = float((~cells.isin(["", "not present"])).mean())
    return out


def compare_label_frequencies(synth_annotations_csv: str | Path, real_annotations_csv: str | Path | None = None,
                              *, show: bool = True) -> Any:
    """Side-by-side label frequencies of a synthetic and the real annotation CSV.

    Without ``real_annotations_csv`` the real column comes from :data:`REAL_SIDEWALK_ROAD` and
    :data:`REAL_CELL_VALUES`. Returns a DataFrame (column, value, synth, real, diff) and prints it.
    """
    import pandas as pd

    synth = _label_table(pd.read_csv(synth_annotations_csv, dtype=str, keep_default_na=False))
    if real_annotations_csv is not None:
        real = _label_table(pd.read_csv(real_annotations_csv, dtype=str, keep_default_na=False))
    else:
        real = {(column, value): p for column, values in real_marginals().items() for value, p in values.items()}
    keys = list(dict.fromkeys([*real, *synth]))
    order = ["sidewalk_pos", "road_pos", "Object_present", "Object_present_outside", *NEAR_COLUMNS, *FAR_COLUMNS]
    keys.sort(key=lambda k: (order.index(k[0]) if k[0] in order else len(order), -real.get(k, 0.0)))
    table = pd.DataFrame([{"column": c, "value": v, "synth": round(synth.get((c, v), 0.0), 4),
                           "real": round(real.get((c, v), 0.0), 4)} for c, v in keys])
    table["diff"] = (table["synth"] - table["real"]).round(4)
    if show:
        print(table.to_string(index=False))
    return table


# --- CLI ------------------------------------------------------------------------------------


def _image_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--image_size must look like 256x192, got {text!r}") from err
    if width < 64 or height < 48:
        raise argparse.ArgumentTypeError(f"--image_size {text} is too small; use at least 64x48")
    return width, height


def configure_cli(parser: argparse.ArgumentParser) -> None:
    from bvip_helpers.io import resolve_cli_path

    parser.add_argument("--out_dir", type=resolve_cli_path, default="data/synthetic", help="folder for the CSVs and images")
    parser.add_argument("--n", type=int, default=1000, help="number of scenes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image_size", type=_image_size, default=(256, 192), help="WIDTHxHEIGHT, e.g. 256x192")
    parser.add_argument("--jpeg_quality", type=int, default=85)
    parser.add_argument("--no_quirks", action="store_true",
                        help="leave out the duplicate row and the empty-cells row")
    parser.add_argument("--compare_to", type=resolve_cli_path, default=None, metavar="REAL_CSV",
                        help="print label frequencies next to this real annotations CSV")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--workers", type=int, default=0, help="drawing processes (0: one per CPU core)")


def run_cli(args: argparse.Namespace) -> int:
    try:
        paths = generate_dataset(args.out_dir, n=args.n, seed=args.seed, image_size=args.image_size,
                                 show_progress=not args.quiet, quirks=not args.no_quirks,
                                 jpeg_quality=args.jpeg_quality, workers=args.workers)
    except ValueError as err:  # --n 0, a bad --jpeg_quality
        print(f"bvip synth: error: {err}", file=sys.stderr)
        return 2
    for key, path in paths.items():
        print(f"{key}: {path}")
    if args.compare_to:
        real = args.compare_to
        if not real.is_file():
            print(f"error: --compare_to {real} does not exist; pass the real annotations_with_obj_pos.csv")
            return 2
        compare_label_frequencies(paths["annotations_csv"], real)
    return 0
