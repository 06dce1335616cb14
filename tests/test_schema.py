"""schema.compose_caption / parse_caption: round trips and tolerance to arbitrary text."""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from bvip_helpers import schema

OBJECT_NAMES = [o.name for o in schema.OBJECT_CLASSES]
SECTION_NAMES = {"fields", "nearby", "far", "context"}
#: Sidewalk accepts ``front`` in captions (the seed's presence rule) although it is not in its enum.
PARSED_FIELD_VALUES = {**schema.FIELD_ENUMS, "sidewalk_pos": (*schema.FIELD_ENUMS["sidewalk_pos"], "front")}

#: an object whose annotation has no position word it knows keeps an unknown side ("a person close, side unknown")
SIDES = (*schema.OBJECT_POSITIONS, schema.UNKNOWN)
positions = st.lists(st.sampled_from(SIDES), min_size=1, max_size=7).map(lambda ps: sorted(ps, key=SIDES.index))
objects = st.dictionaries(st.sampled_from(OBJECT_NAMES), positions, max_size=len(OBJECT_NAMES))
# Context is free prose; without a colon it cannot open a section or restate a field.
contexts = st.one_of(st.just(""), st.text(st.characters(codec="utf-8", exclude_characters=":\r\n\x00"), max_size=60),
                     st.sampled_from(["A sidewalk is shown with a pedestrian ahead.", "Two cars and a sign nearby."]))
labels = st.builds(schema.SceneLabels,
                   sidewalk_pos=st.sampled_from(schema.FIELD_ENUMS["sidewalk_pos"]),
                   road_pos=st.sampled_from(schema.FIELD_ENUMS["road_pos"]),
                   near=objects, far=st.one_of(st.just({}), objects))


@settings(max_examples=300, deadline=None)
@given(labels, contexts)
def test_compose_then_parse_recovers_everything(scene, context):
    caption = schema.compose_caption(scene, context)
    parsed = schema.parse_caption(caption)
    assert parsed.fields == {"sidewalk_pos": scene.sidewalk_pos, "road_pos": scene.road_pos,
                             "road_vs_sidewalk": scene.road_vs_sidewalk}
    assert parsed.near == scene.near
    assert parsed.far == scene.far
    expected_order = ["fields", "nearby"] + (["far"] if scene.far else []) + (["context"] if context.strip() else [])
    assert parsed.section_order == expected_order
    if not scene.near:
        assert schema.NOTHING_CLOSE in parsed.sections["nearby"]


def test_round_trip_example_from_the_spec():
    scene = schema.SceneLabels("right", "left", {"person": ["center"], "obstacle": ["right"]},
                               {"traffic light": ["left"]})
    caption = schema.compose_caption(scene, "A sidewalk is shown with a pedestrian ahead.")
    assert caption.splitlines() == [
        "Sidewalk: right. Road: left. RoadVsSidewalk: left_of.",
        "Nearby: an obstacle close on the right; a person close on the center.",
        "Far: a traffic light farther away on the left.",
        "Context: A sidewalk is shown with a pedestrian ahead.",
    ]


def _check_parsed_is_within_enums(text: str) -> None:
    parsed = schema.parse_caption(text)
    for key, value in parsed.fields.items():
        assert value is None or value in PARSED_FIELD_VALUES[key], (key, value)
    for found in (parsed.near, parsed.far):
        for name, where in found.items():
            assert name in OBJECT_NAMES and where, (name, where)  # "0 cars" is no mention at all
            assert set(where) <= {*schema.OBJECT_POSITIONS, schema.UNKNOWN}
    assert set(parsed.section_order) <= SECTION_NAMES
    assert len(parsed.section_order) == len(set(parsed.section_order))


FRAGMENTS = ["Sidewalk:", "Road:", "RoadVsSidewalk:", "Nearby:", "Far:", "Context:", " ", ".", ";", "left", "right",
             "center", "centre", "front", "unknown", "left_of", "crossing_front", "2", "a", "cars", "people", "sign",
             "traffic light", "close on the", "and"]


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(), st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=3))).map("".join)))
@example("SIDEWALK : Front. road:CENTRE. roadvssidewalk: unknown")
@example("Nearby: 12 people close on the left and right; 7 cars. Far: Far: Context:")
@example(None)
def test_parse_never_raises_and_stays_within_enums(text):
    _check_parsed_is_within_enums(text)


# --- regressions: bugs the property tests found ----------------------------------------------------


def test_field_values_stay_within_enums_for_unicode_case_folding():
    _check_parsed_is_within_enums("Sidewalk: left. Road: front. RoadVsSidewalk: croſſing_front.")


def test_parse_survives_absurd_counts():
    _check_parsed_is_within_enums("Nearby: " + "9" * 20 + " cars close on the left.")


def test_zero_count_is_not_a_mention():
    assert schema.parse_caption("Sidewalk: left. Nearby: 0 cars; a person close on the left.").near == {
        "person": ["left"]}
    assert schema.parse_caption("Nearby: no cars; a sign close on the right.").near == {"traffic sign": ["right"]}


def test_absurd_counts_are_clipped():
    parsed = schema.parse_caption("Nearby: 999 cars close on the left.")
    assert parsed.near == {"car": ["left"] * schema.MAX_OBJECTS_PER_CLASS}


def test_unknown_sides_are_said_and_read_back():
    person = schema.OBJECTS_BY_NAME["person"]
    assert schema.parse_object_cell("Left-Leftish") == (["left", schema.UNKNOWN], ["leftish"])
    cases = {("unknown",): "a person close, side unknown", ("unknown", "unknown"): "2 people close, sides unknown",
             ("left", "right", "unknown"): "3 people close on the left and right, 1 side unknown"}
    for where, phrase in cases.items():
        assert schema.object_phrase(person, list(where), True) == phrase
        assert schema.parse_caption(f"Nearby: {phrase}; a car close on the left.").near == {
            "person": list(where), "car": ["left"]}


def test_lookalike_characters_do_not_hide_a_field():
    text = "Sidewalk:\u00a0left. Road\uff1a right. RoadVs\u200bSidewalk: left_of. Nearby:\u202fa car close on the left."
    parsed = schema.parse_caption(text)
    assert parsed.fields == {"sidewalk_pos": "left", "road_pos": "right", "road_vs_sidewalk": "left_of"}
    assert parsed.near == {"car": ["left"]}
    assert schema.normalize_text("croſſing") == "croſſing"  # not NFKC: the long s stays what it is
