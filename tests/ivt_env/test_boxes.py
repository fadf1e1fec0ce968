"""Box parsing (hand cases + a property test), IoU / GIoU on hand-computed boxes, coordinate round trips."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ivt_env.boxes import format_box, giou, iou, parse_box, to_norm, to_pixels

# (text, expected box or None, expected reason substring when invalid)
CASES = [
    # IVT form: think block, then the list
    ("<think>The mug is left of the plate.</think> [120, 200, 480, 760]", (120, 200, 480, 760), None),
    ("<think>\nmulti\nline\n</think>\n[0, 0, 1000, 1000]", (0, 0, 1000, 1000), None),
    ("[1,2,3,4]", (1, 2, 3, 4), None),
    ("[ 10 ,20,\n 30 , 40 ]", (10, 20, 30, 40), None),
    ("[10.5, 20, 30.25, 40]", (10.5, 20, 30.25, 40), None),
    # Qwen3-VL JSON, bare, fenced, as a list of objects (last object wins)
    ('{"bbox_2d": [15, 25, 350, 450], "label": "cat"}', (15, 25, 350, 450), None),
    ('```json\n[\n  {"bbox_2d": [150, 220, 520, 800], "label": "mug"}\n]\n```', (150, 220, 520, 800), None),
    ('```json\n[{"bbox_2d": [1, 1, 5, 5]}, {"bbox_2d": [100, 100, 500, 500]}]\n```', (100, 100, 500, 500), None),
    # inside one JSON object bbox_2d wins over a later list in the same object
    ('{"bbox_2d": [1, 2, 300, 400], "other": [5, 6, 700, 800]}', (1, 2, 300, 400), None),
    # <answer> wrappers: only the answer block counts
    (
        "<think>maybe [1, 1, 2, 2]</think><answer>[100, 150, 300, 350]</answer> trailing [5, 5, 9, 9]",
        (100, 150, 300, 350),
        None,
    ),
    ("<ANSWER>[7, 8, 90, 100]</ANSWER>", (7, 8, 90, 100), None),
    ('<answer>{"bbox_2d": [10, 10, 20, 20]}</answer>', (10, 10, 20, 20), None),
    ("<answer>first [1, 1, 3, 3]</answer> <answer>second [2, 2, 6, 6]</answer>", (2, 2, 6, 6), None),
    # last box wins
    ("[10, 10, 20, 20] then better [30, 30, 60, 60]", (30, 30, 60, 60), None),
    ("[10, 10, 20, 20] then broken [30, 30, 20, 60]", None, "x2 <= x1"),
    # boxes inside <think> are used only when there is none outside
    ("<think>I guess [100, 100, 200, 200]</think> [300, 300, 400, 400]", (300, 300, 400, 400), None),
    ("<think>only here [100, 100, 200, 200]</think> no list", (100, 100, 200, 200), None),
    ("<think>unclosed [5, 5, 50, 50]", (5, 5, 50, 50), None),
    # invalid boxes
    ("[100, 100, 1001, 200]", None, "out of range"),
    ("[-1, 100, 200, 200]", None, "out of range"),
    ("[500, 100, 500, 200]", None, "x2 <= x1"),
    ("[600, 100, 500, 200]", None, "x2 <= x1"),
    ("[100, 300, 500, 300]", None, "y2 <= y1"),
    ("[nan, 1, 2, 3]", None, "NaN"),
    ("[1, 2, inf, 3]", None, "infinite"),
    ('{"bbox_2d": [1, 2, 300, ' + "9" * 400 + "]}", None, "infinite"),
    ('{"bbox_2d": [true, 2, 300, 400]}', None, "no box"),
    ('{"bbox_2d": ["1", "2", "3", "4"]}', None, "no box"),
    # garbage
    ("", None, "no box"),
    ("no box here at all", None, "no box"),
    ("[1, 2, 3]", None, "no box"),
    ("[1, 2, 3, 4, 5]", None, "no box"),
    ("{bbox_2d: oops", None, "no box"),
    ("<answer></answer> [1, 2, 3, 4]", None, "no box"),
]


@pytest.mark.parametrize("text,box,reason", CASES)
def test_parse_table(text, box, reason):
    got = parse_box(text)
    if box is None:
        assert not got.valid and got.box is None
        assert reason.lower() in got.reason.lower()
    else:
        assert got.valid and got.reason is None
        assert got.box == tuple(float(v) for v in box)


@pytest.mark.parametrize("value", [None, 12, b"[1, 2, 3, 4]", ["[1, 2, 3, 4]"]])
def test_parse_non_string(value):
    got = parse_box(value)
    assert not got.valid and "not a string" in got.reason


def test_parse_degenerate_repetition_is_linear():
    # a model stuck repeating a key must not make the JSON search backtrack quadratically (40k repeats)
    text = "{" + '"bbox_2d"' * 40_000
    assert parse_box(text).reason == "no box found"


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_parse_never_raises(text):
    got = parse_box(text)
    assert got.valid == (got.box is not None)
    if got.valid:
        x1, y1, x2, y2 = got.box
        assert 0 <= x1 < x2 <= 1000 and 0 <= y1 < y2 <= 1000
    else:
        assert isinstance(got.reason, str) and got.reason


_fragments = st.sampled_from(
    ["[", "]", ",", "{", "}", '"bbox_2d"', ":", "<think>", "</think>", "<answer>", "</answer>", "nan", "-", "."]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(_fragments, st.integers(-5, 1005).map(str), st.text(max_size=3)), max_size=40))
def test_parse_never_raises_on_box_like_text(parts):
    got = parse_box(" ".join(parts))
    assert got.valid == (got.box is not None)


def test_format_box_round_trip():
    assert format_box((12.0, 30.4, 400.6, 512)) == "[12, 30, 401, 512]"
    assert parse_box(format_box((12, 30, 400, 512))).box == (12.0, 30.0, 400.0, 512.0)


def test_iou_hand_values():
    a = (0, 0, 10, 10)
    assert iou(a, a) == 1.0
    # overlap 5x10 = 50; union 100 + 100 - 50 = 150
    assert iou(a, (5, 0, 15, 10)) == pytest.approx(50 / 150)
    # inner box: 4 / 100
    assert iou(a, (2, 2, 4, 4)) == pytest.approx(0.04)
    # touching edges and disjoint boxes have no overlap
    assert iou(a, (10, 0, 20, 10)) == 0.0
    assert iou(a, (20, 20, 30, 30)) == 0.0
    # continuous (non-integer) coordinates: overlap 2.5 x 2.5 = 6.25; union 25 + 25 - 6.25
    assert iou((0, 0, 5, 5), (2.5, 2.5, 7.5, 7.5)) == pytest.approx(6.25 / 43.75)
    assert iou(None, a) == 0.0 and iou(a, None) == 0.0
    assert iou((0, 0, 0, 5), (0, 0, 0, 5)) == 0.0  # empty boxes


def test_giou_hand_values():
    a = (0, 0, 10, 10)
    assert giou(a, a) == 1.0
    # disjoint: iou 0, hull 0..30 x 0..10 = 300, union 200 -> 0 - 100 / 300
    assert giou(a, (20, 0, 30, 10)) == pytest.approx(-1 / 3)
    # partial overlap: iou 50/150, hull 15 x 10 = 150 = union -> giou = iou
    assert giou(a, (5, 0, 15, 10)) == pytest.approx(1 / 3)
    # diagonal: inter 25, union 175, hull 225 -> 25/175 - 50/225
    assert giou(a, (5, 5, 15, 15)) == pytest.approx(25 / 175 - 50 / 225)
    assert giou(None, a) == -1.0
    # giou <= iou always
    assert giou(a, (5, 5, 15, 15)) <= iou(a, (5, 5, 15, 15))


def test_to_norm_floor_and_clip():
    # floor(x * 1000 / W) (IVT Sec. 3.1)
    assert to_norm((0, 0, 640, 480), 640, 480) == (0, 0, 1000, 1000)
    assert to_norm((1, 1, 639, 479), 640, 480) == (1, 2, 998, 997)  # 1.5625 -> 1, 2.083 -> 2, ...
    assert to_norm((-5, -5, 700, 500), 640, 480) == (0, 0, 1000, 1000)
    with pytest.raises(ValueError):
        to_norm((0, 0, 1, 1), 0, 10)


def test_to_pixels_values():
    assert to_pixels((250, 500, 750, 1000), 640, 480) == (160.0, 240.0, 480.0, 480.0)


@pytest.mark.parametrize("width,height", [(640, 480), (1920, 1080), (100, 100), (333, 77), (1, 1), (4000, 3)])
def test_norm_pixel_round_trip(width, height):
    # integer normalised boxes survive norm -> px -> norm exactly (float rounding must not floor 29 to 28)
    for box in [(0, 0, 1000, 1000), (29, 29, 571, 999), (1, 2, 3, 4), (123, 456, 789, 1000)]:
        assert to_norm(to_pixels(box, width, height), width, height) == box
    # px -> norm -> px loses at most one normalised unit (W / 1000 pixels)
    px = (0.37 * width, 0.11 * height, 0.93 * width, 0.58 * height)
    back = to_pixels(to_norm(px, width, height), width, height)
    for v, b, s in zip(px, back, (width, height, width, height)):
        assert -1e-6 <= v - b <= s / 1000 + 1e-6


@given(st.integers(0, 1000), st.integers(1, 5000))
def test_round_trip_property(v, size):
    assert to_norm(to_pixels((v, v, v, v), size, size), size, size) == (v, v, v, v)
    assert math.isclose(to_pixels((v, 0, 0, 0), size, 1)[0], v * size / 1000)


def test_which_box_counts_last_or_first():
    text = "first guess [10, 20, 30, 40], then [100, 200, 300, 400]"
    assert parse_box(text).box == (100.0, 200.0, 300.0, 400.0)
    assert parse_box(text, "first").box == (10.0, 20.0, 30.0, 40.0)
    # a JSON object's bbox_2d wins over another list inside the same object, in both directions
    obj = '{"other": [1, 2, 3, 4], "bbox_2d": [50, 60, 70, 80], "more": [5, 6, 7, 8]}'
    assert parse_box(obj, "first").box == parse_box(obj).box == (50.0, 60.0, 70.0, 80.0)
    assert parse_box("[1, 2, 3, 4] " + obj, "first").box == (1.0, 2.0, 3.0, 4.0)
    assert parse_box(obj + " [1, 2, 3, 4]", "first").box == (50.0, 60.0, 70.0, 80.0)
    assert parse_box(obj + " [1, 2, 3, 4]").box == (1.0, 2.0, 3.0, 4.0)
    # answer blocks: the first block with "first", the last with "last"; a think box only when nothing else
    answers = "<answer>[1, 1, 2, 2]</answer> again <answer>[3, 3, 4, 4]</answer>"
    assert parse_box(answers, "first").box == (1.0, 1.0, 2.0, 2.0)
    assert parse_box(answers).box == (3.0, 3.0, 4.0, 4.0)
    think = "<think>[9, 9, 10, 10]</think> [5, 5, 6, 6] [7, 7, 8, 8]"
    assert parse_box(think, "first").box == (5.0, 5.0, 6.0, 6.0)
    # an invalid first box is reported, not skipped for a later valid one
    assert parse_box("[0, 0, 0, 0] then [1, 2, 3, 4]", "first").reason == "x2 <= x1"
    with pytest.raises(ValueError, match="which must be one of"):
        parse_box(text, "middle")
