"""MLPs in blocks of tokens: bit for bit the whole-batch MLPs, names and weights untouched."""

from __future__ import annotations

import copy

import torch

from paligemma_xray.infer import Detector
from paligemma_xray.model.rows import blocked


def test_blocked_mlps_give_the_same_bits_in_bfloat16_and_float32(tiny_model_v1, tiny_model_v2):
    for source in (tiny_model_v1[0], tiny_model_v2[0]):
        for dtype in (torch.float32, torch.bfloat16):
            model = copy.deepcopy(source).to(dtype)
            names = sorted(model.state_dict())
            mlps = [
                model.model.language_model.layers[0].mlp,
                model.model.vision_tower.encoder.layers[0].mlp,
            ]
            inputs = [torch.randn(3, 301, mlp_width(m), dtype=dtype) for m in mlps]
            with torch.inference_mode():
                whole = [mlp(x) for mlp, x in zip(mlps, inputs)]
                assert blocked(model, rows=64) >= 2
                parts = [mlp(x) for mlp, x in zip(mlps, inputs)]
            for a, b in zip(whole, parts):
                assert a.shape == b.shape and torch.equal(a, b)
            assert sorted(model.state_dict()) == names


def mlp_width(mlp: torch.nn.Module) -> int:
    first = next(m for m in mlp.children() if isinstance(m, torch.nn.Linear))
    return first.in_features


def test_a_cpu_detector_blocks_its_mlps_and_answers_the_same(tiny_boxes_hf_dir):
    from PIL import Image

    detector = Detector.load(tiny_boxes_hf_dir, device="cpu", dtype="float32", progress=False)
    mlp = detector.model.model.language_model.layers[0].mlp
    assert "forward" in vars(mlp)  # blocked on the CPU
    plain = copy.deepcopy(detector.model)
    for module in plain.modules():
        vars(module).pop("forward", None)
    images = [Image.new("RGB", (64, 48), "gray")] * 3
    ours = detector.detect(images, max_new_tokens=12)
    detector.model = plain
    again = detector.detect(images, max_new_tokens=12)
    assert ours[0].score is not None and len(ours[0].xyxy) > 0  # boxes to compare
    for a, b in zip(ours, again, strict=True):
        assert a.class_name == b.class_name
        assert a.xyxy.tolist() == b.xyxy.tolist() and a.score.tolist() == b.score.tolist()
