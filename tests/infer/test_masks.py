"""The PyTorch mask decoder against a numpy transcription of big_vision's JAX decoder
(``bv_masks.py``, written from the JAX code op by op)."""

from __future__ import annotations

import numpy as np
import pytest
from bv_masks import big_vision_encode, big_vision_reconstruct_masks, place
from PIL import Image

from paligemma_xray.errors import CheckpointError, ConfigError
from paligemma_xray.infer.masks import (
    DECODER_KEYS,
    MaskDecoder,
    MaskEncoder,
    decode_masks,
    encode_masks,
    real_layout_shapes,
    write_random_vae,
)
from paligemma_xray.locations import Detections, parse, seg_token
from paligemma_xray.masks import decode_rle, encode_rle, place_mask

# -- tests ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vae(tmp_path_factory) -> tuple:
    path = write_random_vae(tmp_path_factory.mktemp("vae") / "vae-oid.npz", seed=3)
    with np.load(path, allow_pickle=False) as npz:
        checkpoint = {k: npz[k] for k in npz.files}
    return path, checkpoint


def test_decoder_matches_big_vision_transcription(vae) -> None:
    path, checkpoint = vae
    codes = np.random.default_rng(0).integers(0, 128, size=(6, 16))
    codes[0] = 0
    codes[1] = 127
    expected = big_vision_reconstruct_masks(checkpoint, codes)
    got = MaskDecoder.load(path)(codes)
    assert tuple(got.shape) == (6, 64, 64)
    got_np = np.asarray(got)
    assert got_np.dtype == np.float32
    scale = np.abs(expected).max()
    assert scale > 0.1 and (expected > 0).any() and (expected < 0).any()  # a non-trivial check
    np.testing.assert_allclose(got_np, expected, rtol=0, atol=2e-5 * scale)


def test_decoder_accepts_torch_codes_and_int16_rows(vae) -> None:
    import torch

    path, _ = vae
    codes = np.random.default_rng(1).integers(0, 128, size=(2, 16)).astype(np.int16)
    decoder = MaskDecoder.load(path)
    a = np.asarray(decoder(codes))
    b = np.asarray(decoder(torch.as_tensor(codes.astype(np.int32))))
    np.testing.assert_array_equal(a, b)
    assert decoder(np.zeros((0, 16), np.int64)).shape == (0, 64, 64)


def test_the_random_file_has_the_real_layout() -> None:
    shapes = real_layout_shapes()
    # What big_vision's _get_params and encode_to_codebook_indices read.
    assert shapes["_vq_vae._embedding"] == (128, 512)
    assert shapes["decoder.0.weight"] == (128, 512, 1, 1)
    assert shapes["decoder.4.weight"] == (128, 128, 4, 4)
    assert shapes["decoder.10.weight"] == (32, 16, 4, 4)
    assert shapes["decoder.12.weight"] == (1, 16, 1, 1)
    assert shapes["encoder.10.weight"] == (512, 128, 1, 1)
    assert set(DECODER_KEYS) <= set(shapes)


