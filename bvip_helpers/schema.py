"""The BVIP caption schema: one place for every rule about fields, objects and wording.

A BVIP priority caption looks like::

    Sidewalk: right. Road: left. RoadVsSidewalk: left_of.
    Nearby: a person close on the center; 2 obstacles close on the left and right.
    Far: a traffic light farther away on the left.

An object whose side the annotation does not name (a typo such as ``Leftish``) stays in the caption
with its side unknown: ``a person close, side unknown``, ``3 cars close on the left and right, 1 side
unknown``. A blind pedestrian must hear that someone is close even when nobody wrote down where.
    Context: A sidewalk is shown with a pedestrian ahead.

This module turns annotation cells into that text (:func:`compose_caption`) and any
text back into fields (:func:`parse_caption`). The dataset builder, the evaluator,
the synthetic-scene generator and constrained decoding all import from here, so
the rules cannot drift apart.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

# --- Mandatory fields -------------------------------------------------------

SIDEWALK_VALUES = ("left", "center", "right")
ROAD_VALUES = ("left", "center", "right", "front")
RELATION_VALUES = ("left_of", "right_of", "crossing_front")
UNKNOWN = "unknown"

#: field key (as in the JSONL / evaluator report) -> caption label.
FIELD_LABELS = {"sidewalk_pos": "Sidewalk", "road_pos": "Road", "road_vs_sidewalk": "RoadVsSidewalk"}
#: every value a field may take in a caption, ``unknown`` included.
FIELD_ENUMS = {
    "sidewalk_pos": (*SIDEWALK_VALUES, UNKNOWN),
    "road_pos": (*ROAD_VALUES, UNKNOWN),
    "road_vs_sidewalk": (*RELATION_VALUES, UNKNOWN),
}

_SYNONYMS = {"centre": "center", "centered": "center", "middle": "center"}
_EMPTY_CELLS = {"", "nan", "none", "not present", "n/a", "na"}


def normalize_position(value: object, allowed: tuple[str, ...]) -> str:
    """Map a raw annotation cell to an enum value, or ``unknown``.

    Lowercases and strips; ``centre`` means ``center``. Empty, NaN, ``not present``
    and anything outside ``allowed`` (``Outside``, ``No``, typos) become ``unknown``.
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return UNKNOWN
    text = str(value).strip().lower()
    text = _SYNONYMS.get(text, text)
    return text if text in allowed else UNKNOWN


def is_known_position(value: object, allowed: tuple[str, ...]) -> bool:
    """True when the raw cell is a recognised enum value or an accepted 'empty' marker."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return True
    text = str(value).strip().lower()
    return text in _EMPTY_CELLS or _SYNONYMS.get(text, text) in allowed


def derive_relation(sidewalk: str, road: str) -> str:
    """RoadVsSidewalk from normalised positions.

    ``crossing_front`` when the road is in front; ``right_of`` when the road lies to
    the right of the sidewalk, ``left_of`` in the mirror case; otherwise ``unknown``.
    """
    if road == "front":
        return "crossing_front"
    order = {"left": 0, "center": 1, "right": 2}
    if sidewalk in order and road in order and sidewalk != road:
        return "right_of" if order[road] > order[sidewalk] else "left_of"
    return UNKNOWN


def mandatory_prefix(sidewalk: str, road: str, relation: str) -> str:
    """The first line of every BVIP caption."""
    return f"Sidewalk: {sidewalk}. Road: {road}. RoadVsSidewalk: {relation}."


# --- Objects ----------------------------------------------------------------


@dataclass(frozen=True)
class ObjectClass:
    """One object class of the SENSATION annotations."""

    name: str  # singular noun used in captions
    plural: str
    near_column: str
    far_column: str
    synonyms: tuple[str, ...]  # words the structured evaluator accepts (singular and plural)
    critical: bool = False  # a close one missing from a caption is a critical miss


#: Caption order: obstacle, person, bicycle, car, traffic sign, traffic light.
OBJECT_CLASSES: tuple[ObjectClass, ...] = (
    ObjectClass("obstacle", "obstacles", "m_obstacle", "m_obstacle_outside",
                ("obstacle", "obstacles", "barrier", "barriers", "cone", "cones", "bollard", "bollards")),
    ObjectClass("person", "people", "m_person", "m_person_outside",
                ("person", "persons", "people", "pedestrian", "pedestrians", "man", "men", "woman", "women"),
                critical=True),
    ObjectClass("bicycle", "bicycles", "m_bicycle", "m_bicycle_outside",
                ("bicycle", "bicycles", "bike", "bikes", "cyclist", "cyclists"), critical=True),
    ObjectClass("car", "cars", "m_car", "m_car_outside",
                ("car", "cars", "vehicle", "vehicles", "auto", "autos"), critical=True),
    ObjectClass("traffic sign", "traffic signs", "m_traffic_sign", "m_traffic_sign_outside",
                ("traffic sign", "traffic signs", "sign", "signs")),
    ObjectClass("traffic light", "traffic lights", "traffic_light", "traffic_light_outside",
                ("traffic light", "traffic lights", "trafficlight", "signal", "signals")),
)
OBJECTS_BY_NAME = {o.name: o for o in OBJECT_CLASSES}
#: Scenery columns: annotated, but not objects a caption must list.
SCENERY_COLUMNS = ("m_grass", "m_plants", "m_trees")

OBJECT_POSITIONS = ("left", "center", "right")
_CELL_SPLIT = re.compile(r"[-,/\s]+")


def parse_object_cell(value: object) -> tuple[list[str], list[str]]:
    """Split a multi-object cell such as ``Left-Left-Center`` into positions.

    Returns ``(positions, unknown_tokens)``: positions sorted left, center, right, one per
    object. A token that is neither a position nor an empty marker (``Outside``, a typo such as
    ``Leftish``) is still an object, whose side is unknown: it adds an ``unknown`` position (sorted
    last), and the token is returned separately so callers can count and report it.
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return [], []
    text = str(value).strip().lower()
    if text in _EMPTY_CELLS:
        return [], []
    positions, unknown = [], []
    for token in _CELL_SPLIT.split(text):
        token = _SYNONYMS.get(token, token)
        if token in OBJECT_POSITIONS:
            positions.append(token)
        elif token and token not in {"not", "present", "none", "nan"}:
            unknown.append(token)
            positions.append(UNKNOWN)
    positions.sort(key=_position_order)
    return positions, unknown


