"""Train a LoRA on BLIP's text decoder, so it captions the way a dataset does (a style, a domain, a language).

    python -m pipelines.training.train_blip_lora DATASET OUT [--model blip-caption|REPO|DIR] [--epochs 5]
    python -m pipelines.training.train_blip_lora DATASET OUT --tiny --max-steps 20        # offline, seconds
    accelerate launch --multi_gpu --num_processes 4 -m pipelines.training.train_blip_lora DATASET OUT

DATASET is an imagefolder with ``metadata.jsonl`` (``file_name``, ``text``), such
as the Batch tab's export edited by hand, or captions in another language. It
is checked first, so a bad file fails in one sentence before any model loads.
OUT receives the adapter (``adapter_config.json`` + ``adapter_model.safetensors``,
the layout the Caption tab loads), ``training_args.json``, a ``README.md`` model
card (YAML front matter the Hub indexes) and resumable ``checkpoint-N/`` folders (``--resume latest`` continues the
step count).

Choices, documented once:

- **Loss**: BLIP's own captioning loss: the text decoder's cross-entropy over
  ``[DEC] + caption + [SEP]``, each word piece and the closing [SEP] predicted
  from the pieces before it and the image; padding is masked (label -100).
- **LoRA**: peft on the whole ``BlipForConditionalGeneration``, targeting the
  text decoder's query, key, value and output (``dense``) projections of its
  self- and cross-attention (``--targets``, ``--attention``). Everything else,
  the vision encoder included, stays frozen; only the LoRA matrices train (fp32).
- **Precompute**: the vision encoder is frozen, so each image is encoded once
  before training and kept on the CPU (in the mixed-precision dtype on a GPU);
  an epoch then costs only decoder passes. There is no image augmentation.
- **Optimiser**: AdamW (weight decay 0.01) with gradient clipping at 1.0; the
  learning rate is diffusers' ``get_scheduler``: a linear warmup over
  ``--warmup-steps`` (step k at ``lr * k / warmup``), then a cosine down to 0 at
  the last step (``--schedule cosine``, the default) or constant
  (``--schedule constant``).
- **Data**: a shuffled ``DataLoader`` under ``accelerator.prepare`` with
  accelerate's seedable sampler: each epoch's order is a function of the seed
  and the epoch; an update always takes ``--gradient-accumulation``
  micro-batches, across epoch ends too.
- **Checkpoints**: ``accelerator.save_state`` with hooks that save the adapter
  alone (``checkpoint-N/`` is also an adapter folder peft loads), the optimiser,
  the schedule and every process's random generators (dropout);
  ``--resume`` reloads them with ``accelerator.load_state``.
- **Steps** are optimiser updates: ``--max-steps``, or ``--epochs`` times the
  micro-batches of an epoch divided by ``--gradient-accumulation`` (rounded up).
- **Several processes** (``accelerate launch``): every process walks the same
  seeded order of each epoch and takes its own share of it; gradients are
  averaged; only the main process validates and writes files. ``--batch-size``
  is per process. Each process encodes every image (simple; the ViT pass is a
  small part of a run).
- **Validation**: the held-out split's loss (teacher-forced, dropout off, the
  same every time, so it compares between steps; without a split, the first
  training images stand in) and a few sample captions, base model next to the
  adapter, with the Caption tab's default beam search.
- **Modules**: the settings and result types live in
  ``pipelines.training.blip_config``, vocabulary checks and data in
  ``pipelines.training.blip_data``, what is written (adapter, checkpoint hooks,
  model card) in ``pipelines.training.blip_lora_files``; this module holds the loss, the
  model and the training steps, and imports those, never the other way round.
- **Vocabulary**: BLIP's decoder spells with BERT's uncased English vocabulary.
  Before training, the share of caption word pieces that are [UNK] is printed as
  a warning when it passes ``settings.BLIP_TRAIN_UNKNOWN_TOKEN_WARNING``.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipelines import settings
from pipelines.blip.adapter_files import ADAPTER_CONFIG_FILE
from pipelines.blip.captioner import BlipCaptioner, CaptionRequest
from pipelines.errors import exit_from_command
from pipelines.training.blip_config import BlipLoraTrainingConfig, TrainingResult
from pipelines.training.blip_data import (
    EncodedSet,
    VocabularyReport,
    caption_loader,
    collate,
    encode_examples,
    vocabulary_report,
    vocabulary_warning,
)
from pipelines.training.blip_lora_files import (
    ADAPTER_NAME,
    adapter_settings,
    check_checkpoint,
    register_checkpoint_hooks,
    save_adapter,
    write_outputs,
)
from pipelines.training.common import (
    CHECKPOINT_PREFIX,
    find_checkpoint,
    make_accelerator,
    make_lr_scheduler,
    micro_batches,
    resolve_mixed_precision,
    save_training_state,
)
from pipelines.training.dataset import TrainingExample, read_dataset, split_validation

__all__ = [
    "BlipLoraTrainingConfig",
    "EncodedSet",
    "TrainingResult",
    "add_lora",
    "caption_loader",
    "decoder_loss",
    "main",
    "parse_args",
    "train",
    "vocabulary_report",
    "vocabulary_warning",
]

logger = logging.getLogger(__name__)


def decoder_loss(text_decoder, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """BLIP's captioning loss (mean over the batch's caption tokens) from precomputed image features."""
    return text_decoder(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        encoder_hidden_states=batch["features"],
        labels=batch["labels"],
        reduction="mean",
    ).loss


@torch.no_grad()
def evaluation_loss(text_decoder, encoded: EncodedSet, *, pad_token_id: int, device, batch_size: int) -> float:
    """The loss per caption token over all of ``encoded``, dropout off: the same number for the same weights."""
    was_training = text_decoder.training
    text_decoder.eval()
    total = tokens = 0.0
    for start in range(0, len(encoded), batch_size):
        batch = collate(encoded, list(range(start, min(start + batch_size, len(encoded)))), pad_token_id, device)
        summed = text_decoder(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            encoder_hidden_states=batch["features"].to(text_decoder.dtype),
            labels=batch["labels"],
            reduction="none",
        ).loss
        total += float(summed.float().sum())
        tokens += float((batch["labels"][:, 1:] != -100).sum())
    text_decoder.train(was_training)
    return total / max(tokens, 1.0)


# ----------------------------------------------------------------------------- the model


def load_captioner(config: BlipLoraTrainingConfig, device: torch.device) -> BlipCaptioner:
    """The BLIP to train, through the Studio's ModelManager (its sources and its load-failure sentences), fp32."""
    from pipelines.manager import ModelManager
    from pipelines.runtime import Runtime

    tiny_root = None
    if config.tiny:
        from pipelines.tiny import ensure_tiny_models

        tiny_root = ensure_tiny_models(config.tiny_dir)
    overrides = None if config.tiny or config.model == "blip-caption" else {"blip-caption": config.model}
    # Weights stay fp32; mixed precision autocasts the forward passes (the LoRA matrices must train in fp32).
    manager = ModelManager(Runtime(device=device, dtype=torch.float32), tiny_root=tiny_root, source_overrides=overrides)
    return manager.get("blip-caption")


