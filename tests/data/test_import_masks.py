"""``data import --format coco --seg-vae``: polygon masks become ``<seg>`` training targets."""

from __future__ import annotations

import json
import warnings

import numpy as np
from infer.bv_masks import big_vision_encode  # tests/ is on the path (its conftest)
from PIL import Image

from paligemma_xray.cli import main
from paligemma_xray.data import open_dataset, record_targets
from paligemma_xray.infer.masks import write_random_vae
from paligemma_xray.masks import box_crop64


def _coco_with_masks(src):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import supervision as sv
    src.mkdir()
    Image.new("RGB", (160, 120), (60, 60, 60)).save(src / "a.jpg")
    Image.new("RGB", (160, 120), (60, 60, 60)).save(src / "b.jpg")
    yy, xx = np.mgrid[0:120, 0:160]
    mask = ((yy - 60) / 30) ** 2 + ((xx - 70) / 45) ** 2 <= 1
    ys, xs = np.nonzero(mask)
    box = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], np.float32)
    with_mask = sv.Detections(xyxy=box, mask=mask[None], class_id=np.array([0]))
    annotations = {str(src / "a.jpg"): with_mask, str(src / "b.jpg"): sv.Detections.empty()}
    dataset = sv.DetectionDataset(["fracture"], [str(src / "a.jpg"), str(src / "b.jpg")], annotations)
    dataset.as_coco(annotations_path=str(src / "_annotations.coco.json"))
    return box[0]


def test_coco_polygons_become_seg_codes_as_big_vision_encodes_them(tmp_path, capsys) -> None:
    import supervision as sv

    box = _coco_with_masks(tmp_path / "src")
    vae = write_random_vae(tmp_path / "vae-oid.npz", seed=2)
    out = tmp_path / "out"
    assert (
        main(["data", "import", "--format", "coco", str(tmp_path / "src"), str(out), "--seg-vae", str(vae)])
        == 0
    )
    assert "1 masks" in capsys.readouterr().out
    rows = [
        json.loads(line) for line in (out / "dataset" / "_annotations.train.jsonl").read_text().splitlines()
    ]
    by_image = {row["image"]: row for row in rows}
    assert by_image["a.jpg"]["prefix"] == "segment fracture" and by_image["b.jpg"]["suffix"] == ""
    # The data layer reads it back with 16 codes per object.
    dataset = open_dataset(out)
    assert not [p for p in dataset.problems if p.severity == "error"]
    record = next(r for r in dataset.records("train") if r.image.name == "a.jpg")
    codes = record_targets(record, (160, 120)).seg_codes[0]
    # Independent: the mask as the COCO file holds it, cropped and resized as big_vision does,
    # through the numpy transcription of big_vision's TF encoder.
    read = sv.DetectionDataset.from_coco(
        str(tmp_path / "src"), str(tmp_path / "src" / "_annotations.coco.json"), force_masks=True
    )
    (mask,) = read.annotations[str(tmp_path / "src" / "a.jpg")].mask
    with np.load(vae, allow_pickle=False) as npz:
        checkpoint = {k: npz[k] for k in npz.files}
    expected = big_vision_encode(checkpoint, box_crop64(mask, box)[None])[0]
    np.testing.assert_array_equal(codes, expected)


def test_seg_vae_is_refused_for_formats_without_polygons(tmp_path, capsys) -> None:
    (tmp_path / "src").mkdir()
    vae = write_random_vae(tmp_path / "vae-oid.npz", seed=2)
    code = main(
        [
            "data",
            "import",
            "--format",
            "voc",
            str(tmp_path / "src"),
            str(tmp_path / "o"),
            "--seg-vae",
            str(vae),
        ]
    )
    assert code == 2 and "COCO" in capsys.readouterr().err
