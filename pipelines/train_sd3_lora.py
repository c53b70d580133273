"""Train a DreamBooth-style LoRA for Stable Diffusion 3.5 on a captioned imagefolder.

    python -m pipelines.train_sd3_lora DATASET OUT [--model sd35-large|large|medium|DIR|REPO] [--trigger sks]
    python -m pipelines.train_sd3_lora DATASET OUT --tiny medium --resolution 128 --steps 20   # offline, seconds
    accelerate launch --multi_gpu --num_processes 4 -m pipelines.train_sd3_lora DATASET OUT   # several GPUs

DATASET is what the Batch tab and ``pipelines.caption_folder`` write: images and
a ``metadata.jsonl`` of ``{"file_name", "text"}`` lines. It is checked first, so
a bad file fails in one sentence before any model is loaded. OUT receives
``pytorch_lora_weights.safetensors`` (diffusers format, ``transformer.``-prefixed
keys: the Studio's LoRA panel and ``pipeline.load_lora_weights`` read it as is),
``training_args.json``, a ``README.md`` model card, ``validation/step-N.png`` and
resumable ``checkpoint-N/`` folders (``--resume latest`` continues the step count).

Choices, documented once:

- **Loss**: rectified flow as in SD3: ``x_t = (1 - sigma) x0 + sigma noise``, the
  MMDiT predicts the velocity ``noise - x0``. Sigmas (and timesteps, ``1000 sigma``)
  come from the model's own shifted scheduler; *which* of them is drawn follows
  ``--weighting-scheme``: ``logit_normal`` (default, the SD3 paper's choice,
  mean 0, std 1: draws concentrate on middle noise levels, unit loss weight),
  ``mode``, or uniform draws with ``cosmap`` / ``sigma_sqrt`` loss weights, or
  ``none`` (uniform, unweighted).
- **LoRA**: peft on the MMDiT's attention projections (``to_q``, ``to_k``,
  ``to_v``, ``to_out.0``; ``--lora-layers attn,context,ff`` adds the text stream
  and the feed-forwards). Base weights stay frozen in the training dtype (bf16 on
  GPU); only the LoRA matrices train, in fp32.
- **Precompute**: captions and images are encoded once (see
  ``pipelines.sd3_training_data``); the text encoders leave memory before
  training, the VAE stays on the CPU and visits the GPU only to draw validation images.
- **Optimiser**: AdamW (weight decay 1e-4), gradient clipping at 1.0, a linear
  warmup over ``--warmup-steps`` then a constant rate. ``--use-8bit-adam`` uses
  bitsandbytes' AdamW8bit and is refused without a CUDA GPU (rather than silently
  training a different optimiser).
- **Several processes**: each process trains on its own micro-batches of the same
  epoch order, gradients are averaged by accelerate; only the main process writes
  files and logs. ``--batch-size`` is per process: one step sees
  batch size x gradient accumulation x processes images.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipelines import settings
from pipelines.catalog import CATALOG, ModelSpec
from pipelines.flow_matching import evaluation_loss, flow_matching_loss, sample_noise_levels
from pipelines.manager import ModelLoadError, explain_load_failure
from pipelines.sd3_lora_files import (
    LORA_WEIGHTS_FILE,
    adapter_settings,
    check_checkpoint,
    load_adapter,
    save_adapter,
    save_checkpoint,
    write_model_card,
)
from pipelines.sd3_training_data import (
    Precomputed,
    bucket_sizes,
    epoch_rounds_for,
    precompute,
    release_memory,
    stack_batch,
)
from pipelines.training_common import (
    CHECKPOINT_PREFIX,
    check_device,
    find_checkpoint,
    forget_single_process_state,
    resolve_mixed_precision,
)
from pipelines.training_data import read_dataset, split_validation
from pipelines.validation import as_float, as_int

logger = logging.getLogger(__name__)

SHORT_NAMES = {"large": "sd35-large", "large-turbo": "sd35-large-turbo", "medium": "sd35-medium"}


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
    losses: list[float]  # per optimiser step, averaged over micro-batches and processes
    learning_rates: list[float]
    held_out_losses: dict[int, float] = field(default_factory=dict)  # step -> fixed-noise loss on held-out images
    validation_images: list[Path] = field(default_factory=list)
    checkpoints: list[Path] = field(default_factory=list)
    train_images: int = 0
    held_out_images: int = 0
    seconds: float = 0.0


# ----------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class ModelSource:
    source: str  # what from_pretrained gets: a local folder or a Hub id
    spec: ModelSpec  # for sentences and presets
    tiny: bool


def resolve_model(config: SD3LoraTrainingConfig) -> ModelSource:
    """Where the SD3 pipeline comes from: the tiny stand-in, a catalog entry, or a folder / Hub id as given."""
    if config.tiny is not None:
        from pipelines.tiny import ensure_tiny_models

        spec = CATALOG[SHORT_NAMES[config.tiny]]
        return ModelSource(str(ensure_tiny_models(config.tiny_dir) / spec.tiny_dir), spec, True)
    key = SHORT_NAMES.get(config.model, config.model)
    if key in CATALOG and CATALOG[key].kind != "sd3":
        raise ValueError(f"{key} is not an SD3 model; train one of: {', '.join(SHORT_NAMES.values())}.")
    spec = CATALOG.get(key) or dataclasses.replace(CATALOG["sd35-large"], title="The SD3 model", repo_id=config.model)
    # As app.py: STUDIO_MODEL_<KEY> points a catalog key at a local copy.
    source = os.environ.get("STUDIO_MODEL_" + key.upper().replace("-", "_")) if key in CATALOG else config.model
    if not source:
        return ModelSource(spec.repo_id, spec, False)
    folder = Path(source).expanduser()
    looks_local = source.startswith(("/", ".", "~")) or folder.exists()
    if looks_local and not (folder / "model_index.json").is_file():
        raise ModelLoadError(
            f"{folder} holds no model_index.json, so it is not a saved StableDiffusion3Pipeline; "
            "point --model to the folder that save_pretrained() wrote, or use a catalog key such as sd35-large."
        )
    return ModelSource(str(folder) if looks_local else source, spec, False)


def _explain(model: ModelSource, error: BaseException) -> ModelLoadError:
    sentence = explain_load_failure(model.spec, model.source, error, tiny=model.tiny)
    sentence = sentence.replace(f"--model {model.spec.key}=DIR", "--model DIR")  # the app's flag -> this CLI's
    return ModelLoadError(
        sentence.replace("try the whole app offline with --tiny", "try the trainer offline with --tiny large")
    )


def _load(model: ModelSource, what: Callable[[], object]):
    try:
        return what()
    except (ValueError, ModelLoadError):
        raise
    except Exception as error:  # every other failure becomes the manager's sentence
        logger.info("loading %s failed", model.source, exc_info=True)  # the sentence below says what to do
        raise _explain(model, error) from error


def max_trainable_side(model: ModelSource) -> int:
    """The longest image side the transformer's position embedding covers, read from the configs alone."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    transformer = _load(model, lambda: SD3Transformer2DModel.load_config(model.source, subfolder="transformer"))
    vae = _load(model, lambda: AutoencoderKL.load_config(model.source, subfolder="vae"))
    vae_scale = 2 ** (len(vae["block_out_channels"]) - 1)
    return transformer["pos_embed_max_size"] * transformer["patch_size"] * vae_scale


