"""Helpers for the service tests: synthetic uploads, a corpus of bad files, a fake detector."""

from __future__ import annotations

import io

import numpy as np
from dicom_builder import write_dicom
from PIL import Image, ImageDraw

from paligemma_xray.locations import classes_from_prefix, encode, parse


def xray_png(width: int = 96, height: int = 128, seed: int = 0, fmt: str = "PNG") -> bytes:
    """A synthetic grayscale 'radiograph': dark field, a bright bone with a dark crack."""
    rng = np.random.default_rng(seed)
    field = rng.normal(30, 8, (height, width)).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(field, mode="L")
    draw = ImageDraw.Draw(image)
    draw.rectangle([width * 0.35, height * 0.1, width * 0.6, height * 0.9], fill=210)
    draw.line([width * 0.35, height * 0.5, width * 0.6, height * 0.45], fill=40, width=2)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def dicom_bytes(with_pixels: bool, width: int = 64, height: int = 80) -> bytes:
    """A DICOM Part 10 file (CR, 12-bit MONOCHROME2), with or without its pixel data."""
    pixels = (np.arange(width * height, dtype=np.uint16).reshape(height, width) * 7) % 4096
    return write_dicom(
        None,
        pixels if with_pixels else None,
        modality="CR",
        sop_class="1.2.840.10008.5.1.4.1.1.1",  # CR image storage
        PatientName="Synthetic^Phantom",
    )


def bad_corpus() -> dict[str, tuple[bytes, str, str, int]]:
    """name -> (file bytes, filename, declared content type, expected status)."""
    jpeg = io.BytesIO()
    Image.fromarray(np.full((64, 64), 128, np.uint8)).save(jpeg, format="JPEG")
    png = xray_png()
    rng = np.random.default_rng(7)
    return {
        "empty": (b"", "empty.png", "image/png", 422),
        "truncated_jpeg": (jpeg.getvalue()[:200], "cut.jpg", "image/jpeg", 422),
        "truncated_png": (png[:60], "cut.png", "image/png", 422),
        "text": (b"this is not an x-ray\n" * 20, "notes.txt", "text/plain", 415),
        "text_named_png": (b"hello, I am a PNG\n", "liar.png", "image/png", 415),
        "random_bytes": (
            rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(),
            "noise.bin",
            "application/octet-stream",
            415,
        ),
        "html": (b"<!doctype html><script>alert(1)</script>", "x.html", "text/html", 415),
        "pdf": (
            b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n",
            "report.pdf",
            "application/pdf",
            415,
        ),
        "dicom_without_pixels": (dicom_bytes(with_pixels=False), "report.dcm", "application/dicom", 422),
        "dicom_preamble_garbage": (
            b"\x00" * 128 + b"DICM" + b"\xff" * 64,
            "broken.dcm",
            "application/dicom",
            422,
        ),
        "png_header_garbage_body": (png[:16] + b"\x00" * 300, "garbage.png", "image/png", 422),
    }


class FakeDetector:
    """The Detector interface with a fixed answer: two boxes, scores 0.9 and 0.2, labelled
    with the classes the prompt asks for in turn (``detect fracture ; cast``: a fracture, a
    cast), so that a test sees the prompt reach the model.

    Used where the test is about the HTTP contract (status codes, limits, auth), not the
    model; end-to-end tests use the real Detector.
    """

    model_id = "fake-detector"
    batch_size, box_or_stop, min_box_probability, calibration = 8, True, None, None  # DetectorLike
    dtype, mask_decoder = "float32", None
    BOXES = ([10, 20, 40, 60], [50, 10, 90, 30])

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.prompts: list[str] = []

    def detect(self, images, prompt="detect fracture", **kwargs):
        self.calls.append(len(images))
        self.prompts.append(prompt)
        classes = classes_from_prefix(prompt) or ["fracture"]
        labels = [classes[i % len(classes)] for i in range(len(self.BOXES))]
        text = encode(list(self.BOXES), labels, (100, 100))
        results = []
        for image in images:
            detections = parse(text, (100, 100), classes, [(text, 0.0)])
            # Rescale the 100×100 answer to the image and give the two boxes fixed scores.
            scale = np.array([image.width / 100, image.height / 100] * 2, np.float32)
            detections.xyxy = detections.xyxy * scale
            detections.image_size = image.size
            detections.score = np.array([0.9, 0.2], np.float32)
            results.append(detections)
        return results
