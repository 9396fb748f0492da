"""Masks through the real decoding path: predict's JSON, PNG and COCO results, evaluation,
the service's JSON. The model is the tiny one with a scripted output head that answers a
fixed segmentation (a random model never writes one); everything after the head is real."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
from bv_masks import big_vision_reconstruct_masks, place
from PIL import Image
from seg_answers import ANSWER, BINS, CODES, HEIGHT, WIDTH, answering_detector

from paligemma_xray.cli import main
from paligemma_xray.data import Record
from paligemma_xray.errors import ConfigError
from paligemma_xray.evaluate.metrics import mask_metrics
from paligemma_xray.evaluate.runner import evaluate_records
from paligemma_xray.infer import Detector
from paligemma_xray.infer.masks import MaskDecoder, write_random_vae
from paligemma_xray.infer.predict import predict
from paligemma_xray.infer.settings import PredictSettings
from paligemma_xray.locations import Detections
from paligemma_xray.masks import decode_rle, encode_rle


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    path = write_random_vae(tmp_path_factory.mktemp("vae") / "vae-oid.npz", seed=5)
    with np.load(path, allow_pickle=False) as npz:
        checkpoint = {k: npz[k] for k in npz.files}
    return path, checkpoint


def expected_mask(checkpoint) -> np.ndarray:
    mask64 = big_vision_reconstruct_masks(checkpoint, CODES[None]).astype(np.float32)[0]
    return place(mask64, BINS, HEIGHT, WIDTH)


@pytest.fixture
def xray(tmp_path):
    path = tmp_path / "in" / "knee.png"
    path.parent.mkdir()
    Image.new("RGB", (WIDTH, HEIGHT), (90, 90, 90)).save(path)
    return path


def test_predict_writes_masks_in_json_png_and_coco(tmp_path, xray, vae) -> None:
    path, checkpoint = vae
    detector = answering_detector(MaskDecoder.load(path))
    out = tmp_path / "out"
    settings = PredictSettings(
        paths=[str(xray)], out=str(out), prompt="segment fracture", max_new_tokens=40, workers=0
    )
    predict(detector, settings, progress=False)
    record = json.loads((out / "json" / "knee.png.json").read_text())
    assert record["text"] == ANSWER
    (obj,) = record["detections"]["detections"]
    assert obj["seg_codes"] == CODES.tolist()
    mask = decode_rle(obj["mask"])
    reference = expected_mask(checkpoint)
    assert reference.any() and (~reference).any()
    assert int((mask != reference).sum()) <= 2  # float32 round-off at the threshold only
    (coco,) = json.loads((out / "predictions.coco.json").read_text())
    assert coco["segmentation"] == obj["mask"]
    png = np.asarray(Image.open(out / "annotated" / "knee.png.png").convert("RGB")).astype(int)
    # Away from the box's edges and caption: masked pixels are tinted, the others are not.
    inner = np.zeros_like(reference)
    x1, y1, x2, y2 = (int(v) for v in np.array(BINS)[[1, 0, 3, 2]] / 1023 * [WIDTH, HEIGHT, WIDTH, HEIGHT])
    inner[y1 + 25 : y2 - 6, x1 + 6 : x2 - 6] = True
    tinted = (np.abs(png - 90).sum(axis=2) > 0)[inner]
    np.testing.assert_array_equal(tinted, reference[inner])


def test_a_seg_answer_without_the_decoder_is_one_line(tmp_path, xray) -> None:
    with pytest.raises(ConfigError, match=r"--seg-vae"):
        settings = PredictSettings(
            paths=[str(xray)],
            out=str(tmp_path / "out"),
            prompt="segment fracture",
            max_new_tokens=40,
            workers=0,
        )
        predict(answering_detector(None), settings, progress=False)


def test_cli_refuses_a_missing_seg_vae_before_loading_the_model(tmp_path, xray, capsys) -> None:
    code = main(
        ["predict", str(xray), "--model", str(tmp_path / "no-model"), "--seg-vae", str(tmp_path / "vae.npz"),
         "--out", str(tmp_path / "out")]
    )  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "vae.npz" in err[0] and "mask decoder" in err[0]


def test_evaluation_decodes_ground_truth_codes_and_scores_masks(tmp_path, xray, vae) -> None:
    path, _ = vae
    detector = answering_detector(MaskDecoder.load(path))
    record = Record(xray, "segment fracture", ANSWER, "test", tmp_path / "a.jsonl", 1)
    rows, metrics = evaluate_records(detector, [record], bootstrap=0, progress=False, max_new_tokens=40)
    assert rows[0]["ground_truth"]["detections"][0]["mask"] == rows[0]["prediction"]["detections"][0]["mask"]
    masks = metrics["masks"]
    assert masks["map50"] == pytest.approx(1.0) and masks["map50_95"] == pytest.approx(1.0)
    assert masks["dice"] == {"mean": 1.0, "median": 1.0, "n": 1}
    assert masks["iou"]["mean"] == 1.0 and masks["objects_without_mask"] == 0
    # The report shows the mask figures (and draws the masks in its gallery).
    from paligemma_xray.evaluate.runner import save_evaluation
    from paligemma_xray.report.html import write_report

    save_evaluation(tmp_path / "eval", rows, metrics)
    page = write_report(tmp_path / "eval").read_text()
    assert "masks: mAP@0.5 (COCO segm)" in page and "masks: Dice per matched object (mean)" in page
    assert page.count("data:image/jpeg;base64,") >= 1
    # Without the decoder the ground truth's codes cannot become masks: said, not guessed.
    plain = Detector(detector.model, detector.processor, batch_size=1)
    record_boxes = Record(xray, "segment fracture", ANSWER, "test", tmp_path / "a.jsonl", 1)
    detector.model.lm_head.calls = 0
    with pytest.raises(ConfigError):  # the prediction has codes too
        evaluate_records(plain, [record_boxes], bootstrap=0, progress=False, max_new_tokens=40)


def _square(x1: int, y1: int, x2: int, y2: int, size=(100, 100)) -> np.ndarray:
    mask = np.zeros((size[1], size[0]), bool)
    mask[y1:y2, x1:x2] = True
    return mask


def _one(box, mask, score=None) -> Detections:
    return Detections(
        xyxy=[box],
        class_name=["fracture"],
        class_id=[0],
        score=None if score is None else [score],
        seg_codes=[[-1] * 16],
        image_size=(100, 100),
        masks=[encode_rle(mask)],
    )


def test_mask_metrics_against_hand_counts() -> None:
    truth = _one([10, 10, 50, 50], _square(10, 10, 50, 50))  # 1600 px
    # Predicted: the same box (box IoU 1), mask 40×32 inside it: 1280 px, all inside the truth.
    prediction = _one([10, 10, 50, 50], _square(10, 10, 50, 42), score=0.8)
    figures = mask_metrics([truth], [prediction], ["fracture"], iou_threshold=0.5)
    assert figures is not None
    assert figures["iou"]["mean"] == pytest.approx(1280 / 1600)
    assert figures["dice"]["mean"] == pytest.approx(2 * 1280 / (1600 + 1280))
    # COCO segm: mask IoU 0.8 is a hit at 0.50…0.80 (7 of the 10 thresholds), a miss above.
    assert figures["map50"] == pytest.approx(1.0)
    assert figures["map50_95"] == pytest.approx(0.7)
    boxes_only = Detections(
        xyxy=[[10, 10, 50, 50]], class_name=["fracture"], class_id=[0], score=[0.8],
        seg_codes=[[-1] * 16], image_size=(100, 100),
    )  # fmt: skip
    assert mask_metrics([truth], [boxes_only], ["fracture"]) is None


def test_service_answers_masks(vae, xray) -> None:
    from paligemma_xray.serve import ServeConfig, ServerThread, create_app

    path, checkpoint = vae
    detector = answering_detector(MaskDecoder.load(path))
    with ServerThread(create_app(detector, ServeConfig(max_new_tokens=40))) as server:
        response = httpx.post(
            f"{server.url}/v1/detect",
            files={"file": ("knee.png", xray.read_bytes(), "image/png")},
            data={"prompt": "segment fracture"},
            timeout=60,
        )
    assert response.status_code == 200, response.text
    (obj,) = response.json()["detections"]
    assert int((decode_rle(obj["mask"]) != expected_mask(checkpoint)).sum()) <= 2
    assert obj["mask_png"].startswith("data:image/png;base64,")
