"""The two models in one loop: prompt -> SD3.5 image -> BLIP caption -> BLIP scores.

``prompt_round_trip`` draws a prompt, captions the image and asks BLIP how
well the image fits the prompt and its own caption; ``image_round_trip``
captions an upload and draws the caption again. ``run_evaluation`` scores a
prompt list per model and seed into a resumable JSON file that the Scoreboard
reads.

Prompt adherence here is BLIP's view: the mean log-probability per token of
the prompt given the image (the same score as in the Match tab), plus the
retrieval model's ITM probability when asked for. It measures whether BLIP
would describe the image with the prompt's words, not human judgement.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import json
import re
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from pipelines.blip.captioner import CaptionRequest
from pipelines.blip.matching import ImageTextMatcher, MatchRequest, TextScore
from pipelines.catalog import CATALOG
from pipelines.sd3.generation import GenerationService
from pipelines.sd3.jobs import GenerationOutcome, GenerationRequest, ImageToImageRequest
from pipelines.sd3.text_to_image import GenerateRequest, GenerateResult, model_key, size_limits

PROMPTS_DIR = Path(__file__).resolve().parents[2] / "assets" / "prompts"
_WORD = re.compile(r"[\w']+")


def word_diff(prompt: str, caption: str) -> list[tuple[str, str]]:
    """Words of both texts aligned: (word, "both" | "prompt" | "caption"), in reading order.

    Words are compared lower-cased without punctuation, as BLIP's uncased
    tokenizer sees them.
    """
    left = [word.lower() for word in _WORD.findall(prompt)]
    right = [word.lower() for word in _WORD.findall(caption)]
    pieces: list[tuple[str, str]] = []
    for tag, low, high, start, end in difflib.SequenceMatcher(a=left, b=right, autojunk=False).get_opcodes():
        if tag == "equal":
            pieces += [(word, "both") for word in left[low:high]]
            continue
        pieces += [(word, "prompt") for word in left[low:high]]
        pieces += [(word, "caption") for word in right[start:end]]
    return pieces


@dataclass(frozen=True)
class PromptRoundTrip:
    generation: GenerationOutcome  # the image, its PNG and the generation's details
    caption: str
    caption_score: float  # the caption's own score (mean token log-prob)
    prompt_fit: TextScore  # how well the image fits the prompt, in BLIP's eyes
    caption_fit: TextScore  # how well it fits BLIP's own caption
    diff: list[tuple[str, str]]
    second_opinion_note: str

    @property
    def generated(self) -> GenerateResult:
        return self.generation.result

    @property
    def image(self) -> Image.Image:
        return self.generated.images[0]

    def details(self) -> dict:
        """The generation's details dict plus the caption and both scores (``/roundtrip``'s last output)."""
        return {
            **self.generation.details,
            "caption": self.caption,
            "caption_score": self.caption_score,
            "prompt_fit": _score_details(self.prompt_fit),
            "caption_fit": _score_details(self.caption_fit),
            "second_opinion_note": self.second_opinion_note,
        }


@dataclass(frozen=True)
class ImageRoundTrip:
    caption: str  # BLIP's caption of the image, the prompt the model drew
    generation: GenerationOutcome
    fit: TextScore  # how well the caption fits the new image

    @property
    def generated(self) -> GenerateResult:
        return self.generation.result

    def details(self) -> dict:
        """The generation's details dict plus the caption and its fit (``/roundtrip_image``'s last output)."""
        return {**self.generation.details, "caption": self.caption, "caption_fit": _score_details(self.fit)}


def _score_details(score: TextScore) -> dict:
    return {
        "text": score.text,
        "mean_logprob": score.mean_logprob,
        "num_tokens": score.num_tokens,
        "itm_probability": score.itm_probability,
    }


def _generation_service(generation) -> GenerationService:
    """``generation`` itself, or a service over a bare ModelManager (scripts and the command line)."""
    return generation if isinstance(generation, GenerationService) else GenerationService(generation)


def prompt_round_trip(
    generation: GenerationService,
    request: GenerationRequest | GenerateRequest,
    matcher: ImageTextMatcher,
    *,
    visitor: str | None = None,
    caption_request: CaptionRequest | None = None,
    second_opinion: bool = False,
    on_step: Callable[[int, int, list | None], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    notify: Callable[[str], None] | None = None,
    folder: Path | None = None,
    save: bool = True,
) -> PromptRoundTrip:
    """Draw ``request.prompt`` (one image) through the generation service, caption it, and score
    prompt and caption against it. ``save``/``folder``: where the PNG goes (see ``GenerationService.finish``)."""
    generation = _generation_service(generation)
    request = dataclasses.replace(_as_generation_request(request), num_images=1)
    outcome = generation(
        request, owner=visitor, notify=notify, on_step=on_step, should_stop=should_stop, folder=folder, save=save
    )
    image = outcome.images[0]
    prompt = outcome.result.request.prompt  # what the encoders read: LoRA tags out, trigger words in
    best = matcher.captioner.caption(image, caption_request).captions[0]
    matched = matcher.match([image], MatchRequest(texts=(prompt, best.text), second_opinion=second_opinion))
    prompt_fit, caption_fit = matched.scores[0]
    return PromptRoundTrip(
        generation=outcome,
        caption=best.text,
        caption_score=best.score,
        prompt_fit=prompt_fit,
        caption_fit=caption_fit,
        diff=word_diff(prompt, best.text),
        second_opinion_note=matched.second_opinion_note,
    )


def image_round_trip(
    image: Image.Image,
    generation: GenerationService,
    matcher: ImageTextMatcher,
    request: GenerationRequest | None = None,
    *,
    visitor: str | None = None,
    caption_request: CaptionRequest | None = None,
    notify: Callable[[str], None] | None = None,
    folder: Path | None = None,
    save: bool = True,
    strength: float | None = None,
) -> ImageRoundTrip:
    """Caption ``image``, draw the caption with ``request``'s settings (its prompt is replaced by the
    caption; its LoRAs apply), and score the caption against the new image.

    Without a width and height the image's shape is drawn at the model's default area. With a
    ``strength``, the caption redraws ``image`` itself (image to image, at the image's size).
    """
    generation = _generation_service(generation)
    request = request or GenerationRequest(prompt="")
    caption = matcher.captioner.caption(image, caption_request).captions[0].text
    request = dataclasses.replace(request, prompt=caption, num_images=1)
    if strength is not None:
        job = ImageToImageRequest(image, request, strength)
    else:
        if request.width is None or request.height is None:
            side = size_limits(CATALOG[model_key(request.model)], generation.tiny)["default_size"]
            width, height = image.size
            scale = (side * side / (width * height)) ** 0.5  # the model's usual area, the image's shape
            request = dataclasses.replace(request, width=width * scale, height=height * scale)
        job = request
    outcome = generation(job, owner=visitor, notify=notify, folder=folder, save=save)
    fit = matcher.match([outcome.images[0]], MatchRequest(texts=(caption,))).scores[0][0]
    return ImageRoundTrip(caption=caption, generation=outcome, fit=fit)


def _as_generation_request(request: GenerationRequest | GenerateRequest) -> GenerationRequest:
    if isinstance(request, GenerationRequest):
        return request
    return GenerationRequest(**dataclasses.asdict(request))


# ----------------------------------------------------------------------------- evaluation


def load_prompts(paths: Iterable[Path] | None = None) -> list[tuple[str, str]]:
    """(category, prompt) pairs from prompt files (the file name is the category); the built-in set by default."""
    paths = sorted(PROMPTS_DIR.glob("*.txt")) if paths is None else [Path(path) for path in paths]
    pairs = []
    for path in paths:
        if not path.is_file():
            raise ValueError(f"Prompt file {path} does not exist; give .txt files with one prompt per line.")
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                pairs.append((path.stem, line))
    if not pairs:
        raise ValueError("The prompt files hold no prompts; write one prompt per line.")
    return pairs


def summarize(rows: list[dict]) -> dict:
    """Per model and category: mean, spread (population std) and count of prompt adherence."""
    groups: dict[str, dict[str, list[float]]] = {}
    for row in rows:
        groups.setdefault(row["model"], {}).setdefault(row["category"], []).append(row["prompt_mean_logprob"])
        groups[row["model"]].setdefault("all", []).append(row["prompt_mean_logprob"])
    return {
        model: {
            category: {"mean": statistics.fmean(values), "std": statistics.pstdev(values), "n": len(values)}
            for category, values in categories.items()
        }
        for model, categories in groups.items()
    }


def check_evaluation_size(models: list[str], seeds: list[int], prompts: list[tuple[str, str]], max_images: int) -> int:
    """The number of images an evaluation run draws (models x seeds x prompts); ValueError past ``max_images``."""
    images = len(models) * len(seeds) * len(prompts)
    if images > max_images:
        raise ValueError(
            f"{len(models)} model(s) x {len(seeds)} seed(s) x {len(prompts)} prompts is {images} images; one "
            f"evaluation run draws at most {max_images}. Choose fewer models, seeds or categories."
        )
    return images


def run_evaluation(
    generation,
    matcher: ImageTextMatcher,
    prompts: list[tuple[str, str]],
    *,
    models: list[str],
    seeds: list[int],
    out_path: Path,
    steps: int | None = None,
    side: int | None = None,
    machine: str = "",
    model_size: str = "",
    on_progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    max_images: int | None = None,
) -> dict:
    """Score every (model, seed, prompt) into ``out_path``; rows already there are skipped (resume).

    ``generation`` is the Studio's GenerationService (or a ModelManager, for a service of its own):
    each image is drawn in the instance's memory mode, as /generate draws it. The file is rewritten after every image, so an interrupted run keeps what
    it did. Returns the file's content. ``max_images`` (None: no limit, as on
    the command line) refuses a larger run before anything is drawn.
    """
    if max_images is not None:
        check_evaluation_size(models, seeds, prompts, max_images)
    generation = _generation_service(generation)
    out_path = Path(out_path)
    existing = json.loads(out_path.read_text()) if out_path.is_file() else {}
    rows: list[dict] = list(existing.get("rows", []))
    done = {(row["model"], row["seed"], row["prompt"]) for row in rows}
    jobs = [(model, seed, category, prompt) for model in models for seed in seeds for category, prompt in prompts]
    settings_used = {"steps": steps, "side": side, "models": models, "seeds": seeds}
    for number, (model, seed, category, prompt) in enumerate(jobs, start=1):
        if should_stop is not None and should_stop():
            break
        key = model_key(model)
        if (key, seed, prompt) not in done:
            request = GenerationRequest(prompt=prompt, model=model, seed=seed, steps=steps, width=side, height=side)
            trip = prompt_round_trip(generation, request, matcher, save=False)
            rows.append(
                {
                    "model": key,
                    "seed": seed,
                    "category": category,
                    "prompt": prompt,
                    "caption": trip.caption,
                    "prompt_mean_logprob": trip.prompt_fit.mean_logprob,
                    "caption_mean_logprob": trip.caption_fit.mean_logprob,
                    "steps": trip.generated.request.steps,
                    "size": f"{trip.generated.request.width}x{trip.generated.request.height}",
                    "seconds": trip.generated.seconds,
                }
            )
            done.add((key, seed, prompt))
            _write_evaluation(out_path, rows, settings_used, machine, model_size)
        if on_progress is not None:
            on_progress(number, len(jobs))
    return _write_evaluation(out_path, rows, settings_used, machine, model_size)


def _write_evaluation(path: Path, rows: list[dict], settings_used: dict, machine: str, model_size: str) -> dict:
    payload = {
        "benchmark": "roundtrip-eval",
        "machine": machine,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "model_size": model_size,
        "settings": settings_used,
        "score": "mean log-probability per token of the prompt given the image, by BLIP base (higher is better)",
        "rows": rows,
        "summary": summarize(rows),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(payload, indent=2) + "\n")
    temporary.replace(path)
    return payload


def evaluation_table(payload: dict) -> list[list]:
    """Rows of (model, category, mean, std, n) from an evaluation file's summary."""
    return [
        [model, category, round(stats["mean"], 4), round(stats["std"], 4), stats["n"]]
        for model, categories in sorted(payload.get("summary", {}).items())
        for category, stats in sorted(categories.items())
    ]
