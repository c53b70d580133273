"""The BLIP LoRA trainer's shared types: its settings and what a run returns.

They sit below every module that uses them (``pipelines.training.blip_lora_files``,
``pipelines.training.train_blip_lora``), so none of those imports the driver to learn a type.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from pipelines import settings
from pipelines.blip.adapter_files import text_decoder_targets
from pipelines.training.common import check_device
from pipelines.validation import as_float, as_int


@dataclass(frozen=True)
class BlipLoraTrainingConfig:
    """One training run. Every value has the default the CLI shows; ``validated()`` checks them all."""

    dataset: str | Path  # an imagefolder with metadata.jsonl
    output_dir: str | Path  # receives the adapter, training_args.json, README.md and checkpoints
    model: str = "blip-caption"  # the catalog's BLIP, another Hub id, or a local folder
    tiny: bool = False  # train the tiny offline BLIP instead of ``model``
    tiny_dir: str | Path | None = None  # where tiny models are built (default: pipelines.tiny's cache)
    rank: int = settings.BLIP_TRAIN_DEFAULT_RANK
    lora_alpha: float | None = None  # None: alpha = rank (LoRA scale 1)
    lora_dropout: float = 0.05
    targets: tuple[str, ...] = settings.BLIP_TRAIN_TARGET_PROJECTIONS  # query, key, value, dense
    attention: tuple[str, ...] = settings.BLIP_TRAIN_ATTENTION_KINDS  # self, cross
    learning_rate: float = settings.BLIP_TRAIN_DEFAULT_LEARNING_RATE
    epochs: int = settings.BLIP_TRAIN_DEFAULT_EPOCHS
    max_steps: int | None = None  # optimiser updates in all; set, it replaces epochs
    batch_size: int = settings.BLIP_TRAIN_DEFAULT_BATCH_SIZE  # captions per micro-batch per process
    gradient_accumulation: int = 1
    schedule: str = "cosine"  # cosine | constant, both after the warmup
    warmup_steps: int = settings.BLIP_TRAIN_DEFAULT_WARMUP_STEPS
    max_grad_norm: float = settings.BLIP_TRAIN_MAX_GRAD_NORM
    weight_decay: float = settings.BLIP_TRAIN_WEIGHT_DECAY
    mixed_precision: str = "auto"  # auto | no | bf16 | fp16 (GPU only)
    seed: int = 0
    validation_split: float = settings.BLIP_TRAIN_DEFAULT_VALIDATION_SPLIT
    validation_every: int = settings.BLIP_TRAIN_DEFAULT_VALIDATION_EVERY  # steps; and always at the end
    sample_captions: int = settings.BLIP_TRAIN_SAMPLE_CAPTIONS  # images captioned base vs adapter at validation
    checkpoint_every: int = settings.BLIP_TRAIN_DEFAULT_CHECKPOINT_EVERY  # 0: no checkpoints
    resume: str | None = None  # "latest" (the newest checkpoint in output_dir, if any) or a checkpoint folder
    log_every: int = settings.BLIP_TRAIN_DEFAULT_LOG_EVERY
    device: str = "auto"  # auto | cpu | cuda (under accelerate launch, each process takes its own GPU)

    def validated(self) -> BlipLoraTrainingConfig:
        """A copy with every value checked and normalised; ValueError names the first bad one and the fix."""
        targets = tuple(item.strip() for item in self.targets if item.strip())
        attention = tuple(item.strip() for item in self.attention if item.strip())
        text_decoder_targets(targets, attention)  # raises a sentence for unknown names
        if self.schedule not in settings.BLIP_TRAIN_SCHEDULES:
            raise ValueError(
                f"schedule {self.schedule!r} unknown; choose one of: {', '.join(settings.BLIP_TRAIN_SCHEDULES)}."
            )
        check_device(self.device, self.mixed_precision, settings.BLIP_TRAIN_MIXED_PRECISION)
        if not str(self.model).strip():
            raise ValueError("model is empty; give blip-caption, a Hub id or a local BLIP folder.")
        if self.resume is not None and not str(self.resume).strip():
            raise ValueError("resume is empty; give 'latest' or a checkpoint folder, or leave it out.")
        max_steps = (
            None if self.max_steps is None else as_int("max_steps", self.max_steps, 1, settings.BLIP_TRAIN_MAX_STEPS)
        )
        rank = as_int("rank", self.rank, 1, settings.BLIP_TRAIN_MAX_RANK)
        alpha = None if self.lora_alpha is None else as_float("lora_alpha", self.lora_alpha, 0, 4096, low_open=True)
        return dataclasses.replace(
            self,
            dataset=Path(self.dataset).expanduser(),
            output_dir=Path(self.output_dir).expanduser(),
            model=str(self.model).strip(),
            tiny_dir=None if self.tiny_dir is None else Path(self.tiny_dir).expanduser(),
            rank=rank,
            lora_alpha=alpha,
            lora_dropout=as_float("lora_dropout", self.lora_dropout, 0.0, 0.9),
            targets=targets,
            attention=attention,
            learning_rate=as_float(
                "learning_rate", self.learning_rate, 0, settings.BLIP_TRAIN_MAX_LEARNING_RATE, low_open=True
            ),
            epochs=as_int("epochs", self.epochs, 1, settings.BLIP_TRAIN_MAX_EPOCHS),
            max_steps=max_steps,
            batch_size=as_int("batch_size", self.batch_size, 1, settings.BLIP_TRAIN_MAX_BATCH_SIZE),
            gradient_accumulation=as_int(
                "gradient_accumulation", self.gradient_accumulation, 1, settings.BLIP_TRAIN_MAX_GRADIENT_ACCUMULATION
            ),
            warmup_steps=as_int("warmup_steps", self.warmup_steps, 0, settings.BLIP_TRAIN_MAX_STEPS),
            max_grad_norm=as_float("max_grad_norm", self.max_grad_norm, 0, 1e6, low_open=True),
            weight_decay=as_float("weight_decay", self.weight_decay, 0.0, 1.0),
            seed=as_int("seed", self.seed, 0, settings.MAX_SEED),
            validation_split=as_float("validation_split", self.validation_split, 0.0, 0.5),
            validation_every=as_int("validation_every", self.validation_every, 1, settings.BLIP_TRAIN_MAX_STEPS),
            sample_captions=as_int("sample_captions", self.sample_captions, 0, 32),
            checkpoint_every=as_int("checkpoint_every", self.checkpoint_every, 0, settings.BLIP_TRAIN_MAX_STEPS),
            log_every=as_int("log_every", self.log_every, 1, settings.BLIP_TRAIN_MAX_STEPS),
        )

    @property
    def alpha(self) -> float:
        return self.lora_alpha if self.lora_alpha is not None else float(self.rank)

    @property
    def target_modules(self) -> str:
        """The peft ``target_modules`` regex these targets and attention kinds make."""
        return text_decoder_targets(self.targets, self.attention)


@dataclass
class TrainingResult:
    """What a run did. ``losses[i]`` is the training loss of step ``start_step + i + 1``."""

    output_dir: Path  # the adapter folder
    start_step: int  # 0, or the checkpoint's step when resumed
    steps: int  # the global step reached
    total_steps: int
    losses: list[float] = field(default_factory=list)  # per optimiser step, averaged over micro-batches and processes
    learning_rates: list[float] = field(default_factory=list)  # after each step, the rate the next uses
    validation_losses: dict[int, float] = field(default_factory=dict)  # step -> loss on the fixed validation set
    samples: list[dict] = field(default_factory=list)  # the last validation's captions: file, base, adapter
    checkpoints: list[Path] = field(default_factory=list)
    train_images: int = 0
    validation_images: int = 0  # 0: the fixed set is the first training images
    unknown_token_rate: float = 0.0
    seconds: float = 0.0
