"""Decoding settings, declared once: what loads a Detector and how it decodes.

:class:`DecodeSettings` (the model and its decoding: every verb that loads a detector,
``serve`` included) and :class:`DetectSettings` (+ batch size, threshold, test-time
augmentation, fusion: ``predict``, ``evaluate``, ``pacs``) are extended by each verb's own
settings (:class:`PredictSettings` below, ``evaluate.settings.EvaluateSettings``,
``serve.settings.ServeSettings``, ``pacs.settings.PacsSettings``). Their flags, ``--help``
and ``--config`` keys come from the fields (:mod:`paligemma_xray.settings`). No torch here:
reading, checking and writing settings never loads it (``load_detector`` does).
"""

from __future__ import annotations

import typing
from dataclasses import field
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import model_validator
from pydantic.dataclasses import dataclass

from paligemma_xray.errors import ConfigError
from paligemma_xray.locations import DEFAULT_PROMPT
from paligemma_xray.settings import SETTINGS_CONFIG, Float, StrList, flag

if TYPE_CHECKING:
    from paligemma_xray.infer.detector import Detector
    from paligemma_xray.infer.fusion import FusedDetector
    from paligemma_xray.infer.masks import MaskDecoder

DEFAULT_DETECT_TOKENS = 64  # ~8 boxes of 4 locations + label + separator
Attention = Literal["sdpa", "eager"]
# Attention kernels a loaded model may be switched to: "sdpa" (PyTorch's fused
# scaled-dot-product attention, flash/memory-efficient kernels on a GPU; transformers'
# default) and "eager" (the reference matmul-softmax-matmul), the switch that turns the
# fused path off. Both give the same tokens (tests/infer/test_detector_attention.py).
ATTENTION_CHOICES: tuple[str, ...] = typing.get_args(Attention)
Fusion = Literal["wbf", "nms"]
FUSION_METHODS: tuple[str, ...] = typing.get_args(Fusion)
"""How the boxes of several answers (models, views) or one answer's duplicates are fused."""
Transform = Literal["hflip"]
TTA_TRANSFORMS: tuple[str, ...] = typing.get_args(Transform)
"""Test-time augmentations: ``hflip`` mirrors the image (its boxes are mirrored back)."""


def check_decoding(
    *,
    batch_size: int | None = None,
    max_new_tokens: int | None = None,
    threshold: float | None = None,
    min_box_probability: float | None = None,
    box_or_stop: bool = True,
) -> None:
    """Raise :class:`ConfigError` on decoding settings that cannot work (None: not given)."""
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ConfigError(f"max new tokens must be at least 1, got {max_new_tokens}")
    if threshold is not None and not 0 <= threshold <= 1:
        raise ConfigError(f"threshold is a score between 0 and 1, got {threshold}")
    if min_box_probability is not None and not 0 < min_box_probability <= 1:
        raise ConfigError(f"min_box_probability is a probability in (0, 1], got {min_box_probability}")
    if min_box_probability is not None and not box_or_stop:
        raise ConfigError("min_box_probability belongs to the 'emit a box or stop' rule, not plain greedy")


@dataclass(config=SETTINGS_CONFIG)
class DecodeSettings:
    """The model and how it decodes: what ``Detector.load`` needs (every verb that loads one)."""

    model: Annotated[StrList, flag("--model", metavar="M", append=True, required=True)] = field(
        default_factory=list
    )
    """Checkpoint: HF folder, big_vision .npz, run folder, or a model name: Hugging Face Hub
    id (google/paligemma2-3b-pt-224) or Kaggle handle (kaggle:google/paligemma/jax/paligemma-3b-pt-224);
    give it several times for an ensemble, whose answers are fused per image (--fusion)."""
    revision: Annotated[str | None, flag(metavar="R")] = None
    """Of a Hub id: branch, tag or commit (default main); of a kaggle: handle: version."""
    max_new_tokens: Annotated[int, flag(metavar="N")] = DEFAULT_DETECT_TOKENS
    """Longest answer in tokens; 64 is about 8 boxes."""
    device: str | None = None
    """cpu, cuda, cuda:1 … (default: CUDA when available; one GPU per rank under torchrun)."""
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    """Weights' dtype (default: bfloat16 on a CPU with native bf16 matmul (AMX, AVX-512 BF16),
    else the checkpoint's)."""
    attention: Attention | None = None
    """Attention kernel (default: transformers' own, sdpa; eager turns the fused kernel off, same tokens)."""
    box_or_stop: Annotated[bool, flag("--plain-greedy")] = True
    """'Emit a box or stop': all location tokens' total probability against EOS where a box
    may start; --plain-greedy turns it off (plain greedy decoding, as model.generate does)."""
    min_box_probability: Annotated[float | None, flag(metavar="P")] = None
    """Also start a box where the location tokens together reach probability P although EOS
    is likelier, scored by that probability: candidates below the greedy operating point, so
    mAP and FROC see the whole precision-recall curve (e.g. 0.05; default: only where they beat EOS)."""
    seg_vae: Annotated[str | None, flag(metavar="NPZ")] = None
    """big_vision's mask decoder (vae-oid.npz): 'segment …' answers (<seg> codes) become masks
    in the JSON, PNGs, metrics and DICOM SEG."""

    @model_validator(mode="after")
    def _decodes(self) -> DecodeSettings:
        check_decoding(
            max_new_tokens=self.max_new_tokens,
            min_box_probability=self.min_box_probability,
            box_or_stop=self.box_or_stop,
        )
        return self

    def load_mask_decoder(self) -> MaskDecoder | None:
        """The ``--seg-vae`` mask decoder, read once for every model (None without one)."""
        if self.seg_vae is None:
            return None
        from paligemma_xray.infer.masks import MaskDecoder

        return MaskDecoder.load(self.seg_vae)

    def load_options(self) -> dict[str, typing.Any]:
        """The keyword arguments of ``Detector.load`` these settings give (model aside)."""
        return {
            "device": self.device,
            "dtype": self.dtype,
            "box_or_stop": self.box_or_stop,
            "min_box_probability": self.min_box_probability,
            "revision": self.revision,
            "attention": self.attention,
        }


