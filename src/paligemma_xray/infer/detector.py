"""``Detector``: images in, scored detections (or free-form answers) out.

The facade everyone uses (evaluation, ``predict``, the service, the demo). It owns the
tokenizer-side details of decoding: which ids are location tokens, how decoded tokens
become text pieces whose log-probabilities :func:`paligemma_xray.locations.parse` can
attribute to boxes, and where "emit a box or stop" applies (see
:mod:`paligemma_xray.infer.decode`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from PIL import Image

from paligemma_xray.errors import ConfigError
from paligemma_xray.infer.calibrated import Calibration, find_calibration
from paligemma_xray.infer.decode import BoxOrStop, greedy_decode
from paligemma_xray.infer.masks import MaskDecoder, decode_masks
from paligemma_xray.infer.settings import (
    ATTENTION_CHOICES,
    DEFAULT_DETECT_TOKENS,
    check_decoding,
    is_detection_prompt,
)
from paligemma_xray.locations import (
    DEFAULT_PROMPT,
    LOC_BINS,
    Detections,
    classes_from_prefix,
    loc_token,
    parse,
)

if TYPE_CHECKING:
    from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor

ImageInput = Image.Image | str | Path | bytes

DEFAULT_GENERATE_TOKENS = 64
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@dataclass
class Generation:
    """One decoded answer.

    Attributes:
        text: the decoded text (special tokens left out); equals ``"".join(pieces)``.
        tokens: generated token ids, EOS included when the model produced it.
        logprobs: log-probability recorded for each token (see ``BoxOrStop`` for the one
            exception: a box's first location token carries the log of the total
            location mass).
        pieces: the text each token contributes ("" for special tokens).
        finished: True when the model stopped at EOS, False when cut at the token limit.
    """

    text: str
    tokens: list[int]
    logprobs: list[float]
    pieces: list[str]
    finished: bool

    @property
    def token_logprobs(self) -> list[tuple[str, float]]:
        """``(piece, logprob)`` pairs, the form :func:`~paligemma_xray.locations.parse` takes."""
        return list(zip(self.pieces, self.logprobs))


class DetectorLike(Protocol):
    """What every user of a detector relies on, and all it may rely on.

    :class:`Detector`, :class:`~paligemma_xray.infer.fusion.FusedDetector` (several models
    and/or test-time augmentation) and the service's stand-ins satisfy it; evaluation,
    ``predict``, the service, the PACS client and the DICOM SR writer take one. A fused
    detector's ``calibration`` is ``None`` (its scores are not those any calibration saw);
    one that only detects raises :class:`~paligemma_xray.errors.ConfigError` from
    ``iter_generate``.
    """

    @property
    def model_id(self) -> str:
        """A name for reports, manifests and the DICOM SR (the checkpoint's path or Hub id)."""
        ...

    @property
    def batch_size(self) -> int:
        """Images decoded together when a call gives no ``batch_size``."""
        ...

    @property
    def box_or_stop(self) -> bool:
        """Whether detection prompts decode with the "emit a box or stop" rule."""
        ...

    @property
    def min_box_probability(self) -> float | None:
        """The rule's lower bound on the location mass that starts a box (None: beat EOS)."""
        ...

    @property
    def calibration(self) -> Calibration | None:
        """Score → probability maps and the operating point saved with the model, if any."""
        ...

    @property
    def dtype(self) -> str:
        """The weights' dtype as decoded (``"bfloat16"``…): recorded in manifests and metrics."""
        ...

    @property
    def mask_decoder(self) -> MaskDecoder | None:
        """big_vision's VQ-VAE decoder that turns ``<seg>`` answers into masks (None: no masks)."""
        ...

    def detect(
        self,
        images: Sequence[ImageInput],
        prompt: str | Sequence[str] = DEFAULT_PROMPT,
        max_new_tokens: int = DEFAULT_DETECT_TOKENS,
        batch_size: int | None = None,
        threshold: float | None = None,
    ) -> list[Detections]:
        """One Detections per image, boxes in its pixels (see :meth:`Detector.detect`)."""
        ...

    def iter_detect(
        self,
        images: Iterable[ImageInput],
        prompt: str | Sequence[str] = DEFAULT_PROMPT,
        max_new_tokens: int = DEFAULT_DETECT_TOKENS,
        batch_size: int | None = None,
        threshold: float | None = None,
    ) -> Iterator[tuple[Generation, Detections]]:
        """``(generation, detections)`` per image, one batch of images in memory."""
        ...

    def iter_generate(
        self,
        images: Iterable[ImageInput],
        prompt: str | Sequence[str],
        max_new_tokens: int = DEFAULT_GENERATE_TOKENS,
        batch_size: int | None = None,
    ) -> Iterator[Generation]:
        """Free-form answers per image (captions, questions), one batch in memory."""
        ...


def set_attention(model: Any, attention: str) -> None:
    """Switch ``model``'s vision tower and language model to the ``attention`` kernel.

    Changes the kernel only, never the weights: our decoding loop follows the model's
    setting (see ``infer.decode``), so both choices give the same tokens. Gemma 2 (the
    language model of PaliGemma 2) has no SDPA path in transformers (its attention logits
    are soft-capped), so there ``sdpa`` applies to the vision tower only.
    """
    if attention not in ATTENTION_CHOICES:
        raise ConfigError(f"attention must be one of {', '.join(ATTENTION_CHOICES)}, got {attention!r}")
    core = getattr(model, "model", model)
    language_model = getattr(core, "language_model", None)
    text = attention
    if attention == "sdpa" and language_model is not None and not language_model._supports_sdpa:
        text = "eager"
    model.set_attn_implementation({"text_config": text, "vision_config": attention})


class Detector:
    """Batched, scored PaliGemma detection and free-form answers.

    Args:
        model: a ``PaliGemmaForConditionalGeneration`` (any size, PaliGemma 1 or 2).
        processor: its ``PaliGemmaProcessor`` (tokenizer with ``<loc>``/``<seg>`` tokens).
        model_id: a name for reports (the checkpoint path when loaded with :meth:`load`).
        box_or_stop: apply the "emit a box or stop" rule to detection prompts (default on;
            see :mod:`paligemma_xray.infer.decode`). Off: plain greedy decoding, exactly
            what ``model.generate(do_sample=False)`` produces.
        min_box_probability: with ``box_or_stop``, also start a box wherever the location
            tokens together reach this probability although EOS is likelier (``None``, the
            default: only where they beat it). Evaluation sets a low value so that boxes
            below the greedy operating point still come out, scored by their box
            probability, and mAP/FROC measure the whole precision-recall curve; a
            ``threshold`` on the score then picks the operating point.
        batch_size: images decoded together.
        calibration: score → probability maps and the operating point saved with the
            model (:mod:`paligemma_xray.infer.calibrated`); :meth:`load` reads it.
        mask_decoder: big_vision's VQ-VAE mask decoder
            (:class:`~paligemma_xray.infer.masks.MaskDecoder`, ``--seg-vae vae-oid.npz``):
            objects answered with ``<seg>`` codes get ``Detections.masks``. Without it such an
            answer is a one-line :class:`~paligemma_xray.errors.ConfigError`.

    Example (a tiny random model, so the boxes mean nothing; shapes and types do):

    >>> from PIL import Image
    >>> from paligemma_xray.model.tiny import tiny_model
    >>> model, processor = tiny_model(version=1, seed=0)
    >>> detector = Detector(model, processor)
    >>> found = detector.detect([Image.new("RGB", (320, 240))], max_new_tokens=12)
    >>> len(found), found[0].image_size, found[0].score is not None
    (1, (320, 240), True)
    >>> answer = detector.generate([Image.new("RGB", (64, 64))], "caption en", max_new_tokens=5)[0]
    >>> answer.text == "".join(answer.pieces) and len(answer.tokens) <= 5
    True
    """

    def __init__(
        self,
        model: PaliGemmaForConditionalGeneration,
        processor: PaliGemmaProcessor,
        *,
        model_id: str = "model",
        box_or_stop: bool = True,
        min_box_probability: float | None = None,
        batch_size: int = 8,
        calibration: Calibration | None = None,
        mask_decoder: MaskDecoder | None = None,
    ) -> None:
        check_decoding(
            batch_size=batch_size, min_box_probability=min_box_probability, box_or_stop=box_or_stop
        )
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.model_id = model_id
        self.box_or_stop = box_or_stop
        self.min_box_probability = min_box_probability
        self.batch_size = batch_size
        self.calibration = calibration
        self.mask_decoder = mask_decoder
        self._eos = self._eos_ids()
        self._rule = self._box_rule()
        self._special = set(self.tokenizer.all_special_ids)

    # -- construction --------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        path: str | Path,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        progress: bool = True,
        revision: str | None = None,
        attention: str | None = None,
        **options: Any,
    ) -> Detector:
        """Load a checkpoint (HF folder or big_vision ``.npz``) through ``model.load``.

        ``path`` may be a Hub id or a ``kaggle:`` handle (``revision``: its branch, tag,
        commit or version; see ``model.load``), which is then the ``model_id``.
        ``device`` defaults to CUDA when available (under ``torchrun``: this rank's GPU);
        ``dtype`` to bfloat16 on a CPU with native bf16 matmul, else the checkpoint's (see
        :func:`~paligemma_xray.model.dtypes.inference_dtype`; printed once). ``progress``:
        loading bars. ``attention``: one of :data:`ATTENTION_CHOICES` (None: transformers'
        default, SDPA). ``options`` go to the constructor. The calibration saved with a local
        model (``calibration.json``, see
        :func:`~paligemma_xray.infer.calibrated.find_calibration`) is read unless ``options``
        give one, and applied only if it was fitted on these very weights (else a warning).
        """
        from paligemma_xray.model import load as load_model

        check_decoding(  # before the (long) load
            batch_size=options.get("batch_size"),
            min_box_probability=options.get("min_box_probability"),
            box_or_stop=options.get("box_or_stop", True),
        )
        if attention is not None and attention not in ATTENTION_CHOICES:
            raise ConfigError(f"attention must be one of {', '.join(ATTENTION_CHOICES)}, got {attention!r}")
        if device is None:
            from paligemma_xray.infer.distributed import world

            w = world()  # under a launcher: one GPU per rank
            device = w.device() if w.size > 1 else ("cuda" if torch.cuda.is_available() else "cpu")
        if "calibration" not in options:
            options["calibration"] = find_calibration(path)
        from paligemma_xray.model import fingerprint as fingerprint_files
        from paligemma_xray.model.dtypes import announce, dtype_name, inference_dtype
        from paligemma_xray.model.loading import check_device

        check_device(device)  # a one-line error for a bad --device, before the dtype is chosen
        choice = inference_dtype(device, dtype)
        fingerprint_files.start(path)  # predict's manifest records it: hashed while the model loads
        model, processor = load_model(
            path, dtype=choice.dtype, device=device, progress=progress, revision=revision
        )
        announce(f"weights in {dtype_name(model)}: {choice.reason}")
        if torch.device(device).type == "cpu":
            from paligemma_xray.model.rows import blocked

            blocked(model)  # MLPs 256 tokens at a time: the same numbers, faster on a CPU
        if attention is not None:
            set_attention(model, attention)
        model_id = f"{path}@{revision}" if revision else str(path)
        return cls(model, processor, model_id=model_id, **options)

    def _eos_ids(self) -> list[int]:
        ids = {self.tokenizer.eos_token_id}
        generation_config = getattr(self.model, "generation_config", None)
        configured = getattr(generation_config, "eos_token_id", None)
        # generate() stops at every configured EOS; so do we, to stay token-identical.
        if isinstance(configured, int):
            ids.add(configured)
        elif configured:
            ids.update(int(i) for i in configured)
        return sorted(i for i in ids if i is not None)

    def _box_rule(self) -> BoxOrStop | None:
        convert = self.tokenizer.convert_tokens_to_ids
        loc_ids = [convert(loc_token(i)) for i in range(LOC_BINS)]
        if any(i is None or i == self.tokenizer.unk_token_id for i in loc_ids):
            return None  # a tokenizer without location tokens: nothing to decide
        # Pieces that can precede a new box: those of " ; " before a location token.
        sep = self.tokenizer(" ; <loc0000>", add_special_tokens=False)["input_ids"]
        starts = {i for i in sep[:-1]}
        starts.update(self.tokenizer(";", add_special_tokens=False)["input_ids"])
        return BoxOrStop(
            loc_ids=torch.tensor(loc_ids),
            start_after=frozenset(starts),
            min_box_probability=self.min_box_probability,
        )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> str:
        """The weights' dtype name (``bfloat16`` …): predict's manifest and evaluate's metrics record it."""
        from paligemma_xray.model.dtypes import dtype_name

        return dtype_name(self.model)

    # -- decoding ------------------------------------------------------------------------

    def _pieces(self, ids: Sequence[int]) -> list[str]:
        """Text contributed by each token, so that the pieces concatenate to the text.

        SentencePiece marks spaces with "▁" and writes bytes outside its vocabulary as
        ``<0xNN>`` tokens; a UTF-8 character split across byte tokens is given to the last
        of them (the earlier ones contribute "").
        """
        pieces, pending = [], b""
        for token_id, token in zip(ids, self.tokenizer.convert_ids_to_tokens(list(ids))):
            if token_id in self._special or token is None:
                pieces.append("")
                continue
            byte = _BYTE_PIECE.match(token)
            if byte:
                pending += bytes([int(byte.group(1), 16)])
                try:
                    pieces.append(pending.decode("utf-8"))
                    pending = b""
                except UnicodeDecodeError:
                    pieces.append("")
                continue
            if pending:  # an unfinished byte sequence: keep what can be shown
                pieces[-1] = pending.decode("utf-8", errors="replace")
                pending = b""
            pieces.append(token.replace("▁", " "))
        return pieces

    def _load(self, image: ImageInput) -> Image.Image:
        if isinstance(image, Image.Image):
            return image.convert("RGB") if image.mode != "RGB" else image
        from paligemma_xray.data import load_image

        return load_image(image)

    def _decode_batch(
        self, images: list[Image.Image], prompts: list[str], max_new_tokens: int, box_or_stop: bool
    ) -> list[Generation]:
        from paligemma_xray.model.processing import build_batch

        batch = build_batch(self.processor, images, prompts)
        device, dtype = self.device, next(self.model.parameters()).dtype
        batch = {k: v.to(device) for k, v in batch.items()}
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
        out = greedy_decode(
            self.model,
            batch,
            max_new_tokens=max_new_tokens,
            eos_token_id=self._eos,
            box_or_stop=self._rule if box_or_stop else None,
        )
        generations = []
        for tokens, logprobs, finished in zip(out.tokens, out.logprobs, out.finished):
            pieces = self._pieces(tokens)
            generations.append(Generation("".join(pieces), tokens, logprobs, pieces, finished))
        return generations

    def _batches(self, images: Iterable[ImageInput], batch_size: int) -> Iterator[list[Image.Image]]:
        chunk: list[Image.Image] = []
        for image in images:
            chunk.append(self._load(image))
            if len(chunk) == batch_size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    def _prompted_batches(
        self, images: Iterable[ImageInput], prompt: str | Sequence[str], batch_size: int
    ) -> Iterator[tuple[list[Image.Image], list[str]]]:
        """Batches of loaded images with their prompts (``prompt``: one for all, or one per image)."""
        index = 0
        for chunk in self._batches(images, batch_size):
            if isinstance(prompt, str):
                prompts = [prompt] * len(chunk)
            else:
                prompts = list(prompt[index : index + len(chunk)])
            index += len(chunk)
            yield chunk, prompts

    def generate(
        self,
        images: Sequence[ImageInput],
        prompt: str | Sequence[str],
        max_new_tokens: int = DEFAULT_GENERATE_TOKENS,
        batch_size: int | None = None,
        box_or_stop: bool = False,
    ) -> list[Generation]:
        """Answer ``prompt`` (``caption en``, ``answer en where is the fracture?`` …) per image.

        ``prompt`` is one string for all images or one per image. Plain greedy decoding
        unless ``box_or_stop``.
        """
        return list(self.iter_generate(images, prompt, max_new_tokens, batch_size, box_or_stop))

    def iter_generate(
        self,
        images: Iterable[ImageInput],
        prompt: str | Sequence[str],
        max_new_tokens: int = DEFAULT_GENERATE_TOKENS,
        batch_size: int | None = None,
        box_or_stop: bool = False,
    ) -> Iterator[Generation]:
        """:meth:`generate` as a stream: one batch of images in memory at a time."""
        check_decoding(batch_size=batch_size, max_new_tokens=max_new_tokens)
        for chunk, prompts in self._prompted_batches(images, prompt, batch_size or self.batch_size):
            yield from self._decode_batch(chunk, prompts, max_new_tokens, box_or_stop)

    def detect(
        self,
        images: Sequence[ImageInput],
        prompt: str | Sequence[str] = DEFAULT_PROMPT,
        max_new_tokens: int = DEFAULT_DETECT_TOKENS,
        batch_size: int | None = None,
        threshold: float | None = None,
    ) -> list[Detections]:
        """One :class:`~paligemma_xray.locations.Detections` per image, boxes in its pixels.

        Scores: the geometric mean of the probabilities of each box's own tokens (four
        locations and label), the first location carrying the total location mass when
        ``box_or_stop`` is on. ``threshold`` keeps boxes scored at least that much (None
        keeps all, what evaluation needs).
        """
        return [d for _, d in self.iter_detect(images, prompt, max_new_tokens, batch_size, threshold)]

    def iter_detect(
        self,
        images: Iterable[ImageInput],
        prompt: str | Sequence[str] = DEFAULT_PROMPT,
        max_new_tokens: int = DEFAULT_DETECT_TOKENS,
        batch_size: int | None = None,
        threshold: float | None = None,
    ) -> Iterator[tuple[Generation, Detections]]:
        """:meth:`detect` as a stream of ``(generation, detections)``, batch by batch.

        ``prompt`` may also be one prompt per image (e.g. each record's own prefix).
        """
        check_decoding(batch_size=batch_size, max_new_tokens=max_new_tokens, threshold=threshold)
        for chunk, prompts in self._prompted_batches(images, prompt, batch_size or self.batch_size):
            rule = self.box_or_stop and all(is_detection_prompt(p) for p in prompts)
            generations = self._decode_batch(chunk, prompts, max_new_tokens, rule)
            for image, text_prompt, generation in zip(chunk, prompts, generations):
                classes = classes_from_prefix(text_prompt) or None
                found = parse(generation.text, image.size, classes, token_logprobs=generation.token_logprobs)
                if threshold is not None:
                    found = found.with_threshold(threshold)
                yield generation, decode_masks(self.mask_decoder, found)
