"""The VLM policy's multi-object prompts and the list-aware stop rule: a lone box still stops at its ']', a list of
boxes at the list's closing ']'."""

from agents.policies.vlm_prompt import BoxStopper, load_prompts


def _feed(stopper, pieces):
    for k, p in enumerate(pieces):
        if stopper.feed(0, p):
            return k
    return None


def test_lone_box_stops_at_once_and_a_list_at_its_end():
    assert _feed(BoxStopper(1, True), ["<think>x</think>", " [", "1", ", 2", ", 3", ", 4", "]", " more"]) == 6
    pieces = ["<think>2 targets.</think>", " [[", "1, 2, 3, 4", "],", " [", "5, 6, 7, 8", "]", "]", "x"]
    assert _feed(BoxStopper(1, True), pieces) == 7
    # a box inside the reasoning does not stop the step
    assert _feed(BoxStopper(1, True), ["<think>[1, 2, 3, 4]", "</think>", " [[1, 2, 3, 4]", "]"]) == 3


def test_multi_prompt_files_ask_for_every_object():
    p = load_prompts("prompts_multi.yaml")
    assert "every object" in p.question and "[[x1, y1, x2, y2], ...]" in p.question
    t = load_prompts("prompts_tiny_multi.yaml")
    assert t.question.format(expression="both circles") == "Locate all of both circles."


def test_the_keep_marker_ends_a_step_when_it_closes_the_reasoning_or_follows_it():
    pieces = ["<think>Box fits. Keep it.", "</think>", " [1, 2, 3, 4]"]
    assert _feed(BoxStopper(1, True, keep_marker="Keep it."), pieces) == 1  # the reasoning ends with the marker
    assert _feed(BoxStopper(1, True), pieces) == 2  # no marker configured: the box ends it
    after = ["<think>Box fits.</think>", " Keep", " it", ".", " [1, 2, 3, 4]"]
    assert _feed(BoxStopper(1, True, keep_marker="Keep it."), after) == 3
    moving = ["<think>Keep it", " wider.</think>", " [1, 2, 3, 4]"]  # a marker inside the reasoning is no keep
    assert _feed(BoxStopper(1, True, keep_marker="Keep it."), moving) == 2
    assert load_prompts("prompts_tiny.yaml").keep_marker == "Keep it."  # the default every checkpoint gets
