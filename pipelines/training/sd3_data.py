"""SD3 LoRA training data: aspect buckets, image preparation, and the precomputed cache.

The trainer (``pipelines.training.train_sd3_lora``) never runs the text encoders or the
VAE inside its loop: every caption is encoded once with SD3's three text
encoders and every image once with the VAE, here, before training starts.
The results live in memory and, with a cache folder, on disk under a name
that hashes the model, the settings and every file's size and mtime, so a
second run on the same data loads them instead of loading the encoders at all.

Aspect bucketing: a few sizes of about ``resolution**2`` pixels at the ratios
in ``settings.SD3_TRAIN_BUCKET_RATIOS``, sides snapped to multiples of 16 (the
VAE's 8x times the MMDiT's 2x patch). Each image goes to the bucket nearest
its aspect ratio, is resized to cover it and centre-cropped; each batch is
drawn from one bucket. ``center_crop`` puts every image in one square bucket.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Sampler

from pipelines import settings
from pipelines.sd3.text_to_image import snap
from pipelines.training.dataset import TrainingExample

CACHE_FORMAT_VERSION = 1  # bump when what is stored changes, so old cache files are never read

Size = tuple[int, int]  # (width, height) in pixels


# ----------------------------------------------------------------------------- buckets


def bucket_sizes(resolution: int, ratios: Sequence[tuple[int, int]] = settings.SD3_TRAIN_BUCKET_RATIOS) -> list[Size]:
    """(width, height) of each aspect bucket: about ``resolution**2`` pixels, sides multiples of 16."""
    sizes: list[Size] = []
    area = resolution * resolution
    for units_w, units_h in ratios:
        width = math.sqrt(area * units_w / units_h)
        size = (snap(width), snap(area / width))  # as the Generate tab's aspect presets, so they agree
        if size not in sizes:
            sizes.append(size)
    return sizes


def nearest_bucket(width: int, height: int, buckets: Sequence[Size]) -> Size:
    """The bucket whose aspect ratio is closest to width:height (compared as log ratios, so 2:1 and 1:2 are
    equally far from 1:1)."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda size: abs(math.log(size[0] / size[1]) - ratio))


def assign_buckets(image_sizes: Sequence[Size], resolution: int, *, center_crop: bool) -> list[Size]:
    """The training size of each image: its nearest aspect bucket, or the square when ``center_crop``."""
    if center_crop:
        side = snap(resolution)
        return [(side, side)] * len(image_sizes)
    buckets = bucket_sizes(resolution)
    return [nearest_bucket(width, height, buckets) for width, height in image_sizes]


def fit_to_bucket(image: Image.Image, size: Size) -> Image.Image:
    """``image`` scaled (aspect kept) to cover ``size``, then centre-cropped to exactly ``size``."""
    width, height = size
    scale = max(width / image.width, height / image.height)
    scaled = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    resized = image.resize(scaled, Image.Resampling.BICUBIC)
    left, top = (scaled[0] - width) // 2, (scaled[1] - height) // 2
    return resized.crop((left, top, left + width, top + height))


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image as a (3, H, W) float tensor in [-1, 1], what the VAE encodes."""
    data = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
    pixels = data.view(image.height, image.width, 3).permute(2, 0, 1).float()
    return pixels / 127.5 - 1.0


def epoch_batches(buckets: Sequence[Size], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The micro-batches of one epoch, as example indices; every batch holds one bucket's images.

    Deterministic in (seed, epoch), so a resumed run replays the same order. Each
    bucket is shuffled and cut into batches (the last one may be smaller), then
    the batches of all buckets are shuffled together.
    """
    shuffler = random.Random(seed * 1_000_003 + epoch)
    by_bucket: dict[Size, list[int]] = {}
    for index, size in enumerate(buckets):
        by_bucket.setdefault(size, []).append(index)
    batches: list[list[int]] = []
    for size in sorted(by_bucket):
        indices = by_bucket[size]
        shuffler.shuffle(indices)
        batches += [indices[start : start + batch_size] for start in range(0, len(indices), batch_size)]
    shuffler.shuffle(batches)
    return batches


class BucketBatchSampler(Sampler):
    """``epoch_batches`` as a ``DataLoader`` batch sampler: every batch from one aspect bucket.

    ``set_epoch`` chooses the epoch's order. Its batches vary in size (a bucket's last batch may be short), so
    it has no ``batch_size``: under ``accelerator.prepare`` each process then takes whole batches in turn,
    and a short last round is filled with batches from the epoch's start, so all processes step together.
    """

    def __init__(self, buckets: Sequence[Size], batch_size: int, seed: int) -> None:
        self.buckets = list(buckets)
        self.per_batch = batch_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(epoch_batches(self.buckets, self.per_batch, self.seed, self.epoch))

    def __len__(self) -> int:
        sizes: dict[Size, int] = {}
        for size in self.buckets:
            sizes[size] = sizes.get(size, 0) + 1
        return sum(math.ceil(count / self.per_batch) for count in sizes.values())


# ----------------------------------------------------------------------------- precomputed examples