def add_lora(captioner: BlipCaptioner, config: BlipLoraTrainingConfig):
    """Wrap the captioner's model with a trainable LoRA (in place); returns the peft model."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.target_modules,
        bias="none",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(captioner.model, lora)


# ----------------------------------------------------------------------------- training


@dataclass
class _Run:
    """What the steps of ``train`` share."""

    config: BlipLoraTrainingConfig
    accelerator: object
    captioner: BlipCaptioner
    result: TrainingResult | None = None
    train_set: EncodedSet | None = None
    fixed_set: EncodedSet | None = None  # validation loss and sample captions
    held_out: bool = False  # whether fixed_set is a held-out split (else the first training images)
    peft_model: object = None
    decoder: object = None  # as prepared by accelerate
    parameters: list = field(default_factory=list)
    optimizer: object = None
    lr_scheduler: object = None
    loader: object = None  # the prepared DataLoader of micro-batches

    def say(self, message: str) -> None:
        self.accelerator.print(message)


def _check_vocabulary(run: _Run, examples: list[TrainingExample]) -> VocabularyReport:
    """3. How well the model's vocabulary spells the captions; a warning before training when badly."""
    report = vocabulary_report(run.captioner.processor.tokenizer, [example.text for example in examples])
    warning = vocabulary_warning(report)
    if warning and run.accelerator.is_main_process:
        logger.warning(warning)
        run.say(warning)
    return report


