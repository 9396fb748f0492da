"""The CPU benchmarks' own arithmetic: the prefill FLOPs the compute bound divides (counted
independently by torch's FLOP counter) and the bf16/float32 agreement's box matching."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import PaliGemmaForConditionalGeneration

from paligemma_xray.model.bigvision import make_config
from paligemma_xray.model.tiny import tiny_dims

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _module(name: str):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.mark.parametrize("kv_heads", [1, 4])
def test_prefill_flops_are_what_torch_counts(kv_heads):
    cpu_inference = _module("cpu_inference")
    dims = tiny_dims(1, image_size=224, width=64, heads=4, kv_heads=kv_heads, head_dim=16, mlp_dim=256,
                     vision_width=64, vision_heads=2, vision_mlp_dim=128)  # fmt: skip
    config = make_config(dims)
    config._attn_implementation = "eager"  # attention as matmuls, which the counter sees (not CPU SDPA)
    for sub in (config.text_config, config.vision_config):
        sub._attn_implementation = "eager"
    model = PaliGemmaForConditionalGeneration(config).eval()
    prompt = 7
    image_id = model.config.image_token_id
    ids = torch.cat([torch.full((1, dims.num_image_tokens), image_id), torch.randint(2, 100, (1, prompt))], 1)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model.model(
            input_ids=ids, pixel_values=torch.randn(1, 3, 224, 224), attention_mask=torch.ones_like(ids)
        )
    counts = counter.get_flop_counts()["Global"]
    patch_embedding = sum(v for op, v in counts.items() if "convolution" in str(op))
    assert patch_embedding > 0
    counted = counter.get_total_flops() - patch_embedding  # the formula leaves the 14×14 conv out
    assert cpu_inference.prefill_flops(dims, prompt) == pytest.approx(counted, rel=0.01)


def test_agreement_matches_boxes_by_iou_and_reports_score_differences():
    agreement = _module("dtype_agreement")
    box = {"box": [10, 10, 50, 50], "score": 0.8}
    moved = {"box": [11, 10, 50, 50], "score": 0.75}
    other = {"box": [100, 100, 140, 140], "score": 0.3}
    a = {"metrics": {"map50": 0.5, "map50_95": 0.2, "dtype": "float32"}, "rows": {"x": [box, other], "y": []}}
    b = {
        "metrics": {"map50": 0.49, "map50_95": 0.2, "dtype": "bfloat16"},
        "rows": {"x": [other, moved], "y": [box]},
    }
    result = agreement.compare(a, b)
    assert result["matched_boxes"] == 2
    assert result["matched_boxes_moved"] == 1
    assert result["largest_score_difference"] == pytest.approx(0.05)
    assert result["images_whose_box_count_differs"] == 1
    assert result["boxes"] == {"float32": 2, "bfloat16": 3}
    assert result["map50"]["difference"] == pytest.approx(-0.01)