@dataclass
class CachedExample:
    """One training image as the transformer sees it: VAE latents and text embeddings."""

    file_name: str
    text: str  # the caption as trained (trigger included)
    size: Size  # the bucket: (width, height) in pixels
    latents: torch.Tensor  # (16, H/f, W/f), shifted and scaled as SD3's VAE latents are
    flipped_latents: torch.Tensor | None  # the mirrored image's latents, when random flips are on
    prompt_embeds: torch.Tensor  # (77 + T5 tokens, joint_attention_dim)
    pooled_prompt_embeds: torch.Tensor  # (pooled_projection_dim,)


@dataclass
class PromptEmbedding:
    prompt_embeds: torch.Tensor  # (tokens, dim)
    pooled_prompt_embeds: torch.Tensor  # (dim,)


@dataclass
class Precomputed:
    examples: list[CachedExample]
    prompts: dict[str, PromptEmbedding]  # extra prompts (validation, and "" for its negative), by text
    text_from_cache: bool  # True when the text embeddings came from the disk cache
    latents_from_cache: bool


def caption_for_training(text: str, trigger: str) -> str:
    """The caption as trained: DreamBooth-style, the trigger words first (unless already there)."""
    trigger = trigger.strip()
    if not trigger or text.startswith(trigger):
        return text
    return f"{trigger}, {text}"


def cache_name(kind: str, parts: dict) -> str:
    """A file name for cached ``kind`` ("text" or "latents") that changes whenever any of ``parts`` does."""
    digest = hashlib.sha256(json.dumps({"v": CACHE_FORMAT_VERSION, **parts}, sort_keys=True).encode()).hexdigest()
    return f"{kind}-{digest[:24]}.pt"


def _file_signature(path: Path) -> list:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def _load_cache(path: Path | None):
    if path is None or not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a truncated or foreign file is recomputed, not trusted
        return None


def _save_cache(path: Path | None, payload) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(payload, staging)
    staging.replace(path)  # atomic: a reader never sees half a file


def release_memory() -> None:
    """Collect garbage and give cached CUDA memory back, after an encoder is dropped."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@torch.no_grad()
def encode_texts(
    text_pipeline, texts: Sequence[str], *, max_sequence_length: int, device: torch.device, dtype: torch.dtype
) -> dict[str, PromptEmbedding]:
    """Each distinct text through SD3's three text encoders (``pipeline.encode_prompt``), on the CPU after."""
    unique = list(dict.fromkeys(texts))
    encoded: dict[str, PromptEmbedding] = {}
    for start in range(0, len(unique), settings.SD3_TRAIN_ENCODE_BATCH):
        chunk = unique[start : start + settings.SD3_TRAIN_ENCODE_BATCH]
        embeds, _, pooled, _ = text_pipeline.encode_prompt(
            prompt=chunk,
            prompt_2=None,
            prompt_3=None,
            device=device,
            do_classifier_free_guidance=False,
            max_sequence_length=max_sequence_length,
        )
        for index, text in enumerate(chunk):
            encoded[text] = PromptEmbedding(embeds[index].to("cpu", dtype), pooled[index].to("cpu", dtype))
    return encoded


@torch.no_grad()
def encode_images(
    vae, images: Sequence[Image.Image], *, device: torch.device, dtype: torch.dtype
) -> list[torch.Tensor]:
    """Each image's VAE latents, as SD3 trains on them: ``(mean - shift_factor) * scaling_factor``.

    The distribution's mean is kept (not a sample), so the cache is deterministic.
    Images are batched by size; results come back on the CPU in ``dtype``.
    """
    shift = vae.config.shift_factor or 0.0
    scale = vae.config.scaling_factor
    latents: list[torch.Tensor | None] = [None] * len(images)
    by_size: dict[Size, list[int]] = {}
    for index, image in enumerate(images):
        by_size.setdefault(image.size, []).append(index)
    for indices in by_size.values():
        for start in range(0, len(indices), settings.SD3_TRAIN_ENCODE_BATCH):
            chunk = indices[start : start + settings.SD3_TRAIN_ENCODE_BATCH]
            pixels = torch.stack([image_to_tensor(images[index]) for index in chunk]).to(device, vae.dtype)
            mean = vae.encode(pixels).latent_dist.mean
            for index, item in zip(chunk, (mean.float() - shift) * scale, strict=True):
                latents[index] = item.to("cpu", dtype)
    return latents


def _encode_latents(
    examples: Sequence[TrainingExample], resolution: int, center_crop: bool, random_flip: bool, vae, device, dtype
) -> dict:
    """What the latent cache holds: each image's bucket, its latents and (with flips) its mirror's latents."""
    images = [example.load() for example in examples]
    sizes = assign_buckets([image.size for image in images], resolution, center_crop=center_crop)
    fitted = [fit_to_bucket(image, size) for image, size in zip(images, sizes, strict=True)]
    if random_flip:
        fitted += [image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for image in fitted]
    encoded = encode_images(vae, fitted, device=device, dtype=dtype)
    return {
        "sizes": [list(size) for size in sizes],
        "latents": encoded[: len(examples)],
        "flipped": encoded[len(examples) :] if random_flip else [],
    }


