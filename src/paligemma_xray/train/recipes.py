"""Training recipes: one :class:`TrainConfig` dataclass and named presets.

Resolution order (later wins): the preset named by ``recipe`` → a YAML file → command-line
flags. The resolved config is what the run folder's ``config.yaml`` records, so a user who
runs ``train`` with no flags reads ``recipe: big-vision`` there and every value it implies.

The default preset, ``big-vision``, is DESIGN.md's "Default recipe": the language model's
attention weights only, plain SGD at 0.01, cosine to 0 with 10% linear warm-up, batch 8,
512 examples (64 steps), text length 128, per-example mean loss, augmentations off.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from paligemma_xray.errors import ConfigError

TRAINABLE_CHOICES = ("attention", "language-model", "all", "lora")
OPTIMIZER_CHOICES = ("sgd", "adamw")
SCHEDULE_CHOICES = ("cosine", "linear", "constant")
LOSS_CHOICES = ("example", "token")
PRECISION_CHOICES = ("auto", "bf16", "float32")
QUANTIZE_CHOICES = ("none", "4bit")
DISTRIBUTED_CHOICES = ("ddp", "fsdp")


@dataclass
class TrainConfig:
    """Everything one training run depends on; saved as ``config.yaml`` in the run folder."""

    # --- where ---------------------------------------------------------------------------
    model: str = ""
    """Base checkpoint: an HF folder or a big_vision ``.npz`` (read by ``model.load``)."""
    revision: str | None = None
    """Revision of a Hub id --model (branch, tag or commit; default main) or version of a
    kaggle: handle."""
    data: str = ""
    """Data set folder (any layout ``data.open_dataset`` detects)."""
    out: str = ""
    """Run folder: config, metrics, TensorBoard logs, checkpoints, best and last weights."""
    tokenizer: str | None = None
    """SentencePiece model for an ``.npz`` checkpoint (``model.load``'s ``tokenizer``)."""
    train_split: str = "train"
    """Split trained on."""
    valid_split: str = "valid"
    """Split evaluated on (all of it); missing → no evaluation, with a warning."""

    # --- what is trained -----------------------------------------------------------------
    recipe: str = "big-vision"
    """Name of the preset these values started from (informative once resolved)."""
    trainable: str = "attention"
    """``attention``: q,k,v,o of every language-model layer; ``language-model``: the whole
    language model (vision tower and projector frozen); ``all``: everything; ``lora``: LoRA
    adapters only (through peft)."""
    lora_rank: int = 16
    """LoRA rank (``trainable: lora``)."""
    lora_alpha: float = 32.0
    """LoRA scaling numerator: updates are scaled by alpha / rank."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch (0 keeps steps deterministic)."""
    lora_targets: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """Language-model linear layers that get adapters (the vision tower never does)."""
    quantize: str = "none"
    """``4bit``: frozen language-model linears in NF4 through bitsandbytes (QLoRA; CUDA only)."""

    # --- optimisation --------------------------------------------------------------------
    optimizer: str = "sgd"
    """``sgd`` or ``adamw``."""
    lr: float = 0.01
    """Peak learning rate."""
    momentum: float = 0.0
    """SGD momentum (big_vision's recipe: none)."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW) or L2 (SGD)."""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW's (beta1, beta2)."""
    adam_eps: float = 1e-8
    """AdamW's epsilon."""
    schedule: str = "cosine"
    """Decay after warm-up: ``cosine`` or ``linear`` to 0, or ``constant``."""
    warmup: float = 0.1
    """Fraction of the steps with a linear warm-up from 0 (big_vision: ``int(0.1 * steps)``)."""
    batch_size: int = 8
    """Global batch: examples per optimiser step, over all processes and accumulation steps."""
    grad_accum: int = 1
    """Micro-batches per optimiser step (each process); batch_size must divide evenly."""
    examples: int = 512
    """Training examples seen in total; steps = examples // batch_size (data repeats as needed)."""
    max_length: int = 128
    """Text tokens per example (prefix + suffix, image tokens not counted); longer is cut."""
    loss: str = "example"
    """``example``: mean NLL over each example's suffix tokens, then mean over the batch
    (big_vision); ``token``: mean over all suffix tokens of the batch."""
    location_sigma: float = 0.0
    """Train ``<loc>`` targets against a Gaussian of this width (in bins of 1024) around the
    true bin instead of one-hot, so near misses cost less than far ones; 0 (default) is the
    original loss. Helps a model that cannot localise yet; decoding is unchanged."""
    grad_clip: float = 0.0
    """Clip the global gradient norm to this value; 0 turns clipping off."""
    activation_checkpointing: bool = False
    """Recompute layer activations in the backward pass: less memory, about 30% slower."""
    loss_chunk_tokens: int = 0
    """Suffix tokens per lm_head chunk in the loss; 0 picks a size for ~512 MB of float32 logits."""

    # --- data augmentation ----------------------------------------------------------------
    shuffle_objects: bool = False
    """Randomly reorder the ``;``-separated objects of each suffix."""
    hflip: float = 0.0
    """Probability of a horizontal flip, boxes mirrored."""
    jitter: float = 0.0
    """Brightness/contrast jitter strength (0.1 = ±10%); 0 turns it off."""
    cache_image_features: bool = True
    """Compute image embeddings once per image and reuse them, when the vision tower and
    projector are frozen and no image augmentation is on (identical results, faster)."""

    # --- evaluation, checkpoints, logs ----------------------------------------------------
    eval_every: int = 0
    """Evaluate on the whole validation split every N steps; 0 means steps // 8 (at least 1)."""
    eval_batch_size: int = 8
    """Examples per batch during evaluation."""
    eval_max_new_tokens: int = 64
    """Longest greedy decode during evaluation (parse rate / mAP)."""
    eval_decode: bool = True
    """Decode the validation split (parse rate, mAP when available), not only its loss."""
    checkpoint_every: int = 0
    """Write a resumable checkpoint every N steps; 0 means at each evaluation."""
    keep_last: int = 2
    """Resumable checkpoints kept (older ones deleted); best/ and last/ are kept apart."""
    export_npz: bool = False
    """Also write last/ as a big_vision ``.npz`` (``model.npz``)."""
    log_every: int = 1
    """Write a metrics.jsonl / TensorBoard point every N steps."""
    progress: bool = True
    """Show a progress bar on the main process."""

    # --- runtime --------------------------------------------------------------------------
    seed: int = 0
    """Seeds data order, augmentations and any randomness in the model."""
    precision: str = "auto"
    """``auto``: bf16 autocast on GPU, float32 on CPU; ``bf16`` or ``float32`` to force."""
    device: str = "auto"
    """``auto``, ``cpu``, ``cuda`` (a launcher's LOCAL_RANK picks the GPU)."""
    distributed: str = "ddp"
    """With several processes: ``ddp`` (replicated) or ``fsdp`` (sharded; for ``all``)."""

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
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def validate(self) -> TrainConfig:
        """Raise :class:`ConfigError` on values that cannot work; return self."""
        _choice("trainable", self.trainable, TRAINABLE_CHOICES)
        _choice("optimizer", self.optimizer, OPTIMIZER_CHOICES)
        _choice("schedule", self.schedule, SCHEDULE_CHOICES)
        _choice("loss", self.loss, LOSS_CHOICES)
        _choice("precision", self.precision, PRECISION_CHOICES)
        _choice("quantize", self.quantize, QUANTIZE_CHOICES)
        _choice("distributed", self.distributed, DISTRIBUTED_CHOICES)
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ConfigError("batch_size and grad_accum must be at least 1")
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}"
            )
        if self.steps < 1:
            raise ConfigError(f"examples ({self.examples}) must be at least batch_size ({self.batch_size})")
        if self.lr < 0 or not 0 <= self.warmup < 1:
            raise ConfigError("lr must be ≥ 0 and warmup a fraction in [0, 1)")
        if self.max_length < 4:
            raise ConfigError(f"max_length {self.max_length} is too short for a prompt and a target")
        if not 0 <= self.hflip <= 1 or self.jitter < 0:
            raise ConfigError("hflip is a probability in [0, 1] and jitter must be ≥ 0")
        if self.quantize == "4bit" and self.trainable != "lora":
            raise ConfigError(
                "quantize: 4bit needs trainable: lora (4-bit weights cannot be trained directly)"
            )
        if len(self.adam_betas) != 2:
            raise ConfigError("adam_betas takes two numbers")
        if self.keep_last < 1:
            raise ConfigError("keep_last must be at least 1 (resuming needs a checkpoint)")
        for name in ("log_every", "eval_batch_size", "eval_max_new_tokens", "lora_rank"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("eval_every", "checkpoint_every", "loss_chunk_tokens", "grad_clip", "momentum",
                     "weight_decay", "location_sigma"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be ≥ 0, got {getattr(self, name)}")
        if not 0 <= self.lora_dropout < 1 or self.lora_alpha <= 0 or self.adam_eps <= 0:
            raise ConfigError("lora_dropout is a probability in [0, 1); lora_alpha and adam_eps must be > 0")
        return self


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}: {value!r} is not one of {', '.join(choices)}")


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


def preset(name: str) -> TrainConfig:
    """The named preset as a config (``ConfigError`` naming the choices if unknown)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown recipe {name!r}; choose one of {', '.join(PRESETS)}")
    return dataclasses.replace(TrainConfig(), recipe=name, **PRESETS[name])


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a recipe YAML file into a dict of field overrides."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError("config file not found", path=path) from None
    except yaml.YAMLError as error:
        raise ConfigError(f"not valid YAML: {error}", path=path) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("a recipe file holds a mapping of field: value", path=path)
    return data


def resolve(
    recipe: str | None = None,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> TrainConfig:
    """Preset (``recipe``, else the file's ``recipe:``, else big-vision) ← file ← overrides.

    ``overrides`` with value ``None`` are ignored (flags the user did not give).
    """
    from_file = load_yaml(config_file) if config_file is not None else {}
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    name = given.pop("recipe", None) or recipe or from_file.get("recipe") or "big-vision"
    config = preset(name)
    values = {k: v for k, v in from_file.items() if k != "recipe"}
    values.update(given)
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        where = f" in {config_file}" if config_file else ""
        raise ConfigError(f"unknown config field(s){where}: {', '.join(unknown)}")
    for key, value in values.items():
        setattr(config, key, _coerce(key, value))
    return config.validate()


def _coerce(key: str, value: Any) -> Any:
    """Check a YAML/flag value against the field's default type (ints accepted for floats)."""
    default = getattr(TrainConfig(), key)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if isinstance(default, float) and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, int) and isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(default, list) and isinstance(value, list | tuple):
        return list(value)
    if (isinstance(default, str) or default is None) and (value is None or isinstance(value, str)):
        return value
    raise ConfigError(f"{key}: expected {type(default).__name__}, got {value!r}")


def from_run(run_dir: str | Path) -> TrainConfig:
    """The resolved config saved in a run folder (for ``--resume``)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError("not a run folder (no config.yaml)", path=run_dir)
    values = load_yaml(path)
    config = TrainConfig()
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"unknown config field(s): {', '.join(unknown)}", path=path)
    for key, value in values.items():
        setattr(config, key, _coerce(key, value))
    return config.validate()


# ---------------------------------------------------------------------------------------------
# command-line flags, one per field, documented by the field's own docstring

# Given on the command line as verb arguments of their own, not as recipe fields.
_NOT_FLAGS = {"model", "data", "out", "recipe"}
_CHOICES = {
    "trainable": TRAINABLE_CHOICES,
    "optimizer": OPTIMIZER_CHOICES,
    "schedule": SCHEDULE_CHOICES,
    "loss": LOSS_CHOICES,
    "precision": PRECISION_CHOICES,
    "quantize": QUANTIZE_CHOICES,
    "distributed": DISTRIBUTED_CHOICES,
}


def field_docs() -> dict[str, str]:
    """Each field's docstring (the string literal under its declaration), by name."""
    import ast
    import inspect
    import itertools
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(TrainConfig)))
    body = tree.body[0].body
    docs = {}
    for node, following in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def add_flags(parser) -> None:
    """Add ``--<field>`` (underscores as dashes) for every field to an argparse parser.

    Every flag defaults to ``None`` = "not given", so that only what the user typed overrides
    the preset and the YAML file. Booleans get ``--x`` / ``--no-x``.
    """
    import argparse

    docs = field_docs()
    group = parser.add_argument_group("recipe fields (override the preset and --config)")
    for name in _FIELDS:
        if name in _NOT_FLAGS:
            continue
        default = getattr(TrainConfig(), name)
        flag = "--" + name.replace("_", "-")
        text = f"{docs.get(name, '')} [big-vision: {default}]".replace("%", "%%")
        if isinstance(default, bool):
            group.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=text
            )
        elif isinstance(default, list):
            kind = type(default[0]) if default else str
            group.add_argument(flag, dest=name, nargs="+", type=kind, default=None, help=text)
        else:
            kind = type(default) if default is not None else str
            choices = _CHOICES.get(name)
            group.add_argument(
                flag,
                dest=name,
                type=kind,
                default=None,
                choices=choices,
                metavar="{" + ",".join(choices) + "}" if choices else name.upper(),
                help=text,
            )


def overrides(args) -> dict[str, Any]:
    """The recipe fields an argparse namespace sets (``None`` = not given, dropped)."""
    values = {name: getattr(args, name, None) for name in _FIELDS if name not in _NOT_FLAGS}
    return {k: v for k, v in values.items() if v is not None}
