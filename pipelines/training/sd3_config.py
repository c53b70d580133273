"""The SD3.5 LoRA trainer's shared types: its settings, what a run returns, where the model comes from.

They sit below every module that uses them (``pipelines.training.flow_matching``,
``pipelines.training.sd3_lora_files``, ``pipelines.training.train_sd3_lora``), so none of those
imports the driver to learn a type.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from pipelines import settings
from pipelines.catalog import SD3_SHORT_NAMES, ModelSpec
from pipelines.training.common import check_device
from pipelines.validation import as_float, as_int

SHORT_NAMES = SD3_SHORT_NAMES  # the one map, in the catalog


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class SD3LoraTrainingConfig:
    """One training run. Every value has the default the CLI shows; ``validated()`` checks them all."""

    dataset: str | Path  # an imagefolder with metadata.jsonl
    output_dir: str | Path  # receives the LoRA, checkpoints and validation images
    model: str = settings.SD3_TRAIN_DEFAULT_MODEL  # catalog key, short name (large, medium), Hub id or local folder
    tiny: str | None = None  # large | large-turbo | medium: train the tiny offline stand-in instead of ``model``
    tiny_dir: str | Path | None = None  # where tiny models are built (default: pipelines.tiny's cache)
    resolution: int = settings.SD3_TRAIN_DEFAULT_RESOLUTION  # buckets of about resolution**2 pixels
    center_crop: bool = False  # one square bucket (centre crop) instead of aspect buckets
    random_flip: bool = False  # off by default: flips mirror text and faces
    rank: int = settings.SD3_TRAIN_DEFAULT_RANK
    lora_alpha: float | None = None  # None: alpha = rank (LoRA scale 1)
    lora_layers: tuple[str, ...] = settings.SD3_TRAIN_DEFAULT_LORA_LAYERS  # groups (attn, context, ff) or module names
    learning_rate: float = settings.SD3_TRAIN_DEFAULT_LEARNING_RATE
    steps: int = settings.SD3_TRAIN_DEFAULT_STEPS  # optimiser updates in all (a resumed run counts from its checkpoint)
    warmup_steps: int = settings.SD3_TRAIN_DEFAULT_WARMUP_STEPS
    lr_scheduler: str = settings.SD3_TRAIN_DEFAULT_LR_SCHEDULER  # diffusers' get_scheduler name, after the warmup
    batch_size: int = settings.SD3_TRAIN_DEFAULT_BATCH_SIZE  # per process and micro-batch
    gradient_accumulation: int = 1
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower
    mixed_precision: str = "auto"  # auto | no | bf16 | fp16
    use_8bit_adam: bool = False  # bitsandbytes AdamW8bit; CUDA only
    max_grad_norm: float = settings.SD3_TRAIN_MAX_GRAD_NORM
    weighting_scheme: str = settings.SD3_TRAIN_DEFAULT_WEIGHTING
    logit_mean: float = settings.SD3_TRAIN_LOGIT_MEAN
    logit_std: float = settings.SD3_TRAIN_LOGIT_STD
    mode_scale: float = settings.SD3_TRAIN_MODE_SCALE
    max_sequence_length: int = settings.SD3_TRAIN_T5_TOKENS  # T5 tokens per caption
    trigger: str = ""  # DreamBooth instance prompt / trigger words, put before every caption
    validation_prompt: str = ""  # drawn every ``validation_every`` steps and at the end; empty = none
    validation_every: int = settings.SD3_TRAIN_DEFAULT_VALIDATION_EVERY
    validation_steps: int | None = None  # None: the model's preset
    validation_guidance: float | None = None  # None: the model's preset
    validation_split: float = 0.0  # fraction of images held out; their fixed-noise loss is logged at validation
    checkpoint_every: int = settings.SD3_TRAIN_DEFAULT_CHECKPOINT_EVERY  # 0: no checkpoints
    resume: str | None = None  # "latest" (the newest checkpoint in output_dir, if any) or a checkpoint folder
    log_every: int = settings.SD3_TRAIN_DEFAULT_LOG_EVERY
    seed: int = 0
    cache_dir: str | Path | None = None  # keep precomputed embeddings and latents here between runs
    device: str = "auto"  # auto | cpu | cuda (under accelerate launch, each process takes its own GPU)

    def validated(self) -> SD3LoraTrainingConfig:
        """A copy with every value checked and normalised; ValueError names the first bad one and the fix."""
        steps = as_int("steps", self.steps, 1, settings.SD3_TRAIN_MAX_STEPS)
        resolution = as_int(
            "resolution", self.resolution, settings.SD3_TRAIN_MIN_RESOLUTION, settings.SD3_TRAIN_MAX_RESOLUTION
        )
        if resolution % 16:
            raise ValueError(f"resolution {resolution} is not a multiple of 16; use {resolution - resolution % 16}.")
        if self.tiny is not None and self.tiny not in SHORT_NAMES:
            raise ValueError(f"--tiny {self.tiny!r} is not a tiny model; choose one of: {', '.join(SHORT_NAMES)}.")
        if not str(self.model).strip():
            raise ValueError("model is empty; give a catalog key (sd35-large), a Hub id or a local folder.")
        layers = tuple(item.strip() for item in self.lora_layers if item.strip())
        known = {name for group in settings.SD3_TRAIN_LORA_LAYER_GROUPS.values() for name in group}
        unknown = [item for item in layers if item not in settings.SD3_TRAIN_LORA_LAYER_GROUPS and item not in known]
        if unknown or not layers:
            raise ValueError(
                f"lora layers {', '.join(unknown) or '(none)'} unknown; use groups "
                f"{', '.join(settings.SD3_TRAIN_LORA_LAYER_GROUPS)} or module names such as to_q, add_k_proj."
            )
        rank = as_int("rank", self.rank, 1, settings.SD3_TRAIN_MAX_RANK)
        alpha = None if self.lora_alpha is None else as_float("lora_alpha", self.lora_alpha, 0, 4096, low_open=True)
        cuda = check_device(self.device, self.mixed_precision, settings.SD3_TRAIN_MIXED_PRECISION)
        if self.use_8bit_adam and not cuda:
            raise ValueError(
                "8-bit Adam (bitsandbytes) needs a CUDA GPU; drop --use-8bit-adam to train with AdamW on this machine."
            )
        if self.weighting_scheme not in settings.SD3_TRAIN_WEIGHTING_SCHEMES:
            raise ValueError(
                f"weighting scheme {self.weighting_scheme!r} unknown; choose one of: "
                f"{', '.join(settings.SD3_TRAIN_WEIGHTING_SCHEMES)}."
            )
        if self.lr_scheduler not in settings.SD3_TRAIN_LR_SCHEDULERS:
            raise ValueError(
                f"lr scheduler {self.lr_scheduler!r} unknown; choose one of: {', '.join(settings.SD3_TRAIN_LR_SCHEDULERS)}."
            )
        if self.resume is not None and not str(self.resume).strip():
            raise ValueError("resume is empty; give 'latest' or a checkpoint folder, or leave it out.")
        for name in ("trigger", "validation_prompt"):
            if len(getattr(self, name)) > settings.SD3_TRAIN_MAX_PROMPT_CHARS:
                raise ValueError(f"{name} is longer than {settings.SD3_TRAIN_MAX_PROMPT_CHARS} characters; shorten it.")
        return dataclasses.replace(
            self,
            dataset=Path(self.dataset).expanduser(),
            output_dir=Path(self.output_dir).expanduser(),
            model=str(self.model).strip(),
            tiny_dir=None if self.tiny_dir is None else Path(self.tiny_dir).expanduser(),
            resolution=resolution,
            rank=rank,
            lora_alpha=alpha,
            lora_layers=layers,
            learning_rate=as_float(
                "learning_rate", self.learning_rate, 0, settings.SD3_TRAIN_MAX_LEARNING_RATE, low_open=True
            ),
            steps=steps,
            warmup_steps=as_int("warmup_steps", self.warmup_steps, 0, settings.SD3_TRAIN_MAX_STEPS),
            batch_size=as_int("batch_size", self.batch_size, 1, settings.SD3_TRAIN_MAX_BATCH_SIZE),
            gradient_accumulation=as_int(
                "gradient_accumulation", self.gradient_accumulation, 1, settings.SD3_TRAIN_MAX_GRADIENT_ACCUMULATION
            ),
            max_grad_norm=as_float("max_grad_norm", self.max_grad_norm, 0, 1e6, low_open=True),
            logit_std=as_float("logit_std", self.logit_std, 0, 10, low_open=True),
            logit_mean=as_float("logit_mean", self.logit_mean, -10, 10),
            mode_scale=as_float("mode_scale", self.mode_scale, 0, 10),
            max_sequence_length=as_int(
                "max_sequence_length", self.max_sequence_length, settings.MIN_T5_TOKENS, settings.MAX_T5_TOKENS
            ),
            trigger=" ".join(self.trigger.split()),
            validation_prompt=" ".join(self.validation_prompt.split()),
            validation_every=as_int("validation_every", self.validation_every, 1, settings.SD3_TRAIN_MAX_STEPS),
            validation_steps=None
            if self.validation_steps is None
            else as_int("validation_steps", self.validation_steps, 1, settings.MAX_STEPS),
            validation_guidance=None
            if self.validation_guidance is None
            else as_float("validation_guidance", self.validation_guidance, 0, settings.MAX_GUIDANCE),
            validation_split=as_float("validation_split", self.validation_split, 0, 0.5),
            checkpoint_every=as_int("checkpoint_every", self.checkpoint_every, 0, settings.SD3_TRAIN_MAX_STEPS),
            log_every=as_int("log_every", self.log_every, 1, settings.SD3_TRAIN_MAX_STEPS),
            seed=as_int("seed", self.seed, 0, settings.MAX_SEED),
            cache_dir=None if self.cache_dir is None else Path(self.cache_dir).expanduser(),
        )

    @property
    def target_modules(self) -> list[str]:
        """The module names LoRA wraps: the groups in ``lora_layers`` expanded, in a stable order."""
        names: list[str] = []
        for item in self.lora_layers:
            for name in settings.SD3_TRAIN_LORA_LAYER_GROUPS.get(item, (item,)):
                if name not in names:
                    names.append(name)
        return names


@dataclass
class TrainingResult:
    """What a run did. ``losses[i]`` is the training loss of step ``start_step + i + 1``."""

    output_dir: Path
    lora_path: Path  # the final .safetensors
    start_step: int  # 0, or the checkpoint's step when resumed
    steps: int  # the global step reached
    losses: list[float] = field(default_factory=list)  # per optimiser step, averaged over micro-batches and processes
    learning_rates: list[float] = field(default_factory=list)  # the rate each step ran at
    held_out_losses: dict[int, float] = field(default_factory=dict)  # step -> fixed-noise loss on held-out images
    validation_images: list[Path] = field(default_factory=list)
    checkpoints: list[Path] = field(default_factory=list)
    train_images: int = 0
    held_out_images: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class ModelSource:
    source: str  # what from_pretrained gets: a local folder or a Hub id
    spec: ModelSpec  # for sentences and presets
    tiny: bool