def _encode(run: _Run, train_examples: list[TrainingExample], validation_examples: list[TrainingExample]) -> None:
    """4. Every image once through the frozen vision encoder; the fixed set for validation loss and samples."""
    precision = run.accelerator.mixed_precision
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    batch = settings.BLIP_TRAIN_DEFAULT_BATCH_SIZE
    run.train_set = encode_examples(run.captioner, train_examples, batch_size=batch, dtype=dtype)
    fixed = validation_examples or train_examples[: settings.BLIP_TRAIN_SAMPLE_CAPTIONS * 4]
    run.fixed_set = encode_examples(run.captioner, fixed, batch_size=batch, dtype=dtype)
    run.held_out = bool(validation_examples)


def _prepare(run: _Run, checkpoint: Path | None, resume_step: int) -> tuple[int, int]:
    """5. LoRA, optimiser, diffusers' LR schedule and the DataLoader, through accelerate; then resume.

    Returns (start step, total steps). A resumed run takes LoRA, optimiser, schedule and random state from
    its checkpoint (``accelerator.load_state``); its place in the data follows from the step.
    """
    config, accelerator = run.config, run.accelerator
    run.peft_model = add_lora(run.captioner, config)
    run.parameters = [parameter for parameter in run.peft_model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(run.parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    loader = caption_loader(run.train_set, config.batch_size, config.seed, run.captioner.pad_token_id)
    decoder = run.captioner.model.text_decoder
    run.decoder, run.optimizer, run.loader = accelerator.prepare(decoder, optimizer, loader)
    total_steps = config.max_steps or math.ceil(config.epochs * len(run.loader) / config.gradient_accumulation)
    run.lr_scheduler = make_lr_scheduler(
        config.schedule, optimizer, warmup_steps=config.warmup_steps, total_steps=total_steps
    )
    register_checkpoint_hooks(accelerator, run.peft_model)
    accelerator.register_for_checkpointing(run.lr_scheduler)
    if checkpoint is None:
        return 0, total_steps
    accelerator.load_state(str(checkpoint))
    run.say(f"resumed from {checkpoint} at step {resume_step} of {total_steps}")
    return resume_step, total_steps


def _validate(run: _Run, step: int) -> None:
    """The fixed set's loss and sample captions (main process), then everyone waits."""
    accelerator, result = run.accelerator, run.result
    if accelerator.is_main_process:
        with accelerator.autocast():
            loss = evaluation_loss(
                run.captioner.model.text_decoder,
                run.fixed_set,
                pad_token_id=run.captioner.pad_token_id,
                device=accelerator.device,
                batch_size=16,
            )
            result.samples = sample_captions(run.captioner, run.fixed_set, run.config.sample_captions)
        result.validation_losses[step] = loss
        which = "held-out images" if run.held_out else "training images (no held-out split)"
        run.say(f"validation after {step} steps: val_loss {loss:.4f} on {len(run.fixed_set)} {which}")
        for sample in result.samples:
            run.say(f"  {sample['file_name']}: base: {sample['base']!r} | adapter: {sample['adapter']!r}")
    accelerator.wait_for_everyone()


def _micro_step(run: _Run, batch: dict) -> float:
    """One micro-batch's loss and gradients; clipping and the optimiser step when the update is complete."""
    accelerator = run.accelerator
    with accelerator.accumulate(run.decoder):
        loss = decoder_loss(run.decoder, batch)
        accelerator.backward(loss)  # divided by gradient_accumulation there
        if accelerator.sync_gradients:
            accelerator.clip_grad_norm_(run.parameters, run.config.max_grad_norm)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def _train_loop(run: _Run, start_step: int, total_steps: int) -> None:
    """6. One update per ``gradient_accumulation`` micro-batches, epoch after epoch; logs, validation, checkpoints."""
    config, accelerator, result = run.config, run.accelerator, run.result
    accumulation = config.gradient_accumulation
    order = run.loader.get_sampler()  # accelerate's seedable sampler: an epoch's order is seed + epoch
    batches = micro_batches(accelerator, run.loader, order, start=start_step * accumulation)
    run.decoder.train()
    tick = time.perf_counter()
    for done in range(start_step + 1, total_steps + 1):
        running = sum(_micro_step(run, next(batches)) for _ in range(accumulation)) / accumulation
        run.lr_scheduler.step()
        mean_loss = float(accelerator.reduce(torch.tensor(running, device=accelerator.device), reduction="mean"))
        result.losses.append(mean_loss)
        result.learning_rates.append(run.lr_scheduler.get_last_lr()[0])
        result.steps = done
        if done % config.log_every == 0 or done == total_steps:
            seconds = (time.perf_counter() - tick) / config.log_every
            lr = result.learning_rates[-1]
            run.say(f"step {done}/{total_steps}  loss {mean_loss:.4f}  lr {lr:.2e}  {seconds:.2f} s/step")
            tick = time.perf_counter()
        if done % config.validation_every == 0 or done == total_steps:
            _validate(run, done)
            run.decoder.train()
        if config.checkpoint_every and done % config.checkpoint_every == 0:
            folder = Path(config.output_dir) / f"{CHECKPOINT_PREFIX}{done}"
            state = {
                "step": done,
                "total_steps": total_steps,
                "adapter": adapter_settings(config, run.captioner.source),
            }
            save_training_state(accelerator, folder, state)
            result.checkpoints.append(folder)
            run.say(f"checkpoint saved: {folder}")


def train(config: BlipLoraTrainingConfig, captioner: BlipCaptioner | None = None) -> TrainingResult:
    """Run one training as ``config`` says; returns what it did. Files go to ``config.output_dir``.

    ``captioner`` (optional) is a BLIP to train instead of loading ``config.model``;
    a LoRA is added to it in place, so give one no other code is using.
    """
    from accelerate.utils import set_seed

    started = time.perf_counter()
    # 1. Check the settings and the dataset, before any model is loaded.
    config = config.validated()
    examples = read_dataset(config.dataset)
    train_examples, validation_examples = split_validation(examples, config.validation_split, config.seed)
    checkpoint = find_checkpoint(config.resume, config.output_dir)

    # 2. Processes, precision, seed (the data order has its own: accelerate's seedable sampler).
    mixed_precision = resolve_mixed_precision(config.device, config.mixed_precision)
    accelerator = make_accelerator(config.device, mixed_precision, config.gradient_accumulation, data_seed=config.seed)
    set_seed(config.seed)

    # 3. The model, and how well its vocabulary spells the captions.
    captioner = captioner if captioner is not None else load_captioner(config, accelerator.device)
    run = _Run(config, accelerator, captioner)
    resume_step = 0 if checkpoint is None else int(check_checkpoint(checkpoint, config, captioner.source)["step"])
    report = _check_vocabulary(run, examples)
    # 4. Encode every image once.  5. LoRA, optimiser, schedule, data; resume.
    _encode(run, train_examples, validation_examples)
    start_step, total_steps = _prepare(run, checkpoint, resume_step)
    run.result = TrainingResult(
        output_dir=Path(config.output_dir),
        start_step=start_step,
        steps=start_step,
        total_steps=total_steps,
        train_images=len(train_examples),
        validation_images=len(validation_examples),
        unknown_token_rate=report.unknown_rate,
    )
    run.say(
        f"training {total_steps} steps on {len(train_examples)} images ({len(run.loader)} micro-batches of "
        f"{config.batch_size} per epoch and process, {accelerator.num_processes} process(es), "
        f"{mixed_precision if mixed_precision != 'no' else 'fp32'})"
    )
    # 6. Train (validation before the first step, and every validation_every steps).
    if start_step == 0:
        _validate(run, 0)
    _train_loop(run, start_step, total_steps)

    # 7. The adapter and its card.
    accelerator.wait_for_everyone()
    run.result.seconds = time.perf_counter() - started
    if accelerator.is_main_process:
        save_adapter(run.peft_model, Path(config.output_dir))
        write_outputs(config, captioner.source, run.result)
        say = f"adapter saved: {Path(config.output_dir) / ADAPTER_CONFIG_FILE} ({run.result.seconds:.1f} s)"
        run.say(say)
    accelerator.wait_for_everyone()
    return run.result


@torch.no_grad()
def sample_captions(captioner: BlipCaptioner, encoded: EncodedSet, count: int) -> list[dict]:
    """The first ``count`` images of ``encoded`` captioned by the base model and by the adapter (default beam)."""
    if count == 0 or len(encoded) == 0:
        return []
    features = encoded.features[:count].to(captioner.device, captioner.model.dtype)
    captioner.model.eval()  # dropout off; the training loop switches the decoder back to train()
    base = captioner.caption_embeds(features, CaptionRequest())
    adapted = captioner.caption_embeds(features, CaptionRequest(), adapter=ADAPTER_NAME)
    return [
        {"file_name": example.file_name, "base": plain.captions[0].text, "adapter": tuned.captions[0].text}
        for example, plain, tuned in zip(encoded.examples[:count], base, adapted, strict=True)
    ]


# ----------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> BlipLoraTrainingConfig:
    defaults = BlipLoraTrainingConfig(dataset="", output_dir="")
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.training.train_blip_lora", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("dataset", type=Path, help="imagefolder with metadata.jsonl (file_name, text)")
    parser.add_argument("output_dir", type=Path, help="receives the adapter, its card and checkpoints")
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model", default=defaults.model, help="blip-caption (the catalog's BLIP base), a Hub id or a folder"
    )
    model.add_argument("--tiny", action="store_true", help="train the tiny offline BLIP (for trying things out)")
    model.add_argument("--tiny-dir", type=Path, default=None)
    model.add_argument("--device", default=defaults.device, choices=("auto", "cpu", "cuda"))
    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--rank", type=int, default=defaults.rank)
    lora.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: the rank, a scale of 1)")
    lora.add_argument("--dropout", type=float, default=defaults.lora_dropout)
    lora.add_argument("--targets", default=",".join(defaults.targets), help="comma-separated: query,key,value,dense")
    lora.add_argument("--attention", default=",".join(defaults.attention), help="comma-separated: self,cross")
    run = parser.add_argument_group("optimisation")
    run.add_argument("--learning-rate", "--lr", type=float, default=defaults.learning_rate)
    length = run.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, default=defaults.epochs)
    length.add_argument("--max-steps", type=int, default=None, help="optimiser updates in all (instead of --epochs)")
    run.add_argument("--batch-size", type=int, default=defaults.batch_size, help="per process")
    run.add_argument("--gradient-accumulation", type=int, default=defaults.gradient_accumulation)
    run.add_argument("--schedule", default=defaults.schedule, choices=settings.BLIP_TRAIN_SCHEDULES)
    run.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    run.add_argument("--max-grad-norm", type=float, default=defaults.max_grad_norm)
    run.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    run.add_argument("--mixed-precision", default=defaults.mixed_precision, choices=settings.BLIP_TRAIN_MIXED_PRECISION)
    run.add_argument("--seed", type=int, default=defaults.seed)
    check = parser.add_argument_group("validation, checkpoints, logs")
    check.add_argument("--validation-split", type=float, default=defaults.validation_split)
    check.add_argument("--validation-every", type=int, default=defaults.validation_every)
    check.add_argument("--sample-captions", type=int, default=defaults.sample_captions)
    check.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every, help="0: none")
    check.add_argument("--resume", default=None, help="latest, or a checkpoint-N folder")
    check.add_argument("--log-every", type=int, default=defaults.log_every)
    args = parser.parse_args(argv)
    return BlipLoraTrainingConfig(
        dataset=args.dataset,
        output_dir=args.output_dir,
        model=args.model,
        tiny=args.tiny,
        tiny_dir=args.tiny_dir,
        rank=args.rank,
        lora_alpha=args.alpha,
        lora_dropout=args.dropout,
        targets=tuple(args.targets.split(",")),
        attention=tuple(args.attention.split(",")),
        learning_rate=args.learning_rate,
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        gradient_accumulation=args.gradient_accumulation,
        schedule=args.schedule,
        warmup_steps=args.warmup_steps,
        max_grad_norm=args.max_grad_norm,
        weight_decay=args.weight_decay,
        mixed_precision=args.mixed_precision,
        seed=args.seed,
        validation_split=args.validation_split,
        validation_every=args.validation_every,
        sample_captions=args.sample_captions,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        log_every=args.log_every,
        device=args.device,
    )


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # TrainingDataError is a ValueError: a bad dataset is one sentence and status 2, like a bad setting.
    exit_from_command(
        lambda: train(parse_args(argv)),
        kept_on_interrupt="checkpoints written so far are kept; resume with --resume latest",
    )


if __name__ == "__main__":
    main()
