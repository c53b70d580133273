"""Image-text matching: how well each candidate text fits an image, in BLIP's own terms.

Two kinds of score:

- **Likelihood** (always): the captioning model's image-grounded log-probability
  of the text, teacher-forced as ``[DEC] + word pieces + [SEP]``, over the
  text's word pieces and the closing ``[SEP]``; as a mean per token and as a
  total. It is exactly how ``pipelines.blip.captioner`` scores a caption, so a caption
  the model finished (with [SEP], before the token limit) gets the same score
  here; a caption cut at the limit was scored without [SEP] there. Both are <= 0; higher fits
  better. The mean compares texts of different lengths fairly; the total is the
  log-probability of the whole text and favours short texts.
- **Retrieval** (optional second opinion): BLIP's retrieval model
  (``Salesforce/blip-itm-base-coco``): the ITM head's probability that image
  and text match (0 to 1), and the ITC cosine similarity of their projected
  embeddings (-1 to 1).

Each image is encoded once (and cached, see ``pipelines.blip.feature_cache``), and
all the texts of a request are scored in one padded decoder pass. Scores are
always the base model's: a LoRA adapter loaded for captioning is switched off
(under the captioner's decoder lock) while texts are scored.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from pipelines import settings
from pipelines.blip.captioner import BlipCaptioner
from pipelines.blip.feature_cache import ImageFeatureCache, model_identity
from pipelines.errors import ModelLoadError
from pipelines.validation import strip_control_characters

logger = logging.getLogger(__name__)

RANKING_LABELS = {
    "mean": "mean log-prob per token",
    "total": "total log-prob",
    "itm": "ITM match probability",
    "itc": "ITC cosine similarity",
}


def split_texts(texts: str | Sequence[str]) -> tuple[str, ...]:
    """Candidate texts from one-per-line text (or a list), whitespace tidied, blank lines dropped.

    Duplicates are kept: each line is a candidate, and the same text scores the same.
    """
    lines = (
        texts.splitlines() if isinstance(texts, str) else [line for text in texts for line in str(text).splitlines()]
    )
    return tuple(cleaned for cleaned in (" ".join(line.split()) for line in lines) if cleaned)


@dataclass(frozen=True)
class MatchRequest:
    """What to match: candidate texts (a list, or one per line) and how to rank them."""

    texts: str | tuple[str, ...] = ()
    rank_by: str = settings.DEFAULT_MATCH_RANKING  # mean | total | itm | itc
    second_opinion: bool = False  # also ask BLIP's retrieval model for ITM and ITC

    def validated(self) -> MatchRequest:
        """This request with the texts split and cleaned; ValueError naming what to fix."""
        if self.texts is None or not isinstance(self.texts, (str, list, tuple)):
            raise ValueError("texts must be text with one candidate per line, or a list of strings.")
        texts = split_texts(strip_control_characters(self.texts))
        if not texts:
            raise ValueError("Type at least one candidate text, one per line (e.g. 'a cat on a sofa').")
        if len(texts) > settings.MAX_MATCH_TEXTS:
            raise ValueError(
                f"{len(texts)} candidate texts were given; score at most {settings.MAX_MATCH_TEXTS} at a time."
            )
        for number, text in enumerate(texts, start=1):
            if len(text) > settings.MAX_MATCH_TEXT_CHARS:
                raise ValueError(
                    f"Text {number} has {len(text)} characters; keep each candidate under "
                    f"{settings.MAX_MATCH_TEXT_CHARS} (a caption-length sentence)."
                )
        if self.rank_by not in settings.MATCH_RANKINGS:
            raise ValueError(f"Unknown ranking {self.rank_by!r}; choose one of: {', '.join(settings.MATCH_RANKINGS)}.")
        second_opinion = bool(self.second_opinion)
        if self.rank_by in ("itm", "itc") and not second_opinion:
            raise ValueError(
                f"Ranking by {self.rank_by} needs the retrieval model: turn on second_opinion, or rank by mean or total."
            )
        return dataclasses.replace(self, texts=texts, second_opinion=second_opinion)


@dataclass(frozen=True)
class TextScore:
    text: str
    mean_logprob: float  # per scored token (<= 0; higher fits better)
    total_logprob: float  # log-probability of the whole text (<= 0)
    num_tokens: int  # scored tokens: the text's word pieces + [SEP]
    itm_probability: float | None = None  # retrieval model: P(match), 0 to 1
    itc_similarity: float | None = None  # retrieval model: cosine, -1 to 1

    def value(self, rank_by: str) -> float:
        """The score ``rank_by`` names; -inf where the retrieval model gave none."""
        value = {
            "mean": self.mean_logprob,
            "total": self.total_logprob,
            "itm": self.itm_probability,
            "itc": self.itc_similarity,
        }[rank_by]
        return float("-inf") if value is None else value


@dataclass(frozen=True)
class MatchResult:
    texts: tuple[str, ...]
    image_names: list[str]
    scores: list[list[TextScore]]  # scores[image][text], in input order
    rank_by: str  # the ranking actually used (mean when the retrieval model was wanted but missing)
    request: MatchRequest  # the validated request
    second_opinion_note: str  # why the retrieval model's scores are missing; "" when they are there or not asked
    seconds: float

    def ranked_texts(self, image_index: int = 0) -> list[tuple[int, TextScore]]:
        """(text index, score) for one image, best first; ties keep input order."""
        row = self.scores[image_index]
        return sorted(enumerate(row), key=lambda item: -item[1].value(self.rank_by))

    def ranked_images(self, text_index: int = 0) -> list[tuple[int, TextScore]]:
        """(image index, score) for one text, best first; ties keep input order."""
        column = [(index, row[text_index]) for index, row in enumerate(self.scores)]
        return sorted(column, key=lambda item: -item[1].value(self.rank_by))


class BlipRetrieval:
    """A loaded ``BlipForImageTextRetrieval`` with its processor: ITM probabilities and ITC similarities."""

    def __init__(self, model, processor, source: str = "", feature_cache: ImageFeatureCache | None = None) -> None:
        self.model = model
        self.processor = processor
        self.source = source
        self.feature_cache = feature_cache if feature_cache is not None else ImageFeatureCache()

    @property
    def device(self) -> torch.device:
        return self.model.device

    def encode_image(self, image: Image.Image) -> torch.Tensor:
        """The retrieval model's own vision features for one image, (1, 1 + grid², hidden), cached."""
        pixel_values = self.processor(images=[image], return_tensors="pt")["pixel_values"]
        identity = model_identity(self.model, self.source)
        return self.feature_cache.features(identity, pixel_values, self._run_vision_encoder)

    def _run_vision_encoder(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.vision_model(pixel_values=pixel_values.to(self.device, self.model.dtype))[0]

    @torch.inference_mode()
    def score(self, image: Image.Image, texts: Sequence[str]) -> list[tuple[float, float]]:
        """(ITM match probability, ITC cosine similarity) for each text against ``image``.

        The same computation as ``BlipForImageTextRetrieval.forward`` with
        ``use_itm_head=True`` and ``False``, but the image is encoded once for all
        texts and both heads share it.
        """
        image_embeds = self.encode_image(image)
        max_length = self.model.config.text_config.max_position_embeddings
        tokens = self.processor.tokenizer(
            list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        ).to(self.device)
        batch = tokens["input_ids"].shape[0]
        expanded = image_embeds.expand(batch, -1, -1)
        image_mask = torch.ones(expanded.shape[:-1], dtype=torch.long, device=self.device)
        encoder = self.model.text_encoder
        # ITM: the text encoder attends to the image; its [CLS] state goes to a 2-way head.
        fused = encoder(
            input_ids=tokens["input_ids"],
            attention_mask=tokens["attention_mask"],
            encoder_hidden_states=expanded,
            encoder_attention_mask=image_mask,
        ).last_hidden_state
        itm = self.model.itm_head(fused[:, 0]).float().softmax(dim=-1)[:, 1]
        # ITC: text alone and image alone, each projected and normalised; their dot product.
        text_only = encoder(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
        image_feature = torch.nn.functional.normalize(self.model.vision_proj(image_embeds[:, 0]).float(), dim=-1)
        text_features = torch.nn.functional.normalize(self.model.text_proj(text_only[:, 0]).float(), dim=-1)
        itc = (text_features @ image_feature.T).squeeze(-1)
        return list(zip(itm.tolist(), itc.tolist(), strict=True))


class ImageTextMatcher:
    """Scores candidate texts against images with the captioner, and optionally the retrieval model.

    ``retrieval`` is called only when a request asks for the second opinion; a
    ModelLoadError from it becomes a note in the result, never a failure.
    """

    def __init__(self, captioner: BlipCaptioner, retrieval: Callable[[], BlipRetrieval] | None = None) -> None:
        self.captioner = captioner
        self.retrieval = retrieval

    def match(
        self, images: list[Image.Image], request: MatchRequest, image_names: list[str] | None = None
    ) -> MatchResult:
        """Score every text of ``request`` against every image (RGB PIL images; the first is the main one)."""
        # 1. Check inputs, including what only the tokenizer can tell (empty or too long texts).
        request = request.validated()
        if not images:
            raise ValueError("Upload an image first.")
        if len(images) > settings.MAX_MATCH_IMAGES:
            raise ValueError(f"{len(images)} images were given; rank at most {settings.MAX_MATCH_IMAGES} at a time.")
        names = list(image_names) if image_names is not None else [f"image {n}" for n in range(1, len(images) + 1)]
        token_ids = [self.captioner.text_ids(text, f"Text {n}") for n, text in enumerate(request.texts, start=1)]
        started = time.perf_counter()

        # 2. The second opinion, if asked for and available.
        retrieval, note, rank_by = None, "", request.rank_by
        if request.second_opinion:
            if self.retrieval is None:
                note = "The retrieval model is not set up in this app."
            else:
                try:
                    retrieval = self.retrieval()
                except ModelLoadError as error:
                    logger.warning("match: no second opinion: %s", error)
                    note = str(error)
            if retrieval is None and rank_by in ("itm", "itc"):
                rank_by = "mean"

        # 3. Score: one image encoding and one decoder pass per image.
        scores = []
        for image in images:
            image_embeds = self.captioner.encode_images([image])
            totals, means, counts = self.text_logprobs(image_embeds, token_ids)
            retrieved = retrieval.score(image, request.texts) if retrieval is not None else None
            scores.append(
                [
                    TextScore(
                        text=text,
                        mean_logprob=means[index],
                        total_logprob=totals[index],
                        num_tokens=counts[index],
                        itm_probability=retrieved[index][0] if retrieved else None,
                        itc_similarity=retrieved[index][1] if retrieved else None,
                    )
                    for index, text in enumerate(request.texts)
                ]
            )
        return MatchResult(
            texts=request.texts,
            image_names=names,
            scores=scores,
            rank_by=rank_by,
            request=request,
            second_opinion_note=note,
            seconds=time.perf_counter() - started,
        )

    @torch.inference_mode()
    def text_logprobs(
        self, image_embeds: torch.Tensor, token_ids: list[list[int]]
    ) -> tuple[list[float], list[float], list[int]]:
        """Total and mean log-probability, and scored-token count, of each text given one image.

        ``image_embeds`` is (1, 1 + grid², hidden); ``token_ids`` are word pieces
        without specials. Texts are right-padded to one batch; padded positions
        are masked out of attention and out of the sums, so each text scores as
        it would alone.
        """
        captioner = self.captioner
        sequences = [[captioner.bos_token_id, *ids, captioner.eos_token_id] for ids in token_ids]
        length = max(len(sequence) for sequence in sequences)
        input_ids = torch.full((len(sequences), length), captioner.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, sequence in enumerate(sequences):
            input_ids[row, : len(sequence)] = torch.tensor(sequence)
            attention_mask[row, : len(sequence)] = 1
        input_ids, attention_mask = input_ids.to(captioner.device), attention_mask.to(captioner.device)
        with captioner.using_adapter(None):  # BLIP's own judgement, whatever adapter a caption request uses
            logits = captioner.model.text_decoder(
                input_ids=input_ids,
                attention_mask=attention_mask,
                encoder_hidden_states=image_embeds.expand(len(sequences), -1, -1),
                use_cache=False,
            ).logits
        # Position t predicts token t + 1; log-softmax by logsumexp, without a second vocabulary-sized copy.
        logits = logits[:, :-1].float()
        targets = input_ids[:, 1:]
        token_logprobs = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(dim=-1)
        scored = attention_mask[:, 1:].to(token_logprobs.dtype)
        totals = (token_logprobs * scored).sum(dim=1)
        counts = scored.sum(dim=1)
        means = totals / counts
        return totals.tolist(), means.tolist(), [int(count) for count in counts.tolist()]
