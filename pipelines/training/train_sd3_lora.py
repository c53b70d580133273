"""Train a DreamBooth-style LoRA for Stable Diffusion 3.5 on a captioned imagefolder.

    python -m pipelines.training.train_sd3_lora DATASET OUT [--model sd35-large|large|medium|DIR|REPO] [--trigger sks]
    python -m pipelines.training.train_sd3_lora DATASET OUT --tiny medium --resolution 128 --steps 20  # offline, seconds
    accelerate launch --multi_gpu --num_processes 4 -m pipelines.training.train_sd3_lora DATASET OUT   # several GPUs

DATASET is what the Batch tab and ``pipelines.blip.caption_folder`` write: images and
a ``metadata.jsonl`` of ``{"file_name", "text"}`` lines. It is checked first, so
a bad file fails in one sentence before any model is loaded. OUT receives
``pytorch_lora_weights.safetensors`` (diffusers format, ``transformer.``-prefixed
keys: the Studio's LoRA panel and ``pipeline.load_lora_weights`` read it as is),
``training_args.json``, a ``README.md`` model card (YAML front matter the Hub indexes), ``validation/step-N.png`` and
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
  ``pipelines.training.sd3_data``); the text encoders leave memory before
  training, the VAE stays on the CPU and visits the GPU only to draw validation images.
- **Optimiser**: AdamW (weight decay 1e-4), gradient clipping at 1.0; the
  learning rate is diffusers' ``get_scheduler``: a linear warmup over
  ``--warmup-steps`` (step k at ``lr * k / warmup``), then ``--lr-scheduler``
  (constant by default, cosine or linear to 0). ``--use-8bit-adam`` uses
  bitsandbytes' AdamW8bit and is refused without a CUDA GPU (rather than silently
  training a different optimiser).
- **Data**: a ``DataLoader`` whose batch sampler draws each micro-batch from one
  aspect bucket, in an order fixed by the seed and the epoch, prepared by
  ``accelerator.prepare``.
- **Checkpoints**: ``accelerator.save_state`` with hooks that save the LoRA alone
  (``checkpoint-N/pytorch_lora_weights.safetensors``, loadable as any of this
  trainer's LoRAs), the optimiser, the LR schedule and every process's random
  generators; ``--resume`` reloads them with ``accelerator.load_state`` and
  continues exactly where the run stopped.
- **Modules**: the settings and result types live in
  ``pipelines.training.sd3_config``, buckets and the precomputed cache in
  ``pipelines.training.sd3_data``, the loss in ``pipelines.training.flow_matching``, what
  is written (LoRA, checkpoint hooks, model card) in ``pipelines.training.sd3_lora_files``;
  this module holds the model loading and the training steps, and imports those,
  never the other way round.
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
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipelines import settings
from pipelines.catalog import CATALOG
from pipelines.errors import ModelLoadError, exit_from_command
from pipelines.manager import explain_load_failure
from pipelines.training.common import (
    CHECKPOINT_PREFIX,
    find_checkpoint,
    make_accelerator,
    make_lr_scheduler,
    micro_batches,
    resolve_mixed_precision,
    save_training_state,
)
from pipelines.training.dataset import read_dataset, split_validation
from pipelines.training.flow_matching import evaluation_loss, flow_matching_loss, sample_noise_levels
from pipelines.training.sd3_config import SHORT_NAMES, ModelSource, SD3LoraTrainingConfig, TrainingResult
from pipelines.training.sd3_data import (
    BucketBatchSampler,
    CachedExample,
    Precomputed,
    bucket_sizes,
    collate_examples,
    precompute,
    release_memory,
)
from pipelines.training.sd3_lora_files import (
    LORA_WEIGHTS_FILE,
    adapter_settings,
    check_checkpoint,
    register_checkpoint_hooks,
    save_adapter,
    write_outputs,
)

__all__ = ["SHORT_NAMES", "ModelSource", "SD3LoraTrainingConfig", "TrainingResult", "main", "parse_args", "train"]

logger = logging.getLogger(__name__)


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

    from pipelines.sd3.png_metadata import a1111_parameters, save_png

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


def _check_inputs(config: SD3LoraTrainingConfig) -> tuple[SD3LoraTrainingConfig, list, list, ModelSource, dict | None]:
    """1. The settings, the dataset, the model's source and the checkpoint to resume (its state, with its
    ``folder``), before anything heavy."""
    config = config.validated()
    examples = read_dataset(config.dataset)
    train_examples, held_out = split_validation(examples, config.validation_split, config.seed)
    model = resolve_model(config)
    resume_from = find_checkpoint(config.resume, config.output_dir)
    resume = None if resume_from is None else {**check_checkpoint(resume_from, config, model), "folder": resume_from}
    if max(max(size) for size in bucket_sizes(config.resolution)) > (limit := max_trainable_side(model)):
        raise ValueError(
            f"resolution {config.resolution} makes images larger than the {limit} px a side this model's "
            "position embedding covers; lower --resolution."
        )
    return config, train_examples, held_out, model, resume


@dataclass
class _Run:
    """What the steps of ``train`` share."""

    config: SD3LoraTrainingConfig
    model: ModelSource
    accelerator: object
    dtype: torch.dtype
    say: Callable[[str], None]
    result: TrainingResult
    data: Precomputed | None = None
    held_out: list[CachedExample] = field(default_factory=list)
    vae: list = field(default_factory=list)  # the VAE once loaded (for validation images)
    transformer: object = None  # as prepared by accelerate
    unwrapped: object = None
    trainable: list = field(default_factory=list)
    optimizer: object = None
    lr_scheduler: object = None
    noise_schedule: object = None
    loader: object = None  # the prepared DataLoader of micro-batches
    order: BucketBatchSampler | None = None


def _precompute(run: _Run, train_examples: list, held_out: list) -> list[CachedExample]:
    """3. Encode captions and images once (or read the cache); the text encoders leave memory afterwards."""
    config, accelerator = run.config, run.accelerator
    device = accelerator.device

    def get_vae():
        if not run.vae:
            run.vae.append(_load_vae(run.model, device))
        return run.vae[0].to(device)

    extra_prompts = [config.validation_prompt, ""] if config.validation_prompt else []
    # With a cache folder the main process fills it and the others then read it; without, each encodes alone.
    with accelerator.main_process_first() if config.cache_dir is not None else contextlib.nullcontext():
        run.data = precompute(
            train_examples + held_out,
            resolution=config.resolution,
            center_crop=config.center_crop,
            random_flip=config.random_flip,
            trigger=config.trigger,
            extra_prompts=extra_prompts,
            max_sequence_length=config.max_sequence_length,
            dtype=run.dtype,
            device=device,
            model_fingerprint=model_fingerprint(run.model),
            cache_dir=config.cache_dir,
            load_text_pipeline=lambda: _load_text_pipeline(run.model, run.dtype, device),
            get_vae=get_vae,
            log=run.say,
        )
    run.held_out = run.data.examples[len(train_examples) :]
    if config.validation_prompt and accelerator.is_main_process:
        get_vae()
    if run.vae:
        run.vae[0].to("cpu")  # back on the GPU only to draw validation images
    release_memory()
    return run.data.examples[: len(train_examples)]


def _add_lora(run: _Run):
    """4. The transformer: frozen in the training dtype, LoRA on the chosen projections in fp32."""
    from accelerate.utils import set_seed
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    config = run.config
    transformer = _load_transformer(run.model, run.dtype)
    transformer.requires_grad_(False)
    transformer.to(run.accelerator.device)
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.lora_alpha or config.rank,
        init_lora_weights="gaussian",
        target_modules=config.target_modules,
    )
    set_seed(config.seed)  # the LoRA's initial A matrices; every process starts from the same ones
    try:
        transformer.add_adapter(lora)
    except ValueError as error:
        raise ValueError(f"LoRA layers {', '.join(config.target_modules)} do not fit this model: {error}") from error
    cast_training_params(transformer, dtype=torch.float32)
    if config.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    return transformer


def _prepare(run: _Run, transformer, train_data: list[CachedExample], resume: dict | None) -> int:
    """5. Optimiser, LR schedule, the DataLoader of aspect buckets, all through accelerate; then resume.

    Returns the global step to start from. Noise, flips and timesteps come from torch's global generator,
    seeded per process, so ``save_state`` keeps them and ``load_state`` puts them back.
    """
    from accelerate.utils import set_seed
    from diffusers import FlowMatchEulerDiscreteScheduler
    from torch.utils.data import DataLoader

    config, accelerator = run.config, run.accelerator
    run.trainable = [parameter for parameter in transformer.parameters() if parameter.requires_grad]
    optimizer = _make_optimizer(config, run.trainable)
    run.lr_scheduler = make_lr_scheduler(
        config.lr_scheduler, optimizer, warmup_steps=config.warmup_steps, total_steps=config.steps
    )
    run.noise_schedule = FlowMatchEulerDiscreteScheduler.from_pretrained(run.model.source, subfolder="scheduler")
    run.order = BucketBatchSampler([item.size for item in train_data], config.batch_size, config.seed)
    loader = DataLoader(
        train_data,
        batch_sampler=run.order,
        collate_fn=collate_examples,
        generator=torch.Generator().manual_seed(config.seed),  # so no iterator draws from the global generator
    )
    run.transformer, run.optimizer, run.loader = accelerator.prepare(transformer, optimizer, loader)
    run.unwrapped = accelerator.unwrap_model(run.transformer)
    register_checkpoint_hooks(accelerator, run.transformer)
    accelerator.register_for_checkpointing(run.lr_scheduler)
    set_seed(config.seed, device_specific=True)  # each process draws its own noise
    if resume is None:
        return 0
    accelerator.load_state(str(resume["folder"]))
    run.say(f"resumed from {resume['folder']} at global step {resume['global_step']}")
    return int(resume["global_step"])


def _after_step(run: _Run, done: int) -> None:
    """7. Every ``validation_every`` steps a validation image and the held-out loss; checkpoints."""
    config, accelerator = run.config, run.accelerator
    validating = done % config.validation_every == 0 or done == config.steps
    if config.validation_prompt and validating:
        if accelerator.is_main_process:
            run.unwrapped.eval()
            path = render_validation(
                run.unwrapped,
                run.vae[0],
                run.noise_schedule.config,
                run.data,
                config,
                run.model,
                done,
                accelerator.device,
                accelerator.autocast,
            )
            run.unwrapped.train()
            run.result.validation_images.append(path)
            run.say(f"validation image at step {done}: {path}")
        accelerator.wait_for_everyone()
    if run.held_out and validating:
        if accelerator.is_main_process:
            with accelerator.autocast():
                value = evaluation_loss(
                    run.unwrapped, run.held_out, seed=config.seed, device=accelerator.device, dtype=run.dtype
                )
            run.result.held_out_losses[done] = value
            run.say(f"held-out images at step {done}: fixed-noise loss {value:.4f}")
        accelerator.wait_for_everyone()
    if config.checkpoint_every and (done % config.checkpoint_every == 0 or done == config.steps):
        folder = Path(config.output_dir) / f"{CHECKPOINT_PREFIX}{done}"
        state = {
            "global_step": done,
            "processes": accelerator.num_processes,
            "adapter": adapter_settings(config, run.model),
        }
        save_training_state(accelerator, folder, state)
        run.result.checkpoints.append(folder)


def _micro_step(run: _Run, batch: dict) -> torch.Tensor:
    """One micro-batch: noise, noise levels and flips drawn, the loss, its gradients; the optimiser steps when
    ``accelerator.accumulate`` says the update is complete."""
    config, accelerator = run.config, run.accelerator
    latents = batch["latents"].to(run.dtype)
    if config.random_flip:
        flips = (torch.rand(len(latents)) < 0.5).to(latents.device).view(-1, 1, 1, 1)
        latents = torch.where(flips, batch["flipped_latents"].to(run.dtype), latents)
    noise = torch.randn(latents.shape).to(latents.device, run.dtype)
    timesteps, sigmas = sample_noise_levels(config, run.noise_schedule, len(latents))
    inputs = {
        "latents": latents,
        "prompt_embeds": batch["prompt_embeds"].to(run.dtype),
        "pooled_prompt_embeds": batch["pooled_prompt_embeds"].to(run.dtype),
    }
    with accelerator.accumulate(run.transformer), accelerator.autocast():
        loss = flow_matching_loss(run.transformer, inputs, noise, timesteps, sigmas, config.weighting_scheme)
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            accelerator.clip_grad_norm_(run.trainable, config.max_grad_norm)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def _train_loop(run: _Run, step: int) -> None:
    """6. One optimiser update per ``gradient_accumulation`` micro-batches, epoch after epoch; logs."""
    config, accelerator, result = run.config, run.accelerator, run.result
    batches = micro_batches(accelerator, run.loader, run.order, start=step * config.gradient_accumulation)
    window_losses: list[float] = []
    window_seconds = 0.0  # training time of the logged window (validation images and checkpoints left out)
    while step < config.steps:
        step_started = time.perf_counter()
        micro_losses = [_micro_step(run, next(batches)) for _ in range(config.gradient_accumulation)]
        lr = run.lr_scheduler.get_last_lr()[0]
        run.lr_scheduler.step()
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
            run.say(f"step {step}/{config.steps}  loss {mean:.4f}  lr {lr:.2e}  {seconds:.2f} s/step")
            window_losses, window_seconds = [], 0.0
        _after_step(run, step)


def train(config: SD3LoraTrainingConfig, *, log: Callable[[str], None] | None = None) -> TrainingResult:
    """Train the LoRA ``config`` describes and save it; returns what happened.

    Raises TrainingDataError (a ValueError) for a bad dataset and ValueError for a bad setting, both before any
    model is loaded, and ModelLoadError when the model cannot be loaded. ``log`` receives the progress lines
    (``step N/M  loss X  lr Y  Z s/step``) on the main process; default: print.
    """
    started = time.perf_counter()
    # 1. Check the settings and the dataset before anything heavy.
    config, train_examples, held_out, model, resume = _check_inputs(config)

    # 2. Processes, precision, logging.
    mixed_precision = resolve_mixed_precision(config.device, config.mixed_precision)
    accelerator = make_accelerator(config.device, mixed_precision, config.gradient_accumulation)

    def say(message: str) -> None:
        if accelerator.is_main_process:
            (log or (lambda text: print(text, flush=True)))(message)

    output_dir = Path(config.output_dir)
    result = TrainingResult(output_dir=output_dir, lora_path=output_dir / LORA_WEIGHTS_FILE, start_step=0, steps=0)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)
    run = _Run(config, model, accelerator, dtype, say, result)
    say(
        f"training an SD3 LoRA on {len(train_examples)} images ({len(held_out)} held out) from {model.source} "
        f"on {accelerator.num_processes} process(es), {accelerator.device}, {mixed_precision} mixed precision"
    )
    # 3. Encode captions and images once.
    train_data = _precompute(run, train_examples, held_out)
    result.train_images, result.held_out_images = len(train_data), len(run.held_out)
    # 4. The transformer with its LoRA.  5. Optimiser, schedule, data, resume.
    step = _prepare(run, _add_lora(run), train_data, resume)
    result.start_step = result.steps = step
    # 6. The training loop (7. validation and checkpoints after each step).
    _train_loop(run, step)

    # 8. The final adapter, its settings and its model card.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_adapter(run.unwrapped, output_dir)
        result.seconds = time.perf_counter() - started
        write_outputs(config, model, result)
        say(f"saved {result.lora_path} after {result.steps} steps in {result.seconds:.0f} s")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


# ----------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> SD3LoraTrainingConfig:
    """The command line as a config (not yet validated: ``train`` does that)."""
    defaults = SD3LoraTrainingConfig(dataset="", output_dir="")
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.training.train_sd3_lora", description=__doc__.split("\n\n")[0]
    )
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
    parser.add_argument(
        "--lr-scheduler", choices=settings.SD3_TRAIN_LR_SCHEDULERS, default=defaults.lr_scheduler, help="after warmup"
    )
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
    exit_from_command(
        lambda: train(parse_args(argv)),
        kept_on_interrupt="checkpoints written so far are kept; run again with --resume latest",
    )


if __name__ == "__main__":
    main()