def test_load_refuses_other_files_in_one_line(tmp_path, vae) -> None:
    _, checkpoint = vae
    with pytest.raises(CheckpointError, match="not found"):
        MaskDecoder.load(tmp_path / "nothing.npz")
    partial = dict(checkpoint)
    del partial["decoder.6.weight"]
    np.savez(tmp_path / "partial.npz", **partial)
    with pytest.raises(CheckpointError, match=r"partial\.npz: .*decoder\.6\.weight"):
        MaskDecoder.load(tmp_path / "partial.npz")
    wrong = dict(checkpoint)
    wrong["decoder.12.weight"] = np.zeros((2, 16, 1, 1), np.float32)
    np.savez(tmp_path / "wrong.npz", **wrong)
    with pytest.raises(CheckpointError, match=r"decoder\.12\.weight has shape"):
        MaskDecoder.load(tmp_path / "wrong.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(CheckpointError, match=r"text\.npz"):
        MaskDecoder.load(tmp_path / "text.npz")
    # A pickled object array is never unpickled.
    pickled = dict(checkpoint)
    pickled["_vq_vae._embedding"] = np.array([object()] * 3, dtype=object)
    np.savez(tmp_path / "pickled.npz", **pickled)
    with pytest.raises(CheckpointError, match=r"pickled\.npz"):
        MaskDecoder.load(tmp_path / "pickled.npz")


def _answer(codes: np.ndarray, box_bins=(100, 200, 700, 900), label="fracture") -> str:
    locs = "".join(f"<loc{b:04d}>" for b in box_bins)
    return locs + "".join(seg_token(int(c)) for c in codes) + " " + label


def test_decode_masks_places_each_mask_in_its_box_as_big_vision(vae) -> None:
    path, checkpoint = vae
    decoder = MaskDecoder.load(path)
    codes = np.random.default_rng(2).integers(0, 128, size=(2, 16))
    text = (
        _answer(codes[0])
        + " ; <loc0000><loc0000><loc0100><loc0100> fracture ; "
        + _answer(codes[1], (500, 10, 1023, 400))
    )
    size = (300, 200)
    found = decode_masks(decoder, parse(text, size, ["fracture"]))
    assert found.masks is not None and found.masks[1] is None  # the object without codes
    expected64 = big_vision_reconstruct_masks(checkpoint, codes).astype(np.float32)
    for row, (obj, bins) in enumerate(((0, (100, 200, 700, 900)), (2, (500, 10, 1023, 400)))):
        mask = decode_rle(found.masks[obj])
        assert mask.shape == (200, 300)
        y1, _, _, x2 = (int(v) for v in (np.array(bins) / 1023 * [200, 300, 200, 300]))
        reference = place(expected64[row], bins, 200, 300)
        mismatched = int((mask != reference).sum())
        assert mismatched <= 2, mismatched  # float32 round-off at the threshold only
        assert mask.any() and not mask[:y1].any() and not mask[:, x2:].any()


def test_seg_answer_without_decoder_is_one_line() -> None:
    found = parse(_answer(np.arange(16)), (64, 64), ["fracture"])
    with pytest.raises(ConfigError, match="--seg-vae"):
        decode_masks(None, found)
    boxes_only = parse("<loc0000><loc0000><loc0100><loc0100> fracture", (64, 64), ["fracture"])
    assert decode_masks(None, boxes_only).masks is None


def test_place_mask_empty_box_and_json_round_trip() -> None:
    mask64 = np.ones((64, 64), np.float32)
    assert not place_mask(mask64, (10, 10, 10.9, 40), (64, 64)).any()  # int() makes it empty
    found = parse(_answer(np.arange(16)), (64, 64), ["fracture"])
    from paligemma_xray.masks import encode_rle

    found.masks = [encode_rle(place_mask(mask64, found.xyxy[0], (64, 64)))]
    again = Detections.from_json(found.to_json())
    assert again.masks == found.masks
    assert again[np.array([0])].masks == found.masks


def _blobs(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:64, 0:64]
    masks = []
    for _ in range(n):
        cy, cx, ry, rx = rng.uniform(10, 54), rng.uniform(10, 54), rng.uniform(5, 30), rng.uniform(5, 30)
        masks.append((((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1).astype(np.float32))
    return np.stack(masks)


def test_encoder_matches_big_vision_transcription(vae) -> None:
    path, checkpoint = vae
    masks = _blobs(8, seed=4)
    masks[0] = 0.0
    masks[1] = 1.0
    expected = big_vision_encode(checkpoint, masks)
    got = MaskEncoder.load(path)(masks).numpy()
    assert got.shape == (8, 16) and got.dtype == np.int64
    assert len(np.unique(expected)) > 4  # a non-trivial check: many codes in play
    np.testing.assert_array_equal(got, expected)


def test_encode_masks_gives_ground_truth_codes_from_masks(vae) -> None:
    path, checkpoint = vae
    encoder = MaskEncoder.load(path)
    yy, xx = np.mgrid[0:120, 0:200]
    mask = ((yy - 55) / 25) ** 2 + ((xx - 95) / 40) ** 2 <= 1  # an ellipse inside the box
    found = Detections(
        xyxy=[[50, 30, 150, 90]], class_name=["fracture"], class_id=[0], score=None,
        seg_codes=[[-1] * 16], image_size=(200, 120), masks=[encode_rle(mask)],
    )  # fmt: skip
    coded = encode_masks(encoder, found)
    crop = np.asarray(
        Image.fromarray(mask[30:90, 50:150].astype(np.float32)).resize((64, 64), Image.BILINEAR)
    )
    np.testing.assert_array_equal(coded.seg_codes[0], big_vision_encode(checkpoint, crop[None])[0])
    assert found.seg_codes[0, 0] == -1  # the input is left as it was


def test_encoder_load_refuses_a_file_without_one(tmp_path, vae) -> None:
    _, checkpoint = vae
    decoder_only = {k: v for k, v in checkpoint.items() if not k.startswith("encoder.")}
    np.savez(tmp_path / "decoder-only.npz", **decoder_only)
    MaskDecoder.load(tmp_path / "decoder-only.npz")  # decoding needs no encoder
    with pytest.raises(CheckpointError, match="no mask encoder"):
        MaskEncoder.load(tmp_path / "decoder-only.npz")
