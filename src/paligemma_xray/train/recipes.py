"""Training recipes: one :class:`TrainConfig` dataclass and named presets.

Resolution order (later wins): the preset named by ``recipe`` → a YAML file → command-line
flags. The resolved config is what the run folder's ``config.yaml`` records, so a user who
runs ``train`` with no flags reads ``recipe: big-vision`` there and every value it implies.

The default preset, ``big-vision``, is docs/design.md's "Default recipe": the language model's
attention weights only, plain SGD at 0.01, cosine to 0 with 10% linear warm-up, batch 8,
512 examples (64 steps), text length 128, per-example mean loss, augmentations off.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator
from pydantic.dataclasses import dataclass

from paligemma_xray import settings as typed
from paligemma_xray.data.bad_records import DEFAULT_MAX_BAD_RECORDS
from paligemma_xray.errors import ConfigError
from paligemma_xray.settings import (
    AtLeastOne,
    Float,
    NonNegative,
    NonNegativeFloat,
    Probability,
    read_yaml,
)


@dataclass(config=typed.SETTINGS_CONFIG)
class TrainConfig:
    """Everything one training run depends on; saved as ``config.yaml`` in the run folder.

    A pydantic dataclass: every field is typed (``Literal`` for the choices) and checked on
    construction and assignment, so a bad value fails before any work, naming the field
    and what it accepts. Build one with :func:`resolve` (preset ← YAML ← flags).
    """

    # --- where ---------------------------------------------------------------------------
    model: str = ""
    """Base checkpoint: HF folder, big_vision ``.npz``, run folder, or a model name: Hugging
    Face Hub id (google/paligemma2-3b-pt-224) or Kaggle handle
    (kaggle:google/paligemma/jax/paligemma-3b-pt-224)."""
    revision: str | None = None
    """Revision of a Hub id --model (branch, tag or commit; default main) or version of a
    kaggle: handle."""
    data: str = ""
    """Data set folder (Roboflow 'paligemma' export, or any layout ``data.open_dataset`` detects)."""
    out: str = ""
    """Run folder to create: config, metrics, TensorBoard logs, checkpoints, best and last weights."""
    tokenizer: str | None = None
    """SentencePiece model for an ``.npz`` checkpoint (``model.load``'s ``tokenizer``)."""
    train_split: str = "train"
    """Split trained on."""
    valid_split: str = "valid"
    """Split evaluated on (all of it); missing → no evaluation, with a warning."""
    max_bad_records: NonNegative = DEFAULT_MAX_BAD_RECORDS
    """Records whose image cannot be decoded that are skipped (counted, named by file:line)
    before the run stops with an error."""
    allow_outside_images: bool = False
    """Use records whose image lies outside the data set's folder (../.., absolute paths,
    symlinks pointing out); by default they are refused as errors."""

    # --- what is trained -----------------------------------------------------------------
    recipe: str = "big-vision"
    """Name of the preset these values started from (informative once resolved)."""
    trainable: Literal["attention", "language-model", "all", "lora"] = "attention"
    """``attention``: q,k,v,o of every language-model layer; ``language-model``: the whole
    language model (vision tower and projector frozen); ``all``: everything; ``lora``: LoRA
    adapters only (through peft)."""
    lora_rank: AtLeastOne = 16
    """LoRA rank (``trainable: lora``)."""
    lora_alpha: Annotated[Float, Field(gt=0)] = 32.0
    """LoRA scaling numerator: updates are scaled by alpha / rank."""
    lora_dropout: Annotated[Float, Field(ge=0, lt=1)] = 0.0
    """Dropout on the LoRA branch (0 keeps steps deterministic)."""
    lora_targets: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """Language-model linear layers that get adapters (the vision tower never does)."""
    quantize: Literal["none", "4bit"] = "none"
    """``4bit``: frozen language-model linears in NF4 through bitsandbytes (QLoRA; CUDA only)."""

    # --- optimisation --------------------------------------------------------------------
    optimizer: Literal["sgd", "adamw"] = "sgd"
    """``sgd`` or ``adamw``."""
    lr: NonNegativeFloat = 0.01
    """Peak learning rate."""
    momentum: NonNegativeFloat = 0.0
    """SGD momentum (big_vision's recipe: none)."""
    weight_decay: NonNegativeFloat = 0.0
    """Decoupled weight decay (AdamW) or L2 (SGD)."""
    adam_betas: Annotated[list[Float], Field(min_length=2, max_length=2)] = field(
        default_factory=lambda: [0.9, 0.999]
    )
    """AdamW's (beta1, beta2)."""
    adam_eps: Annotated[Float, Field(gt=0)] = 1e-8
    """AdamW's epsilon."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warm-up: ``cosine`` or ``linear`` to 0, or ``constant``."""
    warmup: Annotated[Float, Field(ge=0, lt=1)] = 0.1
    """Fraction of the steps with a linear warm-up from 0 (big_vision: ``int(0.1 * steps)``)."""
    batch_size: AtLeastOne = 8
    """Global batch: examples per optimiser step, over all processes and accumulation steps."""
    grad_accum: AtLeastOne = 1
    """Micro-batches per optimiser step (each process); batch_size must divide evenly."""
    examples: AtLeastOne = 512
    """Training examples seen in total; steps = examples // batch_size (data repeats as needed)."""
    max_length: Annotated[int, Field(ge=4)] = 128
    """Text tokens per example (prefix + suffix, image tokens not counted); longer is cut."""
    loss: Literal["example", "token"] = "example"
    """``example``: mean NLL over each example's suffix tokens, then mean over the batch
    (big_vision); ``token``: mean over all suffix tokens of the batch."""
    location_sigma: NonNegativeFloat = 0.0
    """Train ``<loc>`` targets against a Gaussian of this width (in bins of 1024) around the
    true bin instead of one-hot, so near misses cost less than far ones; 0 (default) is the
    original loss. Helps a model that cannot localise yet; decoding is unchanged."""
    grad_clip: NonNegativeFloat = 0.0
    """Clip the global gradient norm to this value; 0 turns clipping off."""
    activation_checkpointing: bool = False
    """Recompute layer activations in the backward pass: less memory, about 30% slower."""
    loss_chunk_tokens: NonNegative = 0
    """Suffix tokens per lm_head chunk in the loss; 0 picks a size for ~512 MB of float32 logits."""

    # --- data augmentation ----------------------------------------------------------------
    shuffle_objects: bool = False
    """Randomly reorder the ``;``-separated objects of each suffix."""
    hflip: Probability = 0.0
    """Probability of a horizontal flip, boxes mirrored."""
    jitter: NonNegativeFloat = 0.0
    """Brightness/contrast jitter strength (0.1 = ±10%); 0 turns it off."""
    cache_image_features: bool = True
    """Compute image embeddings once per image and reuse them, when the vision tower and
    projector are frozen and no image augmentation is on (identical results, faster)."""

    # --- evaluation, checkpoints, logs ----------------------------------------------------
    eval_every: NonNegative = 0
    """Evaluate on the whole validation split every N steps; 0 means steps // 8 (at least 1)."""
    eval_batch_size: AtLeastOne = 8
    """Examples per batch during evaluation."""
    eval_max_new_tokens: AtLeastOne = 64
    """Longest greedy decode during evaluation (parse rate / mAP)."""
    eval_decode: bool = True
    """Decode the validation split (parse rate, mAP when available), not only its loss."""
    early_stop: NonNegative = 0
    """Stop after this many evaluations in a row without a new best (0: never); best/ is kept."""
    checkpoint_every: NonNegative = 0
    """Write a resumable checkpoint every N steps; 0 means at each evaluation."""
    keep_last: AtLeastOne = 2
    """Resumable checkpoints kept (older ones deleted; resuming needs one); best/ and last/ are kept apart."""
    export_npz: bool = False
    """Also write last/ as a big_vision ``.npz`` (``model.npz``)."""
    log_every: AtLeastOne = 1
    """Write a metrics.jsonl / TensorBoard point every N steps."""
    progress: bool = True
    """Show a progress bar on the main process."""

    # --- runtime --------------------------------------------------------------------------
    seed: int = 0
    """Seeds data order, augmentations and any randomness in the model."""
    precision: Literal["auto", "bf16", "float32"] = "auto"
    """``auto``: bf16 autocast with the frozen weights in bf16 on a GPU, float32 on a CPU;
    ``bf16`` (also on a CPU with native bf16 matmul: 0.45× float32's step time on a small
    model, but a 3B LoRA run needed over 24 GB) or ``float32`` to force."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """``auto``, ``cpu``, ``cuda`` (a launcher's LOCAL_RANK picks the GPU)."""
    distributed: Literal["ddp", "fsdp"] = "ddp"
    """With several processes: ``ddp`` (replicated) or ``fsdp`` (sharded; for ``all``)."""

    @model_validator(mode="after")
    def _fits_together(self) -> TrainConfig:
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")
        if self.steps < 1:
            raise ValueError(f"examples ({self.examples}) must be at least batch_size ({self.batch_size})")
        if self.quantize == "4bit" and self.trainable != "lora":
            raise ValueError(
                "quantize: 4bit needs trainable: lora (4-bit weights cannot be trained directly)"
            )
        return self

    # ----------------------------------------------------------------------------------------
    @property
    def steps(self) -> int:
        """Optimiser steps in the run."""
        return self.examples // self.batch_size

    @property
    def eval_interval(self) -> int:
        """Steps between evaluations (resolved ``eval_every``)."""
        return self.eval_every or max(1, self.steps // 8)

    @property
    def checkpoint_interval(self) -> int:
        """Steps between resumable checkpoints (resolved ``checkpoint_every``)."""
        return self.checkpoint_every or self.eval_interval

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (YAML-ready)."""
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """YAML text with every field, in declaration order."""
        return typed.to_yaml(self)

    def validate(self) -> TrainConfig:
        """Check the config again (e.g. after a list field was changed in place); return self.

        Raises :class:`ConfigError` naming the field and what it accepts.
        """
        build(self.to_dict())
        return self


# Each preset lists only what differs from TrainConfig's defaults (which ARE big-vision).
PRESETS: dict[str, dict[str, Any]] = {
    "big-vision": {},
    "lora": {
        "trainable": "lora",
        "optimizer": "adamw",
        "lr": 2e-4,
        "shuffle_objects": True,
    },
    "qlora": {
        "trainable": "lora",
        "quantize": "4bit",
        "optimizer": "adamw",
        "lr": 2e-4,
        "shuffle_objects": True,
        "activation_checkpointing": True,
    },
    "frozen-vision": {
        "trainable": "language-model",
        "optimizer": "adamw",
        "lr": 1e-5,
        "weight_decay": 0.0,
        "shuffle_objects": True,
        "grad_clip": 1.0,
    },
    "full": {
        "trainable": "all",
        "optimizer": "adamw",
        "lr": 1e-5,
        "shuffle_objects": True,
        "hflip": 0.5,
        "jitter": 0.1,
        "grad_clip": 1.0,
        "activation_checkpointing": True,
    },
}

_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}

# Where a value came from, for error messages: (file, line) for YAML keys.
_Sources = dict[str, tuple[Path, int | None]]


def build(
    values: dict[str, Any], *, file: str | Path | None = None, lines: _Sources | None = None
) -> TrainConfig:
    """``TrainConfig(**values)``, a mistake raised as one :class:`ConfigError` line.

    The message names the field, what it accepts and what it got; for a value read from a
    YAML file (``lines``: field → (file, line)) it starts with ``file:line``; ``file`` names
    the recipe file for mistakes that involve several fields (:func:`paligemma_xray.settings.build`).
    """
    return typed.build(TrainConfig, values, file=file, lines=lines)


def preset(name: str) -> TrainConfig:
    """The named preset as a config (``ConfigError`` naming the choices if unknown)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown recipe {name!r}; choose one of {', '.join(PRESETS)}")
    return build({"recipe": name, **PRESETS[name]})


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a recipe YAML file into a dict of field overrides (see :func:`read_yaml`)."""
    return read_yaml(path)[0]


def resolve(
    recipe: str | None = None,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> TrainConfig:
    """Preset (``recipe``, else the file's ``recipe:``, else big-vision) ← file ← overrides.

    ``overrides`` with value ``None`` are ignored (flags the user did not give).
    """
    from_file, lines = read_yaml(config_file) if config_file is not None else ({}, {})
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    name = given.pop("recipe", None) or recipe or from_file.get("recipe") or "big-vision"
    base = preset(name).to_dict()
    values = {k: v for k, v in from_file.items() if k != "recipe"}
    for key in given:  # a flag overrides the file: its mistakes are the flag's
        lines.pop(key, None)
    values.update(given)
    return build({**base, **values, "recipe": name}, file=config_file, lines=lines)


def from_run(run_dir: str | Path) -> TrainConfig:
    """The resolved config saved in a run folder (for ``--resume``), with ``out`` = ``run_dir``.

    The folder given is the run: a copied or moved run folder continues where it is, never
    in the folder its ``config.yaml`` was first written for.
    """
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError("not a run folder (no config.yaml)", path=run_dir)
    values, lines = read_yaml(path)
    return build({**values, "out": str(run_dir)}, file=path, lines=lines)


def for_command(
    recipe: str | None,
    config_file: str | Path | None,
    flags: dict[str, Any],
    *,
    resume: str | Path | None = None,
) -> TrainConfig:
    """The config the ``train`` verb runs: ``resume`` alone, or preset ← file ← flags.

    ``flags`` holds every recipe field the user gave (``model``/``data``/``out`` included;
    ``None`` = not given). ``model``, ``data`` and ``out`` may come from the file.
    """
    given = {k: v for k, v in flags.items() if v is not None}
    if resume is not None:
        if given or recipe or config_file:
            raise ConfigError("--resume RUN continues RUN with its saved config.yaml; give no other flags")
        return from_run(resume)
    config = resolve(recipe, config_file, given)
    missing = [f"--{name}" for name in ("model", "data", "out") if not getattr(config, name)]
    if missing:
        where = f" (or in {config_file})" if config_file else ""
        raise ConfigError(f"train needs {', '.join(missing)}{where}, or --resume RUN")
    return config


# ---------------------------------------------------------------------------------------------
# command-line flags, one per field, documented by the field's own docstring

# Given on the command line as verb arguments of their own, not as recipe fields.
_NOT_FLAGS = {"model", "data", "out", "recipe"}


def field_docs() -> dict[str, str]:
    """Each field's docstring (pydantic reads it into the field's description), by name."""
    return typed.field_docs(TrainConfig)


def add_flags(parser: Any) -> None:
    """Add ``--<field>`` (underscores as dashes) for every field to an argparse parser.

    Every flag defaults to ``None`` = "not given", so that only what the user typed overrides
    the preset and the YAML file. Booleans get ``--x`` / ``--no-x``; choices come from the
    field's ``Literal`` type, help from its docstring (:func:`paligemma_xray.settings.add_flags`).
    """
    typed.add_flags(
        parser,
        TrainConfig,
        exclude=_NOT_FLAGS,
        title="recipe fields (override the preset and --config)",
        default_label="big-vision",
        negatable=True,
    )


def overrides(args: Any) -> dict[str, Any]:
    """The recipe fields an argparse namespace sets (``None`` = not given, dropped)."""
    return typed.given(args, TrainConfig, exclude=_NOT_FLAGS)
