"""Several boxes per step: HIoU (global = IoU of the union regions, pairwise = Kuhn-Munkres matching averaged over
the larger count) by hand, order invariance, and parsing of box lists (with depths)."""

import itertools
import random

import pytest

from ivt_env.boxes import hiou, iou, pairwise_iou, union_iou
from ivt_env.multibox import MAX_BOXES, format_boxes, parse_boxes

A = (0.0, 0.0, 10.0, 10.0)  # area 100
B = (20.0, 0.0, 30.0, 10.0)  # disjoint from A, area 100
C = (40.0, 0.0, 50.0, 10.0)  # disjoint from both
A_SHIFT = (5.0, 0.0, 15.0, 10.0)  # overlaps A by 50: IoU 50 / 150 = 1/3


def test_identical_sets_score_one_in_any_order():
    assert hiou([A, B], [A, B]) == pytest.approx(1.0)
    assert hiou([B, A], [A, B]) == pytest.approx(1.0)
    assert hiou([C, A, B], [B, C, A]) == pytest.approx(1.0)


def test_one_box_against_one_box_is_the_iou():
    assert hiou([A_SHIFT], [A]) == pytest.approx(iou(A_SHIFT, A)) == pytest.approx(1 / 3)


def test_missing_box_costs_half():
    # global: union(pred) = A (100), union(gt) = A + B (200), intersection 100 -> 0.5
    # pairwise: A-A matched (IoU 1), B unmatched; 1 / max(1, 2) = 0.5
    assert union_iou([A], [A, B]) == pytest.approx(0.5)
    assert pairwise_iou([A], [A, B]) == pytest.approx(0.5)
    assert hiou([A], [A, B]) == pytest.approx(0.5)


def test_extra_box_costs():
    # global: 200 / 300; pairwise: (1 + 1 + 0) / 3
    assert hiou([A, B, C], [A, B]) == pytest.approx((2 / 3 + 2 / 3) / 2)


def test_duplicates_are_not_rewarded_by_the_pairwise_term():
    # global: the union of two copies of A is A -> 1; pairwise: one copy matched, the other extra -> 1 / 2
    assert union_iou([A, A], [A]) == pytest.approx(1.0)
    assert hiou([A, A], [A]) == pytest.approx(0.75)


def test_overlapping_union_counted_once():
    # pred: A and A_SHIFT (union 0..15 x 0..10 = 150); gt: A (100): intersection 100, union 150 -> 2/3
    assert union_iou([A, A_SHIFT], [A]) == pytest.approx(2 / 3)
    # pairwise: A-A (1), A_SHIFT extra -> 1/2; HIoU (2/3 + 1/2) / 2
    assert hiou([A_SHIFT, A], [A]) == pytest.approx((2 / 3 + 0.5) / 2)


def test_union_iou_of_two_sets_by_hand():
    # pred: A + B; gt: A_SHIFT + B. union(pred) = 200, union(gt) = 200, intersection = 50 (A n A_SHIFT) + 100 (B)
    # -> 150 / 250 = 0.6; pairwise: A-A_SHIFT 1/3, B-B 1 -> (4/3) / 2 = 2/3
    assert union_iou([A, B], [A_SHIFT, B]) == pytest.approx(0.6)
    assert pairwise_iou([A, B], [A_SHIFT, B]) == pytest.approx(2 / 3)
    assert hiou([B, A], [A_SHIFT, B]) == pytest.approx((0.6 + 2 / 3) / 2)


def test_pairwise_is_the_optimal_matching():
    rng = random.Random(0)

    def box():
        x, y = rng.uniform(0, 50), rng.uniform(0, 50)
        return (x, y, x + rng.uniform(5, 40), y + rng.uniform(5, 40))

    for _ in range(30):
        pred, gt = [box() for _ in range(rng.randint(1, 4))], [box() for _ in range(rng.randint(1, 4))]
        small, large = (pred, gt) if len(pred) <= len(gt) else (gt, pred)
        best = max(sum(iou(a, b) for a, b in zip(small, perm)) for perm in itertools.permutations(large, len(small)))
        assert pairwise_iou(pred, gt) == pytest.approx(best / max(len(pred), len(gt)))
        assert hiou(pred, gt) == pytest.approx(hiou(list(reversed(pred)), list(reversed(gt))))
        assert 0.0 <= hiou(pred, gt) <= 1.0


def test_empty_sets_score_zero():
    assert hiou([], [A]) == hiou([A], []) == hiou([], []) == 0.0


@pytest.mark.parametrize(
    "text, boxes, depths",
    [
        ("[[1, 2, 3, 4], [5, 6, 7, 8]]", [(1, 2, 3, 4), (5, 6, 7, 8)], [None, None]),
        ("<think>was [0, 0, 9, 9]</think> [[1,2,3,4],[5,6,70,80]]", [(1, 2, 3, 4), (5, 6, 70, 80)], [None, None]),
        ('[{"bbox_2d": [1, 2, 3, 4], "depth": 0.42}, {"bbox_2d": [5, 6, 7, 8]}]', [(1, 2, 3, 4), (5, 6, 7, 8)],
         [0.42, None]),
        ('```json\n[{"bbox_2d": [1, 2, 3, 4], "label": "circle"}]\n```', [(1, 2, 3, 4)], [None]),
        ('{"bbox_2d": [10, 20, 30, 40], "depth": 0.3}', [(10, 20, 30, 40)], [0.3]),
        ("[10, 20, 30, 40]", [(10, 20, 30, 40)], [None]),
        ("[[1, 2, 3, 4]] then [[9, 9, 19, 19], [20, 20, 30, 30]]", [(9, 9, 19, 19), (20, 20, 30, 30)], [None, None]),
        ("<answer>[[1, 2, 3, 4], [5, 6, 7, 8]]</answer>", [(1, 2, 3, 4), (5, 6, 7, 8)], [None, None]),
    ],
)
def test_parse_forms(text, boxes, depths):
    p = parse_boxes(text)
    assert p.valid and p.reason is None
    assert [tuple(b) for b in p.boxes] == boxes and list(p.depths) == depths


@pytest.mark.parametrize(
    "text, reason",
    [
        ("no box here", "no box found"),
        ("[[1, 2, 3, 4], [5, 6, 1, 8]]", "box 1: x2 <= x1"),
        ("[[1, 2, 3, 4], [5, 6, 7, 1001]]", "box 1: out of range [0, 1000]"),
        (None, "not a string: NoneType"),
    ],
)
def test_parse_invalid(text, reason):
    p = parse_boxes(text)
    assert not p.valid and p.boxes == () and p.reason == reason


def test_too_many_boxes_and_garbage_never_raise():
    many = "[" + ", ".join("[1, 2, 3, 4]" for _ in range(MAX_BOXES + 1)) + "]"
    assert parse_boxes(many).reason == f"too many boxes (> {MAX_BOXES})"
    for text in ["[[", "[{", '[{"bbox_2d": [1, 2]}]', '[{"bbox_2d": "x"}]', "[" * 5000, '{"bbox_2d": [1e999, 0, 1, 1]}']:
        parse_boxes(text)


def test_format_round_trips():
    boxes = [(1, 2, 3, 4), (500, 600, 700, 800)]
    assert format_boxes(boxes) == "[[1, 2, 3, 4], [500, 600, 700, 800]]"
    p = parse_boxes(format_boxes(boxes, [0.5, None]))
    assert [tuple(b) for b in p.boxes] == boxes and list(p.depths) == [0.5, None]