def precompute(
    examples: Sequence[TrainingExample],
    *,
    resolution: int,
    center_crop: bool,
    random_flip: bool,
    trigger: str,
    extra_prompts: Sequence[str],
    max_sequence_length: int,
    dtype: torch.dtype,
    device: torch.device,
    model_fingerprint: dict,
    cache_dir: Path | None,
    load_text_pipeline: Callable[[], object],
    get_vae: Callable[[], object],
    log: Callable[[str], None] = lambda message: None,
) -> Precomputed:
    """Encode every caption and image once (or read them from ``cache_dir``); see the module docstring.

    ``load_text_pipeline()`` returns an SD3 pipeline holding the text encoders on
    ``device``; it is called only when the text cache misses, and dropped (and
    CUDA memory freed) right after encoding. ``get_vae()`` returns the VAE on
    ``device``; it is called only when the latent cache misses, and the caller
    decides where it goes afterwards.
    """
    # 1. Cache names: text by model and T5 length; latents by model, settings and every file's size and mtime.
    captions = [caption_for_training(example.text, trigger) for example in examples]
    texts = list(dict.fromkeys(captions + list(extra_prompts)))
    dtype_name = str(dtype).removeprefix("torch.")
    text_path = latent_path = None
    if cache_dir is not None:
        text_parts = {"model": model_fingerprint, "t5": max_sequence_length, "dtype": dtype_name}
        image_parts = {
            "model": model_fingerprint,
            "resolution": resolution,
            "center_crop": center_crop,
            "flip": random_flip,
            "ratios": settings.SD3_TRAIN_BUCKET_RATIOS,
            "dtype": dtype_name,
            "files": [[example.file_name, *_file_signature(example.path)] for example in examples],
        }
        text_path = Path(cache_dir) / cache_name("text", text_parts)
        latent_path = Path(cache_dir) / cache_name("latents", image_parts)

    # 2. Text embeddings: one file per model holds every text seen; only new texts are encoded.
    text_cache = _load_cache(text_path) or {}
    missing = [text for text in texts if text not in text_cache]
    if missing:
        log(f"encoding {len(missing)} captions and prompts with the text encoders")
        text_pipeline = load_text_pipeline()
        encoded = encode_texts(
            text_pipeline, missing, max_sequence_length=max_sequence_length, device=device, dtype=dtype
        )
        del text_pipeline
        release_memory()
        text_cache.update({text: [item.prompt_embeds, item.pooled_prompt_embeds] for text, item in encoded.items()})
        _save_cache(text_path, text_cache)
    embeddings = {text: PromptEmbedding(*text_cache[text]) for text in texts}

    # 3. Latents, one bucket per image.
    latent_cache = _load_cache(latent_path)
    latents_from_cache = latent_cache is not None
    if latent_cache is None:
        log(f"encoding {len(examples)} images with the VAE")
        latent_cache = _encode_latents(examples, resolution, center_crop, random_flip, get_vae(), device, dtype)
        _save_cache(latent_path, latent_cache)

    # 4. Assemble.
    cached = [
        CachedExample(
            file_name=example.file_name,
            text=caption,
            size=(int(latent_cache["sizes"][index][0]), int(latent_cache["sizes"][index][1])),
            latents=latent_cache["latents"][index],
            flipped_latents=latent_cache["flipped"][index] if random_flip else None,
            prompt_embeds=embeddings[caption].prompt_embeds,
            pooled_prompt_embeds=embeddings[caption].pooled_prompt_embeds,
        )
        for index, (example, caption) in enumerate(zip(examples, captions, strict=True))
    ]
    prompts = {prompt: embeddings[prompt] for prompt in extra_prompts}
    return Precomputed(
        examples=cached,
        prompts=prompts,
        text_from_cache=not missing,
        latents_from_cache=latents_from_cache,
    )


def collate_examples(items: list[CachedExample]) -> dict:
    """The ``DataLoader``'s collate: a micro-batch of one bucket as CPU tensors (accelerate moves them), with the
    mirrored latents too when flips are on; the training loop draws which images it flips."""
    batch = stack_batch(items, "cpu", items[0].latents.dtype)
    if items[0].flipped_latents is not None:
        batch["flipped_latents"] = torch.stack([item.flipped_latents for item in items])
    return batch


def stack_batch(items: list[CachedExample], device, dtype, flips: list[bool] | None = None) -> dict:
    """A micro-batch of precomputed examples (one bucket) as tensors on ``device``."""
    latents = [
        item.flipped_latents if flips is not None and flips[index] else item.latents for index, item in enumerate(items)
    ]
    return {
        "latents": torch.stack(latents).to(device, dtype),
        "prompt_embeds": torch.stack([item.prompt_embeds for item in items]).to(device, dtype),
        "pooled_prompt_embeds": torch.stack([item.pooled_prompt_embeds for item in items]).to(device, dtype),
    }
