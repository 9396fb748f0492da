"""Augmentations and the deterministic data order."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from paligemma_xray.locations import parse
from paligemma_xray.train.batches import Augment, Examples, mirror_suffix, shuffle_objects, step_positions


def test_mirror_suffix_mirrors_boxes_through_the_codec() -> None:
    suffix = "<loc0100><loc0200><loc0300><loc0400> fracture ; <loc0000><loc0000><loc1023><loc0010> fracture"
    mirrored = mirror_suffix(suffix)
    assert (
        mirrored
        == "<loc0100><loc0623><loc0300><loc0823> fracture ; <loc0000><loc1013><loc1023><loc1023> fracture"
    )
    size = (200, 100)
    before, after = parse(suffix, size), parse(mirrored, size)
    np.testing.assert_allclose(after.xyxy[:, [2, 0]], size[0] - before.xyxy[:, [0, 2]], atol=1e-3)
    np.testing.assert_allclose(after.xyxy[:, [1, 3]], before.xyxy[:, [1, 3]])
    assert mirror_suffix(mirrored) == suffix
    assert mirror_suffix("<loc0001><loc0002><loc0003><loc0004>" + "<seg001>" * 16 + " x") is None


def test_shuffle_objects_keeps_the_objects() -> None:
    objects = [f"<loc000{i}><loc0001><loc0002><loc0003> fracture" for i in range(5)]
    orders = {shuffle_objects(" ; ".join(objects), np.random.default_rng(s)) for s in range(10)}
    assert len(orders) > 1
    assert all(sorted(o.split(" ; ")) == sorted(objects) for o in orders)
    assert shuffle_objects("", np.random.default_rng(0)) == ""


def test_step_positions_cover_the_global_batch() -> None:
    for world, accum in [(1, 1), (2, 1), (2, 2), (1, 4)]:
        seen = [k for r in range(world) for micro in step_positions(3, 8, accum, r, world) for k in micro]
        assert sorted(seen) == list(range(24, 32))
        assert all(len(m) == 8 // (world * accum) for m in step_positions(3, 8, accum, 0, world))


@dataclass(frozen=True)
class _Rec:
    image: Path
    prefix: str
    suffix: str


def test_examples_are_deterministic_and_epochs_reshuffle(tmp_path) -> None:
    path = tmp_path / "x.png"
    Image.fromarray(np.arange(12 * 10 * 3, dtype=np.uint8).reshape(12, 10, 3)).save(path)
    records = [
        _Rec(path, "detect fracture", f"<loc0{i:03d}><loc0100><loc0200><loc0300> fracture") for i in range(7)
    ]
    aug = Augment(shuffle_objects=True, hflip=0.5, jitter=0.1)
    a = Examples(records, aug, seed=3, load_image=Image.open)
    b = Examples(records, aug, seed=3, load_image=Image.open)
    epoch0 = [a.record_index(k) for k in range(7)]
    assert sorted(epoch0) == list(range(7))
    assert [a.record_index(k) for k in range(7, 14)] != epoch0
    for k in (12, 3, 12):  # any order of access, same answer
        ia, img_a, _, sa = a.example(k)
        ib, img_b, _, sb = b.example(k)
        assert (ia, sa) == (ib, sb)
        np.testing.assert_array_equal(np.asarray(img_a), np.asarray(img_b))
    suffixes = {a.example(k)[3] for k in range(40)}
    flipped = [s for s in suffixes if "<loc0723><loc0200><loc0923>" in s]  # x 100..300 → 723..923
    assert flipped and len(flipped) < len(suffixes)
    plain = Examples(records, Augment(), seed=3, load_image=Image.open)
    assert plain.example(5)[3] == records[plain.record_index(5)].suffix


def test_an_unreadable_training_image_is_skipped_deterministically(tmp_path) -> None:
    """One broken image used to stop a training run outright; now it is counted and stood in for."""
    import pytest

    from paligemma_xray.data import load_image
    from paligemma_xray.data.bad_records import BadRecords
    from paligemma_xray.data.records import Record
    from paligemma_xray.errors import DataError

    source = tmp_path / "_annotations.train.jsonl"
    records = []
    for i in range(5):
        path = tmp_path / f"{i}.png"
        Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(path)
        records.append(Record(path, "detect fracture", "", "train", source, i + 1))
    records[2].image.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    bad = BadRecords(limit=1)
    examples = Examples(records, Augment(), seed=0, load_image=load_image, bad_records=bad)
    seen = [examples.example(k)[0] for k in range(10)]
    assert 2 not in seen and sorted(set(seen)) == [0, 1, 3, 4]
    assert bad.where() == [f"{source}:3"]  # counted once, named by its annotation line
    again = Examples(records, Augment(), seed=0, load_image=load_image)
    assert [again.example(k)[0] for k in range(10)] == seen  # the same stand-in on a resume
    records[4].image.write_bytes(b"")
    strict = Examples(records, Augment(), seed=0, load_image=load_image, bad_records=BadRecords(limit=1))
    with pytest.raises(DataError, match=r"_annotations.train.jsonl:\d: .*--max-bad-records 1"):
        for k in range(10):
            strict.example(k)