def model_fingerprint(model: ModelSource) -> dict:
    """What identifies the text encoders and VAE for the cache: the source, and for a folder each file's size
    and mtime."""
    folder = Path(model.source)
    if not folder.is_dir():
        return {"source": model.source}
    files = []
    for sub in sorted(folder.iterdir()):
        if sub.is_dir() and sub.name.startswith(("text_encoder", "tokenizer", "vae")):
            for path in sorted(sub.rglob("*")):
                if path.is_file():
                    stat = path.stat()
                    files.append([path.relative_to(folder).as_posix(), stat.st_size, stat.st_mtime_ns])
    return {"source": str(folder.resolve()), "files": files}


# ----------------------------------------------------------------------------- validation images


@torch.no_grad()
def render_validation(transformer, vae, scheduler_config, prompts: Precomputed, config, model, step, device, autocast):
    """Draw the validation prompt with the transformer as trained so far; saves and returns the PNG path."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from pipelines.png_metadata import a1111_parameters, save_png

    preset = model.spec.image_preset
    steps = preset.steps if config.validation_steps is None else config.validation_steps
    guidance = preset.guidance if config.validation_guidance is None else config.validation_guidance
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(scheduler_config),
        vae=vae.to(device),
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipeline.set_progress_bar_config(disable=True)
    positive, negative = prompts.prompts[config.validation_prompt], prompts.prompts[""]
    with autocast():
        image = pipeline(
            prompt_embeds=positive.prompt_embeds[None].to(device),
            pooled_prompt_embeds=positive.pooled_prompt_embeds[None].to(device),
            negative_prompt_embeds=negative.prompt_embeds[None].to(device),
            negative_pooled_prompt_embeds=negative.pooled_prompt_embeds[None].to(device),
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=config.resolution,
            width=config.resolution,
            generator=torch.Generator().manual_seed(config.seed),
        ).images[0]
    vae.to("cpu")
    path = Path(config.output_dir) / "validation" / f"step-{step:06d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    details = {"Steps": steps, "CFG scale": guidance, "Seed": config.seed, "Size": f"{image.width}x{image.height}"}
    details["Model"] = model.spec.title
    details["Training step"] = step
    return save_png(image, path, a1111_parameters(config.validation_prompt, "", details), {"training_step": step})


# ----------------------------------------------------------------------------- training


def _load_transformer(model: ModelSource, dtype: torch.dtype):
    from diffusers import SD3Transformer2DModel

    return _load(
        model, lambda: SD3Transformer2DModel.from_pretrained(model.source, subfolder="transformer", dtype=dtype)
    )


def _load_text_pipeline(model: ModelSource, dtype: torch.dtype, device):
    from diffusers import StableDiffusion3Pipeline

    def load():
        pipeline = StableDiffusion3Pipeline.from_pretrained(model.source, transformer=None, vae=None, dtype=dtype)
        for encoder in (pipeline.text_encoder, pipeline.text_encoder_2, pipeline.text_encoder_3):
            if encoder is not None:
                encoder.to(device).eval()
        return pipeline

    return _load(model, load)


def _load_vae(model: ModelSource, device):
    from diffusers import AutoencoderKL

    # fp32: the VAE is small, and its latents are what every step trains on.
    return _load(model, lambda: AutoencoderKL.from_pretrained(model.source, subfolder="vae").to(device).eval())


def _make_optimizer(config: SD3LoraTrainingConfig, parameters: list):
    if config.use_8bit_adam:
        try:
            import bitsandbytes
        except ImportError as error:
            raise ValueError(f"--use-8bit-adam needs bitsandbytes ({error}); install it or drop the flag.") from error
        optimizer_class = bitsandbytes.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    return optimizer_class(
        parameters, lr=config.learning_rate, betas=(0.9, 0.999), weight_decay=settings.SD3_TRAIN_ADAM_WEIGHT_DECAY
    )


def _warmup_then_constant(warmup_steps: int) -> Callable[[int], float]:
    # Step k (from 0) runs at lr * min(1, (k + 1) / warmup): linear warmup, then constant.
    return lambda step: 1.0 if warmup_steps == 0 else min(1.0, (step + 1) / warmup_steps)


def train(config: SD3LoraTrainingConfig, *, log: Callable[[str], None] | None = None) -> TrainingResult:
    """Train the LoRA ``config`` describes and save it; returns what happened.

    Raises TrainingDataError (a ValueError) for a bad dataset and ValueError for a bad setting, both before any
    model is loaded, and ModelLoadError when the model cannot be loaded. ``log`` receives the progress lines
    (``step N/M  loss X  lr Y  Z s/step``) on the main process; default: print.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    started = time.perf_counter()

    # 1. Check the settings and the dataset before anything heavy.
    config = config.validated()
    examples = read_dataset(config.dataset)
    train_examples, held_out = split_validation(examples, config.validation_split, config.seed)
    model = resolve_model(config)
    resume_from = find_checkpoint(config.resume, config.output_dir)
    resume_state = check_checkpoint(resume_from, config, model) if resume_from is not None else None
    if max(max(size) for size in bucket_sizes(config.resolution)) > (limit := max_trainable_side(model)):
        raise ValueError(
            f"resolution {config.resolution} makes images larger than the {limit} px a side this model's "
            "position embedding covers; lower --resolution."
        )

    # 2. Processes, precision, logging.
    mixed_precision = resolve_mixed_precision(config.device, config.mixed_precision)
    forget_single_process_state()
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation,
        cpu=config.device == "cpu",
    )
    set_seed(config.seed)  # the LoRA's initial A matrices; every process starts from the same ones
    device = accelerator.device
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)

    def say(message: str) -> None:
        if accelerator.is_main_process:
            (log or (lambda text: print(text, flush=True)))(message)

    say(
        f"training an SD3 LoRA on {len(train_examples)} images ({len(held_out)} held out) from {model.source} "
        f"on {accelerator.num_processes} process(es), {device}, {mixed_precision} mixed precision"
    )

    # 3. Encode captions and images once; the text encoders leave memory afterwards.
    vae_holder: list = []

    def get_vae():
        if not vae_holder:
            vae_holder.append(_load_vae(model, device))
        return vae_holder[0].to(device)

    extra_prompts = [config.validation_prompt, ""] if config.validation_prompt else []
    # With a cache folder the main process fills it and the others then read it; without, each encodes alone.
    with accelerator.main_process_first() if config.cache_dir is not None else contextlib.nullcontext():
        data = precompute(
            train_examples + held_out,
            resolution=config.resolution,
            center_crop=config.center_crop,
            random_flip=config.random_flip,
            trigger=config.trigger,
            extra_prompts=extra_prompts,
            max_sequence_length=config.max_sequence_length,
            dtype=dtype,
            device=device,
            model_fingerprint=model_fingerprint(model),
            cache_dir=config.cache_dir,
            load_text_pipeline=lambda: _load_text_pipeline(model, dtype, device),
            get_vae=get_vae,
            log=say,
        )
    train_data, held_out_data = data.examples[: len(train_examples)], data.examples[len(train_examples) :]
    if config.validation_prompt and accelerator.is_main_process:
        get_vae()
    if vae_holder:
        vae_holder[0].to("cpu")  # back on the GPU only to draw validation images
    release_memory()

    # 4. The transformer: frozen in the training dtype, LoRA on the attention projections in fp32.
    transformer = _load_transformer(model, dtype)
    transformer.requires_grad_(False)
    transformer.to(device)
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.lora_alpha or config.rank,
        init_lora_weights="gaussian",
        target_modules=config.target_modules,
    )
    try:
        transformer.add_adapter(lora)
    except ValueError as error:
        raise ValueError(f"LoRA layers {', '.join(config.target_modules)} do not fit this model: {error}") from error
    cast_training_params(transformer, dtype=torch.float32)
    if config.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    if resume_from is not None:
        load_adapter(transformer, resume_from / LORA_WEIGHTS_FILE)
    trainable = [parameter for parameter in transformer.parameters() if parameter.requires_grad]
    optimizer = _make_optimizer(config, trainable)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_then_constant(config.warmup_steps))
    noise_schedule = FlowMatchEulerDiscreteScheduler.from_pretrained(model.source, subfolder="scheduler")
    transformer, optimizer = accelerator.prepare(transformer, optimizer)

    # 5. Resume: optimiser, schedule, position in the data, noise generators.
    generator = torch.Generator().manual_seed(config.seed * 1000 + accelerator.process_index)
    step, epoch, position = 0, 0, 0
    if resume_from is not None:
        optimizer.load_state_dict(torch.load(resume_from / "optimizer.pt", map_location="cpu", weights_only=True))
        lr_schedule.load_state_dict(torch.load(resume_from / "scheduler.pt", weights_only=True))
        step, epoch, position = resume_state["global_step"], resume_state["epoch"], resume_state["position"]
        if resume_state["processes"] != accelerator.num_processes:  # rounds of another size: restart the epoch
            say(f"{resume_from} was written by {resume_state['processes']} process(es); its epoch starts over")
            position = 0
        rng_file = resume_from / f"rng-{accelerator.process_index}.pt"
        if rng_file.is_file():
            generator.set_state(torch.load(rng_file, weights_only=True))
        say(f"resumed from {resume_from} at global step {step}")
    result = TrainingResult(
        output_dir=Path(config.output_dir),
        lora_path=Path(config.output_dir) / LORA_WEIGHTS_FILE,
        start_step=step,
        steps=step,
        losses=[],
        learning_rates=[],
        train_images=len(train_data),
        held_out_images=len(held_out_data),
    )

    # 6. The order of micro-batches: one epoch at a time, each process taking its share of every round.
    buckets = [item.size for item in train_data]
    processes, rank = accelerator.num_processes, accelerator.process_index

    def epoch_rounds(number: int) -> list[list[list[int]]]:
        return epoch_rounds_for(buckets, config.batch_size, config.seed, number, processes)

    rounds = epoch_rounds(epoch)
    unwrapped = accelerator.unwrap_model(transformer)

    def after_step(done: int) -> None:
        if config.validation_prompt and (done % config.validation_every == 0 or done == config.steps):
            if accelerator.is_main_process:
                unwrapped.eval()
                path = render_validation(
                    unwrapped,
                    vae_holder[0],
                    noise_schedule.config,
                    data,
                    config,
                    model,
                    done,
                    device,
                    accelerator.autocast,
                )
                unwrapped.train()
                result.validation_images.append(path)
                say(f"validation image at step {done}: {path}")
            accelerator.wait_for_everyone()
        if held_out_data and (done % config.validation_every == 0 or done == config.steps):
            if accelerator.is_main_process:
                with accelerator.autocast():
                    value = evaluation_loss(unwrapped, held_out_data, seed=config.seed, device=device, dtype=dtype)
                result.held_out_losses[done] = value
                say(f"held-out images at step {done}: fixed-noise loss {value:.4f}")
            accelerator.wait_for_everyone()
        if config.checkpoint_every and (done % config.checkpoint_every == 0 or done == config.steps):
            folder = Path(config.output_dir) / f"{CHECKPOINT_PREFIX}{done}"
            state = {
                "config": config,
                "global_step": done,
                "epoch": epoch,
                "position": position,
                "processes": processes,
                "adapter": adapter_settings(config, model),
            }
            save_checkpoint(accelerator, folder, transformer, optimizer, lr_schedule, state, generator)
            result.checkpoints.append(folder)

    # 7. The training loop: one optimiser update per ``gradient_accumulation`` micro-batches.
    window_losses: list[float] = []
    window_seconds = 0.0  # training time of the logged window (validation images and checkpoints left out)
    while step < config.steps:
        step_started = time.perf_counter()
        micro_losses = []
        for _ in range(config.gradient_accumulation):
            if position >= len(rounds):
                epoch, position = epoch + 1, 0
                rounds = epoch_rounds(epoch)
            items = [train_data[index] for index in rounds[position][rank]]
            position += 1
            flips = (torch.rand(len(items), generator=generator) < 0.5).tolist() if config.random_flip else None
            batch = stack_batch(items, device, dtype, flips)
            noise = torch.randn(batch["latents"].shape, generator=generator).to(device, dtype)
            timesteps, sigmas = sample_noise_levels(config, noise_schedule, len(items), generator)
            with accelerator.accumulate(transformer), accelerator.autocast():
                loss = flow_matching_loss(transformer, batch, noise, timesteps, sigmas, config.weighting_scheme)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(trainable, config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            micro_losses.append(loss.detach())
        lr = lr_schedule.get_last_lr()[0]
        lr_schedule.step()
        step += 1
        mean_loss = accelerator.reduce(torch.stack(micro_losses).mean(), reduction="mean").item()
        result.losses.append(mean_loss)
        result.learning_rates.append(lr)
        result.steps = step
        window_losses.append(mean_loss)
        window_seconds += time.perf_counter() - step_started
        if step % config.log_every == 0 or step == config.steps:
            mean = sum(window_losses) / len(window_losses)
            seconds = window_seconds / len(window_losses)
            say(f"step {step}/{config.steps}  loss {mean:.4f}  lr {lr:.2e}  {seconds:.2f} s/step")
            window_losses, window_seconds = [], 0.0
        after_step(step)

    # 8. The final adapter, its settings and its model card.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_adapter(unwrapped, Path(config.output_dir), config)
        result.seconds = time.perf_counter() - started
        write_model_card(config, model, result)
        say(f"saved {result.lora_path} after {step} steps in {result.seconds:.0f} s")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


# ----------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> SD3LoraTrainingConfig:
    """The command line as a config (not yet validated: ``train`` does that)."""
    defaults = SD3LoraTrainingConfig(dataset="", output_dir="")
    parser = argparse.ArgumentParser(prog="python -m pipelines.train_sd3_lora", description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", type=Path, help="imagefolder with metadata.jsonl (file_name, text)")
    parser.add_argument("output_dir", type=Path, help="where the LoRA, checkpoints and validation images go")
    parser.add_argument("--model", default=defaults.model, help="catalog key (sd35-large, medium, ...), Hub id or DIR")
    parser.add_argument("--tiny", choices=list(SHORT_NAMES), default=None, help="train a tiny offline stand-in")
    parser.add_argument("--tiny-dir", type=Path, default=None)
    parser.add_argument("--trigger", "--instance-prompt", dest="trigger", default="", help="put before every caption")
    parser.add_argument("--resolution", type=int, default=defaults.resolution)
    parser.add_argument("--center-crop", action="store_true", help="one square bucket instead of aspect buckets")
    parser.add_argument("--random-flip", action="store_true", help="mirror half the images (off: text, faces)")
    parser.add_argument("--rank", type=int, default=defaults.rank)
    parser.add_argument("--lora-alpha", type=float, default=None, help="default: the rank")
    parser.add_argument(
        "--lora-layers",
        default=",".join(defaults.lora_layers),
        help=f"comma-separated groups ({', '.join(settings.SD3_TRAIN_LORA_LAYER_GROUPS)}) or module names",
    )
    parser.add_argument("--learning-rate", "--lr", dest="learning_rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="per process")
    parser.add_argument("--gradient-accumulation", type=int, default=defaults.gradient_accumulation)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--mixed-precision", choices=settings.SD3_TRAIN_MIXED_PRECISION, default="auto")
    parser.add_argument("--use-8bit-adam", action="store_true", help="bitsandbytes AdamW8bit (CUDA only)")
    parser.add_argument("--max-grad-norm", type=float, default=defaults.max_grad_norm)
    parser.add_argument(
        "--weighting-scheme", choices=settings.SD3_TRAIN_WEIGHTING_SCHEMES, default=defaults.weighting_scheme
    )
    parser.add_argument("--logit-mean", type=float, default=defaults.logit_mean)
    parser.add_argument("--logit-std", type=float, default=defaults.logit_std)
    parser.add_argument("--mode-scale", type=float, default=defaults.mode_scale)
    parser.add_argument("--max-sequence-length", type=int, default=defaults.max_sequence_length, help="T5 tokens")
    parser.add_argument("--validation-prompt", default="")
    parser.add_argument("--validation-every", type=int, default=defaults.validation_every)
    parser.add_argument("--validation-steps", type=int, default=None, help="default: the model's preset")
    parser.add_argument("--validation-guidance", type=float, default=None, help="default: the model's preset")
    parser.add_argument("--validation-split", type=float, default=0.0, help="fraction of images held out")
    parser.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every, help="0: none")
    parser.add_argument("--resume", default=None, help="latest, or a checkpoint-N folder")
    parser.add_argument("--log-every", type=int, default=defaults.log_every)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=None, help="keep precomputed embeddings and latents here")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    args = vars(parser.parse_args(argv))
    args["lora_layers"] = tuple(item for item in args["lora_layers"].split(",") if item.strip())
    return SD3LoraTrainingConfig(**args)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        train(parse_args(argv))
        code = 0
    except (ValueError, ModelLoadError) as error:  # a bad dataset or setting, or a model that cannot be loaded
        print(f"error: {error}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted: checkpoints written so far are kept; run again with --resume latest", file=sys.stderr)
        code = 130
    raise SystemExit(code)


if __name__ == "__main__":
    main()