def _position_order(position: str) -> int:
    """left, center, right, then unknown (and anything else) last."""
    return OBJECT_POSITIONS.index(position) if position in OBJECT_POSITIONS else len(OBJECT_POSITIONS)


def _article(noun: str) -> str:
    return "an" if noun[0] in "aeiou" else "a"


def _join_positions(positions: list[str]) -> str:
    if len(positions) == 1:
        return positions[0]
    return ", ".join(positions[:-1]) + " and " + positions[-1]


def object_phrase(obj: ObjectClass, positions: list[str], near: bool) -> str:
    """``a person close on the center`` / ``2 obstacles farther away on the left and right``.

    Unknown sides are said, never dropped: ``a person close, side unknown``, ``2 cars close, sides
    unknown``, ``3 cars close on the left and right, 1 side unknown`` (:func:`parse_caption` reads them back).
    """
    distance = "close" if near else "farther away"
    head = f"{_article(obj.name)} {obj.name}" if len(positions) == 1 else f"{len(positions)} {obj.plural}"
    known = [p for p in positions if p != UNKNOWN]
    n_unknown = len(positions) - len(known)
    if not n_unknown:
        return f"{head} {distance} on the {_join_positions(known)}"
    if not known:
        return f"{head} {distance}, {'side' if n_unknown == 1 else 'sides'} unknown"
    return f"{head} {distance} on the {_join_positions(known)}, {n_unknown} {'side' if n_unknown == 1 else 'sides'} unknown"


NOTHING_CLOSE = "nothing close"


@dataclass
class SceneLabels:
    """Ground truth of one image, normalised."""

    sidewalk_pos: str = UNKNOWN
    road_pos: str = UNKNOWN
    near: dict[str, list[str]] = field(default_factory=dict)  # object name -> positions
    far: dict[str, list[str]] = field(default_factory=dict)

    @property
    def road_vs_sidewalk(self) -> str:
        return derive_relation(self.sidewalk_pos, self.road_pos)


def compose_caption(labels: SceneLabels, context: str = "") -> str:
    """The priority caption for one scene: mandatory fields, Nearby, optional Far, Context."""
    lines = [mandatory_prefix(labels.sidewalk_pos, labels.road_pos, labels.road_vs_sidewalk)]
    near = [object_phrase(o, labels.near[o.name], True) for o in OBJECT_CLASSES if labels.near.get(o.name)]
    lines.append("Nearby: " + ("; ".join(near) if near else NOTHING_CLOSE) + ".")
    far = [object_phrase(o, labels.far[o.name], False) for o in OBJECT_CLASSES if labels.far.get(o.name)]
    if far:
        lines.append("Far: " + "; ".join(far) + ".")
    context = (context or "").strip()
    if context:
        lines.append("Context: " + context)
    return "\n".join(lines)


