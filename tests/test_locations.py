"""The location codec: what the model writes must come back as the right boxes."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
import supervision as sv
from hypothesis import given, settings
from hypothesis import strategies as st

from paligemma_xray import locations
from paligemma_xray.locations import Detections, classes_from_prefix, encode, loc_token, parse, seg_token

BIN = 1 / 1023


def test_docstring_examples_run():
    assert doctest.testmod(locations).failed == 0


def test_decodes_y_before_x_and_divides_by_1023():
    found = parse("<loc0000><loc0512><loc1023><loc1023> fracture", (2046, 1023))
    np.testing.assert_allclose(found.xyxy[0], [512 / 1023 * 2046, 0, 2046, 1023], rtol=1e-6)
    assert found.class_name == ["fracture"]
    assert found.score is None


def test_encode_rounds_and_clips():
    text = encode([[-5, 0.04, 1e6, 99.9]], ["fracture"], (100, 100))
    assert text == "<loc0000><loc0000><loc1022><loc1023> fracture"


def test_negative_image_is_empty_string_and_parses_to_nothing():
    assert encode(np.zeros((0, 4)), [], (64, 64)) == ""
    found = parse("", (64, 64))
    assert len(found) == 0
    assert sum(found.parse_issues.values()) == 0


def test_several_objects_repeated_and_trailing_separators():
    text = (
        "detect fracture\n<loc0100><loc0200><loc0300><loc0400> fracture ;  ; "
        "<loc0500><loc0500><loc0600><loc0700> fracture ; "
    )
    found = parse(text, (1023, 1023), classes=["fracture"])
    assert found.class_name == ["fracture", "fracture"]
    assert found.class_id.tolist() == [0, 0]
    np.testing.assert_allclose(found.xyxy, [[200, 100, 400, 300], [500, 500, 700, 600]], atol=1e-3)


def test_keeps_labels_with_punctuation_and_several_words():
    text = "<loc0001><loc0002><loc0003><loc0004> distal radius fracture (displaced), 2nd"
    found = parse(text, (100, 100))
    assert found.class_name == ["distal radius fracture (displaced), 2nd"]


def test_keeps_objects_with_sixteen_segmentation_tokens():
    codes = list(range(16))
    text = "<loc0010><loc0020><loc0030><loc0040>" + "".join(seg_token(c) for c in codes) + " bone"
    found = parse(text, (1023, 1023))
    assert found.class_name == ["bone"]
    assert found.seg_codes[0].tolist() == codes


def test_supervision_drops_segmented_objects_we_keep_them():
    text = "<loc0010><loc0020><loc0030><loc0040>" + seg_token(5) * 16 + " bone"
    xyxy, _, _ = sv.detection.vlm.from_paligemma(text, (100, 100))
    assert len(xyxy) == 0
    assert len(parse(text, (100, 100))) == 1


def test_drops_and_counts_truncated_inverted_and_unlabelled_boxes():
    text = (
        "<loc0010><loc0020><loc0030> fracture ; "  # three locs: truncated
        "<loc0500><loc0020><loc0030><loc0040> fracture ; "  # y2 < y1: inverted
        "<loc0010><loc0020><loc0030><loc0040> ; "  # no label
        "<loc0010><loc0020><loc0030><loc0040> fracture ; "  # good
        "<loc0010><loc0020>"  # cut off by max tokens: truncated
    )
    found = parse(text, (100, 100))
    assert len(found) == 1
    assert found.parse_issues["truncated"] == 2
    assert found.parse_issues["inverted"] == 1
    assert found.parse_issues["empty_label"] == 1


def test_unknown_label_is_kept_with_class_id_minus_one_and_counted():
    text = "<loc0010><loc0020><loc0030><loc0040> fracture ; <loc0010><loc0020><loc0030><loc0040> cat"
    found = parse(text, (100, 100), classes=["fracture"])
    assert found.class_id.tolist() == [0, -1]
    assert found.parse_issues["unknown_label"] == 1


def test_special_tokens_end_a_label():
    found = parse("<loc0010><loc0020><loc0030><loc0040> fracture<eos><pad><pad>", (100, 100))
    assert found.class_name == ["fracture"]


def test_scores_are_the_geometric_mean_of_the_objects_own_tokens():
    pieces = [
        ("<loc0010>", math.log(0.9)),
        ("<loc0020>", math.log(0.8)),
        ("<loc0030>", math.log(0.7)),
        ("<loc0040>", math.log(0.6)),
        (" fracture", math.log(0.5)),
        (" ;", math.log(0.01)),  # the separator belongs to no object
        (" ", math.log(0.01)),
        ("<loc0050>", math.log(0.2)),
        ("<loc0060>", math.log(0.2)),
        ("<loc0070>", math.log(0.2)),
        ("<loc0080>", math.log(0.2)),
        (" fracture", math.log(0.2)),
    ]
    text = "".join(p for p, _ in pieces)
    found = parse(text, (100, 100), token_logprobs=pieces)
    expected_first = (0.9 * 0.8 * 0.7 * 0.6 * 0.5) ** (1 / 5)
    np.testing.assert_allclose(found.score, [expected_first, 0.2], rtol=1e-5)


def test_scores_ignore_segmentation_tokens():
    pieces = [(loc_token(10 * k), math.log(0.5)) for k in range(1, 5)]
    pieces += [(seg_token(1), math.log(1e-6))] * 16 + [(" bone", math.log(0.5))]
    text = "".join(p for p, _ in pieces)
    found = parse(text, (100, 100), token_logprobs=pieces)
    np.testing.assert_allclose(found.score, [0.5], rtol=1e-5)


def test_token_logprobs_must_match_the_text():
    with pytest.raises(ValueError, match="concatenate"):
        parse("<loc0010><loc0020><loc0030><loc0040> a", (10, 10), token_logprobs=[("x", 0.0)])


def test_classes_from_prefix():
    assert classes_from_prefix("detect fracture") == ["fracture"]
    assert classes_from_prefix("detect a ; b ;c\n") == ["a", "b", "c"]
    assert classes_from_prefix("caption en") == []


def test_detections_select_threshold_and_json_round_trip():
    found = parse(
        "<loc0010><loc0020><loc0030><loc0040> a ; <loc0050><loc0060><loc0070><loc0080> b",
        (100, 100),
        token_logprobs=[
            ("<loc0010><loc0020><loc0030><loc0040> a", math.log(0.9)),
            (" ; ", 0.0),
            ("<loc0050><loc0060><loc0070><loc0080> b", math.log(0.3)),
        ],
    )
    assert found.with_threshold(0.5).class_name == ["a"]
    again = Detections.from_json(found.to_json())
    np.testing.assert_allclose(again.xyxy, found.xyxy, atol=1e-3)
    np.testing.assert_allclose(again.score, found.score, atol=1e-6)
    assert again.class_name == found.class_name
    assert again.image_size == found.image_size


def test_to_supervision_keeps_boxes_scores_and_names():
    found = parse("<loc0010><loc0020><loc0030><loc0040> fracture", (100, 100), classes=["fracture"])
    converted = found.to_supervision()
    assert isinstance(converted, sv.Detections)
    np.testing.assert_allclose(converted.xyxy, found.xyxy)
    assert converted.data["class_name"].tolist() == ["fracture"]
    assert converted.class_id.tolist() == [0]


# ------------------------------------------------------------------------------ properties

coordinate = st.floats(min_value=0, max_value=1, allow_nan=False)
sizes = st.tuples(st.integers(1, 4096), st.integers(1, 4096))


@st.composite
def boxes_and_size(draw):
    width, height = draw(sizes)
    n = draw(st.integers(0, 5))
    boxes = []
    for _ in range(n):
        xa, xb = sorted([draw(coordinate), draw(coordinate)])
        ya, yb = sorted([draw(coordinate), draw(coordinate)])
        boxes.append([xa * width, ya * height, xb * width, yb * height])
    return np.array(boxes, np.float64).reshape(-1, 4), (width, height)


@settings(max_examples=300, deadline=None)
@given(boxes_and_size(), st.sampled_from(["fracture", "distal radius fracture", "a-b c"]))
def test_round_trip_stays_within_one_bin(data, label):
    boxes, (width, height) = data
    found = parse(encode(boxes, [label] * len(boxes), (width, height)), (width, height), classes=[label])
    assert len(found) == len(boxes)
    tolerance = np.array([width, height, width, height]) * BIN
    assert np.all(np.abs(found.xyxy - boxes) <= tolerance + 1e-3)
    assert found.class_id.tolist() == [0] * len(boxes)


token_soup = st.lists(
    st.one_of(
        st.builds(loc_token, st.integers(0, 1023)),
        st.builds(seg_token, st.integers(0, 127)),
        st.sampled_from([" ; ", ";", " ", "fracture", "\n", "<eos>", "<loc", "12>", "<seg99>", "é", "<"]),
        st.text(max_size=8),
    ),
    max_size=40,
)


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.text(), token_soup.map("".join)), sizes)
def test_parse_never_raises_and_always_returns_valid_boxes(text, size):
    found = parse(text, size, classes=["fracture"])
    assert np.all(found.xyxy[:, 2] >= found.xyxy[:, 0])
    assert np.all(found.xyxy[:, 3] >= found.xyxy[:, 1])
    assert np.all(found.xyxy >= 0)
    assert np.all(found.xyxy[:, [0, 2]] <= size[0] + 1e-3)
    assert np.all(found.xyxy[:, [1, 3]] <= size[1] + 1e-3)
    assert all(name and name == name.strip() for name in found.class_name)


well_formed = st.lists(
    st.tuples(
        st.tuples(*[st.integers(0, 1023)] * 4),
        st.from_regex(r"[A-Za-z][A-Za-z0-9 _-]{0,12}[A-Za-z0-9]", fullmatch=True),
    ),
    min_size=1,
    max_size=4,
)


@settings(max_examples=200, deadline=None)
@given(well_formed, sizes)
def test_agrees_with_supervision_where_supervision_is_right(objects, size):
    """Same boxes (up to supervision's /1024 convention) and labels on well-formed output."""
    objects = [((min(a, c), min(b, d), max(a, c), max(b, d)), name) for (a, b, c, d), name in objects]
    text = " ; ".join("".join(loc_token(v) for v in bins) + " " + name for bins, name in objects)
    theirs, _, their_names = sv.detection.vlm.from_paligemma(text, size)
    ours = parse(text, size)
    assert ours.class_name == [str(n) for n in their_names]
    width, height = size
    # theirs = k/1024*size, ours = k/1023*size: at most one part in 1023 apart.
    np.testing.assert_allclose(ours.xyxy, theirs, atol=max(width, height) / 1023 + 1e-3)


def test_the_default_prompt_is_one_constant_everywhere():
    import inspect

    from paligemma_xray.data import synth
    from paligemma_xray.infer import Detector
    from paligemma_xray.infer.fusion import FusedDetector
    from paligemma_xray.infer.settings import PredictSettings
    from paligemma_xray.locations import DEFAULT_PROMPT

    assert DEFAULT_PROMPT == "detect fracture" and synth.PREFIX is DEFAULT_PROMPT
    for function in (
        Detector.detect,
        Detector.iter_detect,
        FusedDetector.detect,
        FusedDetector.iter_detect,
    ):
        assert inspect.signature(function).parameters["prompt"].default is DEFAULT_PROMPT, function
    assert PredictSettings(paths=["x"]).prompt is DEFAULT_PROMPT