@dataclass(config=SETTINGS_CONFIG)
class DetectSettings(DecodeSettings):
    """Decoding over many images: batch, threshold, test-time augmentation, ensembles."""

    batch_size: Annotated[int, flag(metavar="B")] = 8
    """Images decoded together."""
    threshold: Annotated[Float | None, flag(metavar="T")] = None
    """Keep boxes scored at least T (0 to 1; default: keep all)."""
    tta: Annotated[list[Transform], flag("--tta", append=True)] = field(default_factory=list)
    """Test-time augmentation: also detect on the mirrored image and fuse the boxes (mirrored
    back) with the plain answer."""
    fusion: Fusion = "wbf"
    """How several models' / views' boxes are fused: weighted box fusion or non-maximum
    suppression (ensemble-boxes)."""
    merge_duplicates: Fusion | None = None
    """Merge each answer's own near-duplicate boxes (IoU >= 0.7) before anything else (default: off)."""

    @model_validator(mode="after")
    def _detects(self) -> DetectSettings:
        check_decoding(batch_size=self.batch_size, threshold=self.threshold)
        return self

    @property
    def fused(self) -> bool:
        """Several models, test-time augmentation or merged duplicates: a FusedDetector."""
        return len(self.model) > 1 or bool(self.tta) or self.merge_duplicates is not None

    def load_detector(self, *, progress: bool = True) -> Detector | FusedDetector:
        """The detector these settings describe: one model, or the fused ensemble / TTA."""
        from paligemma_xray.infer.detector import Detector

        mask_decoder = self.load_mask_decoder()  # before the (long) model loads
        detectors = [
            Detector.load(
                model,
                batch_size=self.batch_size,
                progress=progress,
                mask_decoder=mask_decoder,
                **self.load_options(),
            )
            for model in self.model
        ]
        if not self.fused:
            return detectors[0]
        from paligemma_xray.infer.fusion import FusedDetector

        return FusedDetector(detectors, tta=self.tta, method=self.fusion, merge=self.merge_duplicates)


def is_detection_prompt(prompt: str) -> bool:
    """``detect …`` / ``segment …`` prompts answer with boxes; others with text."""
    return prompt.strip().split(maxsplit=1)[:1] in (["detect"], ["segment"])


@dataclass(config=SETTINGS_CONFIG)
class PredictSettings(DetectSettings):
    """The ``predict`` verb: images, folders and DICOM files in, one result file per image out."""

    paths: Annotated[StrList, flag(positional=True, metavar="PATH", required=True)] = field(
        default_factory=list
    )
    """Image file, DICOM file or folder (walked recursively); several may be given."""
    out: Annotated[str, flag(metavar="DIR")] = "predictions"
    """Output folder."""
    threshold: Annotated[Float | None, flag(metavar="T")] = None
    """Keep boxes scored at least T (default: the operating point saved with the model by
    `evaluate --operating-point`, else keep all; 0 keeps all)."""
    prompt: Annotated[str, flag(metavar="P")] = DEFAULT_PROMPT
    """Prompt (e.g. 'caption en', 'answer en is there a fracture?' for free-form answers)."""
    resume: bool = False
    """Continue OUT: skip images whose OUT/json file exists (refused if OUT was made with
    another model, prompt or decoding flags)."""
    overwrite: bool = False
    """Replace the results already in OUT."""
    images: bool = True
    """Write annotated PNGs (--no-images: do not)."""
    workers: Annotated[int | None, flag(metavar="N")] = None
    """Threads decoding the next images, and as many writing the finished ones' files, while
    the model works (default: up to 4; 0: all on the main thread)."""
    dicom_sr: bool = False
    """For each DICOM input also write OUT/dicom-sr/<name>.sr.dcm: a DICOM Structured Report
    (TID 1500) with one region per box, for PACS and viewers."""
    secondary_capture: bool = False
    """For each DICOM input also write OUT/dicom-sc/<name>.sc.dcm: the image with its boxes
    drawn, as a DICOM Secondary Capture (for viewers without SR)."""
    dicom_seg: bool = False
    """For each DICOM input whose objects have masks (a 'segment …' prompt with --seg-vae)
    also write OUT/dicom-seg/<name>.seg.dcm: a DICOM Segmentation."""

    @model_validator(mode="after")
    def _predicts(self) -> PredictSettings:
        if self.resume and self.overwrite:
            raise ConfigError(
                "--resume continues the results in the folder and --overwrite replaces them: give one",
                path=self.out,
            )
        if self.workers is not None and self.workers < 0:
            raise ConfigError(f"loading and writing workers must be at least 0, got {self.workers}")
        if (self.dicom_sr or self.secondary_capture or self.dicom_seg) and not self.detecting:
            raise ConfigError(f"--dicom-sr needs a detection prompt ('detect …'), not {self.prompt!r}")
        return self

    @property
    def detecting(self) -> bool:
        """A detection prompt (boxes); else free-form answers."""
        return is_detection_prompt(self.prompt)