# --- Parsing ----------------------------------------------------------------

# re.A: ASCII-only case folding, so "ſ" (long s) or the Kelvin sign never match "s"/"k".
_FLAGS = re.I | re.A
#: Presence patterns, as the seed defines them: ``Field: value`` anywhere, case-insensitive.
#: Sidewalk and Road accept ``front`` (the seed accepts it for both).
FIELD_PATTERNS = {
    "sidewalk_pos": re.compile(r"(?<![a-z])sidewalk\s*:\s*(left|center|centre|right|front|unknown)\b", _FLAGS),
    "road_pos": re.compile(r"(?<![a-z])road\s*:\s*(left|center|centre|right|front|unknown)\b", _FLAGS),
    "road_vs_sidewalk": re.compile(r"roadvssidewalk\s*:\s*(left_of|right_of|crossing_front|unknown)\b", _FLAGS),
}
_SECTION = re.compile(r"\b(nearby|far|context)\s*:", _FLAGS)
_COUNT_WORDS = {"no": 0, "zero": 0, "a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6}
_NOUN_TO_CLASS = {syn: o.name for o in OBJECT_CLASSES for syn in o.synonyms}
# Longest synonyms first so "traffic light" wins over "light"-less partial matches.
_NOUN_ALTERNATION = "|".join(sorted(map(re.escape, _NOUN_TO_CLASS), key=len, reverse=True))
_OBJECT_MENTION = re.compile(
    rf"(?<![a-z])(?:(?P<count>\d{{1,3}}|no|zero|an?|one|two|three|four|five|six)\s+)?(?P<noun>{_NOUN_ALTERNATION})\b",
    _FLAGS,
)
#: More objects of one class than any caption lists; larger counts are clipped, not allocated.
MAX_OBJECTS_PER_CLASS = 20
_POSITION_WORD = re.compile(r"\b(left|center|centre|right)\b", _FLAGS)
#: ``side unknown`` / ``sides unknown`` / ``2 sides unknown``: objects whose side is not known (see object_phrase).
_UNKNOWN_SIDES = re.compile(r"(?<![a-z])(?:(?P<count>\d{1,3}|one|two|three|four|five|six)\s+)?sides?\s+unknown\b",
                            _FLAGS)

#: Look-alike characters that make ``Sidewalk: left`` unreadable to the patterns, mapped away before any
#: parsing (:func:`normalize_text`): Unicode spaces (no-break, narrow no-break, figure, thin, ideographic...)
#: become a space, the fullwidth, small and vertical colons a colon, and zero-width characters (space,
#: joiners, word joiner, byte-order mark) and the soft hyphen are removed. Nothing else changes: no NFKC,
#: which would also fold the long s of ``croſſing`` into ``crossing``.
_LOOKALIKES = str.maketrans({
    **dict.fromkeys("\u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u202f\u205f\u3000",
                    " "),
    **dict.fromkeys("\uff1a\ufe55\ufe13", ":"),
    **dict.fromkeys("\u200b\u200c\u200d\u2060\ufeff\u00ad"),
})


def normalize_text(text: str) -> str:
    """``text`` with the look-alike spaces, colons and zero-width characters of :data:`_LOOKALIKES` mapped away."""
    return text.translate(_LOOKALIKES)


@dataclass
class ParsedCaption:
    """What :func:`parse_caption` recovers from free text. Missing parts are ``None``/empty."""

    fields: dict[str, str | None]
    sections: dict[str, str]  # nearby / far / context -> raw text of the section
    near: dict[str, list[str]]  # object name -> positions (position may be "unknown")
    far: dict[str, list[str]]
    section_order: list[str]  # e.g. ["fields", "nearby", "far", "context"]
    #: where each entry of ``sections`` starts in the parsed text (a character offset), so a reader can say
    #: how much of the caption comes before a mention (:mod:`bvip_helpers.errors`, spoken order)
    section_starts: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ObjectMention:
    """One object mention of a Nearby/Far section: ``2 cars close on the left`` -> car, (left, left)."""

    name: str  # the object class
    positions: tuple[str, ...]  # one per object, in the order written ("unknown" where none is given)
    start: int  # character offset of the mention (its count word included) in the section text


def object_mentions(text: str) -> list[ObjectMention]:
    """The object mentions of a Nearby/Far section, in reading order; each owns the words up to the next one.

    ``no cars`` and ``0 cars`` are not mentions.
    """
    found: list[ObjectMention] = []
    mentions = list(_OBJECT_MENTION.finditer(text))
    for i, mention in enumerate(mentions):
        name = _NOUN_TO_CLASS[mention.group("noun").lower()]
        raw = (mention.group("count") or "a").lower()
        count = min(int(raw), MAX_OBJECTS_PER_CLASS) if raw.isdigit() else _COUNT_WORDS[raw]
        if count == 0:
            continue
        rest = text[mention.end(): mentions[i + 1].start() if i + 1 < len(mentions) else len(text)]
        rest = re.split(r"[;.]", rest, maxsplit=1)[0]
        positions = [_SYNONYMS.get(p.lower(), p.lower()) for p in _POSITION_WORD.findall(rest)]
        unknown_sides = _UNKNOWN_SIDES.search(rest)
        if unknown_sides:  # "..., 1 side unknown"; without a number, every object not placed
            said = (unknown_sides.group("count") or "").lower()
            n_unknown = int(said) if said.isdigit() else _COUNT_WORDS.get(said, count - len(positions))
            positions += [UNKNOWN] * min(max(n_unknown, 1), MAX_OBJECTS_PER_CLASS)
        if len(positions) < count:  # "2 cars close on the left" -> both on the left
            positions += [positions[-1] if positions else UNKNOWN] * (count - len(positions))
        found.append(ObjectMention(name, tuple(positions[: max(count, 1)]), mention.start()))
    return found


def _parse_objects(text: str) -> dict[str, list[str]]:
    """Objects and positions in a Nearby/Far section: the mentions of each class, positions sorted."""
    found: dict[str, list[str]] = {}
    for mention in object_mentions(text):
        found.setdefault(mention.name, []).extend(mention.positions)
    for positions in found.values():
        positions.sort(key=_position_order)
    return found


def parse_caption(text: object) -> ParsedCaption:
    """Tolerantly split a caption into fields, sections and objects. Never raises.

    The text is read through :func:`normalize_text` first, so a no-break space or a fullwidth colon
    does not hide a field.
    """
    text = "" if text is None else normalize_text(str(text))
    fields: dict[str, str | None] = {}
    first_field_at = len(text)
    for key, pattern in FIELD_PATTERNS.items():
        match = pattern.search(text)
        fields[key] = _SYNONYMS.get(match.group(1).lower(), match.group(1).lower()) if match else None
        if match:
            first_field_at = min(first_field_at, match.start())
    sections: dict[str, str] = {}
    starts: dict[str, int] = {}
    order: list[str] = ["fields"] if any(fields.values()) else []
    headers = list(_SECTION.finditer(text))
    for i, header in enumerate(headers):
        name = header.group(1).lower()
        end = headers[i + 1].start() if i + 1 < len(headers) and name != "context" else len(text)
        if name == "context":
            end = len(text)
        if name not in sections:
            raw = text[header.end():end]
            sections[name] = raw.strip()
            starts[name] = header.end() + len(raw) - len(raw.lstrip())
            order.append(name)
        if name == "context":
            break
    if order and order[0] == "fields" and headers and headers[0].start() < first_field_at:
        order.remove("fields")
        order.insert(1, "fields")
    return ParsedCaption(
        fields=fields,
        sections=sections,
        near=_parse_objects(sections.get("nearby", "")),
        far=_parse_objects(sections.get("far", "")),
        section_order=order,
        section_starts=starts,
    )


#: The instruction the model sees. Override with ``bvip build-dataset --prompt``.
DEFAULT_PROMPT = (
    "Describe this street scene for a blind pedestrian. Start with "
    "'Sidewalk: <left|center|right|unknown>. Road: <left|center|right|front|unknown>. "
    "RoadVsSidewalk: <left_of|right_of|crossing_front|unknown>.', then list close objects "
    "after 'Nearby:', far ones after 'Far:', then 'Context:'."
)
#: A plain captioning instruction with nothing of the BVIP format: what a generic captioner is asked (the demo's
#: base model was pre-trained on it), and the zero-shot baseline prompt beside :data:`DEFAULT_PROMPT`.
PLAIN_PROMPT = "Describe this image."
