"""Shared benchmark plumbing: real-size random-weight models, timing, result files.

Compute does not depend on weight values, so a model built from the real
config with random weights times like the real checkpoint. Results go to
``bench/results/<name>.json`` with the machine and model size recorded, so
every figure quoted elsewhere can be traced to a rerunnable command.
"""

from __future__ import annotations

import datetime
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pipelines.catalog import CATALOG, MODEL_CONFIGS_DIR
from pipelines.runtime import machine_description

__all__ = ["machine_description", "real_size_blip_captioner", "real_size_sd3", "interleaved_medians", "write_results"]

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def real_size_blip_captioner(dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """BLIP base (captioning) from its real config and preprocessor, with random weights.

    The real vocab.txt is not shipped; a same-size stand-in vocabulary (30,522
    entries, BERT's special ids at their real positions) keeps decoding work equal.
    """
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    from pipelines.blip.captioner import BlipCaptioner

    config_dir = MODEL_CONFIGS_DIR / "Salesforce__blip-image-captioning-base"
    config = BlipConfig.from_pretrained(config_dir)
    vocab = {f"w{index}": index for index in range(30522)}
    for token, index in {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}.items():
        del vocab[f"w{index}"]
        vocab[token] = index
    tokenizer = BertTokenizer(vocab=vocab, model_max_length=512)
    processor = BlipProcessor(image_processor=BlipImageProcessor.from_pretrained(config_dir), tokenizer=tokenizer)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config).to(device=device, dtype=dtype).eval()
    return BlipCaptioner(model=model, processor=processor, source="real-size random weights")


def interleaved_medians(functions: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per function, timing them in turn so drift on a noisy machine hits all alike."""
    for function in functions.values():
        function()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            started = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def write_results(name: str, model_size: str, rows: list[dict]) -> Path:
    """Save rows with their provenance to bench/results/<name>.json; return the path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    payload = {
        "benchmark": name,
        "machine": machine_description(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "model_size": model_size,
        "torch": torch.__version__,
        "rows": rows,
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def real_size_sd3(model_key: str, device: torch.device, dtype: torch.dtype):
    """SD3.5 from the real configs, random weights created directly on ``device`` in ``dtype``."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from pipelines.tiny import tiny_clip_tokenizer, tiny_t5_tokenizer

    folder = MODEL_CONFIGS_DIR / CATALOG[model_key].config_dir

    def config(component: str) -> dict:
        return json.loads((folder / component / "config.json").read_text())

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            transformer = SD3Transformer2DModel.from_config(config("transformer"))
            vae = AutoencoderKL.from_config(config("vae"))
            text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**config("text_encoder")))
            text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**config("text_encoder_2")))
            text_encoder_3 = T5EncoderModel(T5Config(**config("text_encoder_3")))
    finally:
        torch.set_default_dtype(previous)
    # The real vocabularies are not shipped; the tiny tokenizers give valid ids, and the
    # pipeline pads CLIP to 77 and T5 to max_sequence_length, so the compute is the real one.
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(
            json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        ),
        vae=vae,
        text_encoder=text_encoder.eval(),
        tokenizer=tiny_clip_tokenizer(pad_token="<|endoftext|>"),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer_2=tiny_clip_tokenizer(pad_token="!"),
        text_encoder_3=text_encoder_3.eval(),
        tokenizer_3=tiny_t5_tokenizer(),
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
