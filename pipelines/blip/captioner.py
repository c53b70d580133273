"""BLIP captioning with every decoding strategy, and a score for each caption.

Every caption is scored the same way whatever the strategy: the mean
log-probability, under the model's own (unprocessed) distribution, of the
tokens it generated, end-of-caption token included. Higher is better; 0 is the
maximum. Beam search's internal score is length-penalised and sampling's is
temperature-warped, so neither would compare across strategies.

A captioner may carry LoRA adapters on its text decoder (``pipelines.blip.adapters``).
Which one is active is state of the shared model, so every decoder pass runs under
``using_adapter(name)``: it holds the captioner's decoder lock, switches to the
adapter (or to the base model for ``None``) and puts the previous state back.
"""

from __future__ import annotations

import dataclasses
import random
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from PIL import Image
from transformers import LogitsProcessorList

from pipelines import settings
from pipelines.blip.diverse_beam import diverse_beam_search
from pipelines.blip.feature_cache import ImageFeatureCache, model_identity
from pipelines.blip.seeded_sampling import SeededSampler, row_seeds
from pipelines.settings import CaptionStrategy
from pipelines.validation import as_float, as_int

# What the Caption and Batch tabs call the strategies and every decoding control; the sentences
# below name the controls as the user sees them (components/decoding builds its controls from these).
STRATEGY_LABELS = {
    CaptionStrategy.GREEDY: "Greedy",
    CaptionStrategy.BEAM: "Beam search",
    CaptionStrategy.DIVERSE_BEAM: "Diverse beam search",
    CaptionStrategy.SAMPLING: "Sampling (top-k / top-p)",
}
FIELD_LABELS = {
    "num_captions": "Captions",
    "num_beams": "Beams",
    "length_penalty": "Length penalty",
    "num_beam_groups": "Beam groups",
    "diversity_penalty": "Diversity penalty",
    "top_k": "Top-k",
    "top_p": "Top-p",
    "temperature": "Temperature",
    "seed": "Seed",
    "min_new_tokens": "Min tokens",
    "max_new_tokens": "Max tokens",
    "repetition_penalty": "Repetition penalty",
    "no_repeat_ngram_size": "No-repeat n-gram",
}


def _in_range(name: str, value, *, high: float | None = None):
    """``value`` checked against ``settings.CAPTION_RANGES[name]`` (a whole number when its step is)."""
    limits = settings.CAPTION_RANGES[name]
    high = limits.high if high is None else high
    shown = f"{FIELD_LABELS[name]} ({name})"  # the control's label for the page, the parameter for the API
    if isinstance(limits.step, int):
        return as_int(shown, value, limits.low, high)
    return as_float(shown, value, limits.low, high, low_open=limits.low_open)


@dataclass(frozen=True)
class CaptionRequest:
    """How to caption. Fields that do not apply to ``strategy`` are ignored."""

    strategy: CaptionStrategy = settings.DEFAULT_CAPTION_STRATEGY  # a CaptionStrategy or its name
    prefix: str = settings.DEFAULT_CAPTION_PREFIX  # conditional captioning starts from this text
    num_captions: int = 1
    num_beams: int = settings.DEFAULT_NUM_BEAMS  # beam and diverse_beam
    length_penalty: float = settings.DEFAULT_LENGTH_PENALTY  # beam and diverse_beam; >1 favours longer
    early_stopping: bool = True  # beam: stop once num_beams captions are finished
    num_beam_groups: int = settings.DEFAULT_NUM_BEAM_GROUPS  # diverse_beam
    diversity_penalty: float = settings.DEFAULT_DIVERSITY_PENALTY  # diverse_beam
    top_k: int = settings.DEFAULT_TOP_K  # sampling; 0 disables
    top_p: float = settings.DEFAULT_TOP_P  # sampling; 1 disables
    temperature: float = settings.DEFAULT_TEMPERATURE  # sampling
    seed: int = 0  # sampling: caption i uses seed + i; -1 picks a random seed, reported back
    min_new_tokens: int = settings.DEFAULT_MIN_NEW_TOKENS
    max_new_tokens: int = settings.DEFAULT_MAX_NEW_TOKENS
    repetition_penalty: float = settings.DEFAULT_REPETITION_PENALTY
    no_repeat_ngram_size: int = settings.DEFAULT_NO_REPEAT_NGRAM

    def validated(self) -> CaptionRequest:
        """This request with numbers coerced, the prefix cleaned, the strategy a CaptionStrategy and a
        concrete seed.

        Raises ValueError naming the bad value and the allowed range (``settings.CAPTION_RANGES``, which
        the UI's sliders read too). API callers can send anything, so nothing here trusts the sliders.
        """
        if self.strategy not in settings.CAPTION_STRATEGIES:
            raise ValueError(
                f"Unknown decoding strategy {self.strategy!r}; choose one of: {', '.join(settings.CAPTION_STRATEGIES)}."
            )
        strategy = CaptionStrategy(self.strategy)
        num_captions = _in_range("num_captions", self.num_captions)
        max_new_tokens = _in_range("max_new_tokens", self.max_new_tokens)
        min_new_tokens = _in_range("min_new_tokens", self.min_new_tokens, high=max_new_tokens)
        prefix = " ".join(str(self.prefix or "").split())
        if len(prefix) > settings.MAX_CAPTION_PREFIX_CHARS:
            raise ValueError(
                f"The caption prefix has {len(prefix)} characters; keep it under "
                f"{settings.MAX_CAPTION_PREFIX_CHARS} (a few words such as 'a picture of')."
            )
        captions, beams, groups = (FIELD_LABELS[name] for name in ("num_captions", "num_beams", "num_beam_groups"))
        if strategy == CaptionStrategy.GREEDY and num_captions > 1:
            raise ValueError(
                f"{STRATEGY_LABELS[strategy]} always gives one caption; set {captions} (num_captions) to 1, or "
                f"choose {STRATEGY_LABELS[CaptionStrategy.BEAM]} or {STRATEGY_LABELS[CaptionStrategy.SAMPLING]} "
                "to get several."
            )
        num_beams = _in_range("num_beams", self.num_beams)
        if strategy in settings.BEAM_STRATEGIES and num_captions > num_beams:
            raise ValueError(
                f"Beam search returns at most one caption per beam: raise {beams} (num_beams) to "
                f"{num_captions} or set {captions} (num_captions) to {num_beams}."
            )
        num_beam_groups = _in_range("num_beam_groups", self.num_beam_groups)
        if strategy == CaptionStrategy.DIVERSE_BEAM and num_beams % num_beam_groups:
            raise ValueError(
                f"{STRATEGY_LABELS[strategy]} needs {beams} (num_beams = {num_beams}) to be a multiple of "
                f"{groups} (num_beam_groups = {num_beam_groups}): e.g. 6 beams in 3 groups."
            )
        seed = _in_range("seed", self.seed)
        if seed == -1:
            seed = random.randint(0, settings.MAX_SEED)
        return dataclasses.replace(
            self,
            strategy=strategy,
            prefix=prefix,
            num_captions=num_captions,
            num_beams=num_beams,
            length_penalty=_in_range("length_penalty", self.length_penalty),
            early_stopping=bool(self.early_stopping),
            num_beam_groups=num_beam_groups,
            diversity_penalty=_in_range("diversity_penalty", self.diversity_penalty),
            top_k=_in_range("top_k", self.top_k),
            top_p=_in_range("top_p", self.top_p),
            temperature=_in_range("temperature", self.temperature),
            seed=seed,
            min_new_tokens=min_new_tokens,
            max_new_tokens=max_new_tokens,
            repetition_penalty=_in_range("repetition_penalty", self.repetition_penalty),
            no_repeat_ngram_size=_in_range("no_repeat_ngram_size", self.no_repeat_ngram_size),
        )

    def with_room_for_captions(self) -> tuple[CaptionRequest, list[str]]:
        """This request made able to return ``num_captions`` captions, and one sentence per change.

        The beams rule: beam searches return at most one caption per beam, so ``num_beams`` is
        raised to ``num_captions`` (for diverse beam search, to the next multiple of
        ``num_beam_groups``); greedy decoding gives one caption, so ``num_captions`` becomes 1.
        The sentences use the controls' on-screen labels. Values that are not numbers are left
        as they are, for ``validated()`` to refuse with its sentence.
        """
        try:
            strategy = CaptionStrategy(self.strategy)
            num_captions = _in_range("num_captions", self.num_captions)
            num_beams = _in_range("num_beams", self.num_beams)
            num_beam_groups = _in_range("num_beam_groups", self.num_beam_groups)
        except ValueError:
            return self, []
        captions, beams, groups = (FIELD_LABELS[name] for name in ("num_captions", "num_beams", "num_beam_groups"))
        label = STRATEGY_LABELS[strategy]
        if strategy == CaptionStrategy.GREEDY and num_captions > 1:
            note = (
                f"{label} always gives one caption, so {captions} was set to 1 instead of {num_captions}; choose "
                f"{STRATEGY_LABELS[CaptionStrategy.BEAM]} or {STRATEGY_LABELS[CaptionStrategy.SAMPLING]} for several."
            )
            return dataclasses.replace(self, num_captions=1), [note]
        if strategy not in settings.BEAM_STRATEGIES or num_captions <= num_beams:
            return self, []
        needed = num_captions
        if strategy == CaptionStrategy.DIVERSE_BEAM:
            needed = -(-num_captions // num_beam_groups) * num_beam_groups  # the next multiple of the groups
            if needed > settings.MAX_NUM_BEAMS:
                return self, []  # validated() says what to change
        note = f"{beams} raised from {num_beams} to {needed}: {label} returns at most one caption per beam."
        if needed > num_captions:
            note = note[:-1] + f", and {needed} is a multiple of the {num_beam_groups} {groups.lower()}."
        return dataclasses.replace(self, num_beams=needed), [note]

    def generate_kwargs(self) -> dict:
        """The ``generate()`` arguments for greedy decoding and sampling (beam searches have their own loop)."""
        common = {
            "max_new_tokens": self.max_new_tokens,
            "min_new_tokens": self.min_new_tokens,
            "repetition_penalty": self.repetition_penalty,
            "no_repeat_ngram_size": self.no_repeat_ngram_size,
            "num_return_sequences": self.num_captions,
            "num_beams": 1,
        }
        if self.strategy == CaptionStrategy.GREEDY:
            return {**common, "do_sample": False}
        if self.strategy == CaptionStrategy.SAMPLING:
            # Sampling draws through SeededSampler (one random stream per caption), so generate()
            # itself runs greedy and picks the token each stream drew; see pipelines/blip/seeded_sampling.py.
            return {**common, "do_sample": False}
        raise ValueError(f"{self.strategy} decoding runs through pipelines.blip.diverse_beam, not generate().")


@dataclass(frozen=True)
class Caption:
    text: str
    score: float  # mean log-probability per generated token (<= 0; higher is better)
    num_tokens: int  # generated tokens, end-of-caption included


@dataclass(frozen=True)
class CaptionResult:
    captions: list[Caption]  # best score first
    request: CaptionRequest  # the validated request, with the seed actually used
    seconds: float  # wall time for this image (a batch's time is split evenly)
    adapter: str | None = None  # the LoRA adapter that wrote the captions; None: the base model


class BlipCaptioner:
    """A loaded BLIP captioning model with its processor.

    ``caption`` handles one image, ``caption_batch`` several in true batches.
    Images must already be RGB ``PIL.Image`` objects (see ``pipelines.images``).
    """

    def __init__(self, model, processor, source: str = "", feature_cache: ImageFeatureCache | None = None) -> None:
        self.model = model
        self.processor = processor
        self.source = source
        self.feature_cache = feature_cache if feature_cache is not None else ImageFeatureCache()
        self.precision: str | None = None  # the --precision variant the loader applied (None: the runtime's dtype)
        # Held for every text-decoder pass and every adapter change: which adapter is
        # active is state of this shared model (re-entrant: a pass may nest another).
        self.decoder_lock = threading.RLock()
        text_config = model.config.text_config
        self.bos_token_id = text_config.bos_token_id  # [DEC]; not in the tokenizer's vocabulary
        self.eos_token_id = text_config.sep_token_id  # BLIP ends captions with [SEP]
        self.pad_token_id = text_config.pad_token_id

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def vision_dtype(self) -> torch.dtype:
        """The ViT's dtype; with ``--precision vision-bf16`` it differs from the decoder's."""
        return self.model.vision_model.embeddings.patch_embedding.weight.dtype

    @property
    def decoder_dtype(self) -> torch.dtype:
        """The dtype the text decoder computes in (its embeddings'; int8 Linears take float input)."""
        return self.model.text_decoder.get_input_embeddings().weight.dtype

    def caption(
        self, image: Image.Image, request: CaptionRequest | None = None, adapter: str | None = None
    ) -> CaptionResult:
        """Caption one image, with the LoRA adapter named ``adapter`` (None: the base model)."""
        return self.caption_batch([image], request, adapter)[0]

    def caption_batch(
        self, images: list[Image.Image], request: CaptionRequest | None = None, adapter: str | None = None
    ) -> list[CaptionResult]:
        """Caption several images in one batch; one CaptionResult per image, in order."""
        if not images:
            return []
        return self.caption_pixels(self.pixel_values(images), request, adapter)

    def pixel_values(self, images: list[Image.Image]) -> torch.Tensor:
        """The processor's (batch, 3, H, W) tensor; cheap CPU work that data-loader workers can do."""
        return self.processor(images=images, return_tensors="pt")["pixel_values"]

    @torch.inference_mode()
    def caption_pixels(
        self, pixel_values: torch.Tensor, request: CaptionRequest | None = None, adapter: str | None = None
    ) -> list[CaptionResult]:
        """Caption a preprocessed batch; one CaptionResult per image, in order."""
        request = (request or CaptionRequest()).validated()
        adapter = self.check_adapter(adapter)
        started = time.perf_counter()

        # 1. Encode the images once; every strategy decodes from these features. Adapters
        #    change only the text decoder, so the vision features (and their cache) serve all.
        image_embeds = self.encode_pixels(pixel_values)
        return self._caption_features(image_embeds, request, adapter, started)

    @torch.inference_mode()
    def caption_embeds(
        self, image_embeds: torch.Tensor, request: CaptionRequest | None = None, adapter: str | None = None
    ) -> list[CaptionResult]:
        """Caption vision features that ``encode_pixels`` already computed, (batch, 1 + grid², hidden)."""
        request = (request or CaptionRequest()).validated()
        adapter = self.check_adapter(adapter)
        return self._caption_features(image_embeds.to(self.device, self.decoder_dtype), request, adapter)

    def _caption_features(
        self, image_embeds: torch.Tensor, request: CaptionRequest, adapter: str | None, started: float | None = None
    ) -> list[CaptionResult]:
        started = time.perf_counter() if started is None else started
        batch_size = image_embeds.shape[0]

        # 2. The decoder's prompt: [DEC] followed by the prefix tokens.
        prompt_ids = self.prompt_ids(request.prefix).repeat(batch_size, 1)

        # 3. Decode with the requested adapter (or the base model), under the decoder lock.
        #    Beam search runs through our own loop too: it equals transformers'
        #    beam search token for token (tests/test_diverse_beam.py) but reorders only the
        #    self-attention cache, not the 577-token image cache, which makes batches of
        #    images several times cheaper on the CPU.
        with self.using_adapter(adapter):
            sequences, token_logprobs, generated = self._decode(prompt_ids, image_embeds, request)

        # 4. Decode text and score; best first within each image.
        texts = self.processor.tokenizer.batch_decode(sequences[:, 1:], skip_special_tokens=True)
        counts = generated.sum(dim=1)
        means = (token_logprobs * generated).sum(dim=1) / counts.clamp(min=1)
        seconds = (time.perf_counter() - started) / batch_size
        results = []
        per_image = request.num_captions
        for index in range(batch_size):
            rows = range(index * per_image, (index + 1) * per_image)
            captions = [
                Caption(text=" ".join(texts[row].split()), score=float(means[row]), num_tokens=int(counts[row]))
                for row in rows
            ]
            captions.sort(key=lambda caption: caption.score, reverse=True)
            results.append(CaptionResult(captions=captions, request=request, seconds=seconds, adapter=adapter))
        return results

    def _decode(self, prompt_ids: torch.LongTensor, image_embeds: torch.Tensor, request: CaptionRequest):
        """(sequences, raw token log-probs, generated mask) for the request's strategy."""
        if request.strategy in settings.BEAM_STRATEGIES:
            groups = request.num_beam_groups if request.strategy == CaptionStrategy.DIVERSE_BEAM else 1
            decoded = diverse_beam_search(
                self.model.text_decoder,
                prompt_ids,
                image_embeds,
                num_beams=request.num_beams,
                num_beam_groups=groups,
                diversity_penalty=request.diversity_penalty if groups > 1 else 0.0,
                max_new_tokens=request.max_new_tokens,
                min_new_tokens=request.min_new_tokens,
                eos_token_id=self.eos_token_id,
                pad_token_id=self.pad_token_id,
                length_penalty=request.length_penalty,
                repetition_penalty=request.repetition_penalty,
                no_repeat_ngram_size=request.no_repeat_ngram_size,
                num_return_sequences=request.num_captions,
                early_stopping=request.early_stopping,
            )
            return decoded.sequences, decoded.token_logprobs, decoded.generated_mask
        return self._generate(prompt_ids, image_embeds, request)

    # ------------------------------------------------------------------------- adapters

    def adapter_layers(self) -> list:
        """The text decoder's LoRA layers (peft tuner layers); empty while no adapter was ever attached."""
        # Adapters come from peft; if this process never imported it, none can be attached,
        # and the caption path stays free of peft's (seconds-long) import.
        tuners = sys.modules.get("peft.tuners.tuners_utils")
        if tuners is None:
            return []
        return [module for module in self.model.text_decoder.modules() if isinstance(module, tuners.BaseTunerLayer)]

    def adapter_names(self) -> list[str]:
        """Names of the LoRA adapters attached to the text decoder, sorted."""
        names: set[str] = set()
        for layer in self.adapter_layers():
            names.update(getattr(layer, "lora_A", {}).keys())
        return sorted(names)

    def check_adapter(self, adapter: str | None) -> str | None:
        """``adapter`` tidied (None or blank: the base model); ValueError if no adapter has that name."""
        if adapter is None or not str(adapter).strip():
            return None
        adapter = str(adapter).strip()
        names = self.adapter_names()
        if adapter not in names:
            loaded = f"the loaded ones are: {', '.join(names)}" if names else "none is loaded yet"
            raise ValueError(
                f"No BLIP adapter named {adapter!r} is loaded ({loaded}); load it first, or leave the adapter "
                "empty for the base model."
            )
        return adapter

    @contextmanager
    def using_adapter(self, adapter: str | None) -> Iterator[None]:
        """Hold the decoder lock with ``adapter`` active (None: the base model); restore the previous state after.

        Everything that runs the text decoder does so inside this block, so a
        caption with one adapter never sees another request's adapter, and
        matching or attention (``None``) always see the base model.
        """
        with self.decoder_lock:
            if adapter is not None:
                self.check_adapter(adapter)  # again under the lock: it may have been removed meanwhile
            layers = self.adapter_layers()
            if not layers:
                yield
                return
            saved = [(list(layer.active_adapters), layer.disable_adapters) for layer in layers]
            grads = [(parameter, parameter.requires_grad) for layer in layers for parameter in layer.parameters()]
            try:
                switch_adapter_layers(layers, adapter)
                yield
            finally:
                for layer, (active, disabled) in zip(layers, saved, strict=True):
                    switch_adapter_layers([layer], None if disabled else active)
                for parameter, requires_grad in grads:  # switching marks adapters trainable; a trainer's stay so
                    parameter.requires_grad_(requires_grad)

    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        """Vision-encoder features, (batch, 1 + grid², hidden)."""
        return self.encode_pixels(self.pixel_values(images))

    def encode_pixels(self, pixel_values: torch.Tensor, *, cache: bool | None = None) -> torch.Tensor:
        """Vision-encoder features for preprocessed pixels, (batch, 1 + grid², hidden).

        ``cache`` (default: only when ``pixel_values`` holds one image) looks each
        image up in ``self.feature_cache`` first and stores what it computes. Single
        images are what the Caption, Match and Attention tabs send, often the same
        one in turn. A batch of several is left out by default: batch captioning sees
        each image once, hashing it would slow a GPU batch down, and storing it would
        only push the images a user is exploring out of the cache. The returned
        tensor may be shared with the cache: read it, never modify it in place.
        """
        if cache is None:
            cache = pixel_values.shape[0] == 1
        if not cache:
            return self._run_vision_encoder(pixel_values)
        identity = model_identity(self.model, self.source)
        return self.feature_cache.features(identity, pixel_values, self._run_vision_encoder)

    def _run_vision_encoder(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The ViT's last hidden state for every image, with no cache involved.

        On the CPU images go through the ViT a few at a time: one 384 px image is
        already 577 tokens, and larger batches only add cache misses (measured:
        1.0 s per image alone, 1.35 s per image in a batch of 8).
        """
        pixel_values = pixel_values.to(self.device, self.vision_dtype)
        chunk = settings.CPU_VISION_CHUNK if self.device.type == "cpu" else pixel_values.shape[0]
        features = [self.model.vision_model(pixel_values=part)[0] for part in pixel_values.split(chunk)]
        features = torch.cat(features) if len(features) > 1 else features[0]
        return features.to(self.decoder_dtype)  # the decoder's dtype: no-op unless only the ViT is bf16

    def prompt_ids(self, prefix: str) -> torch.LongTensor:
        """(1, P) decoder prompt: [DEC] then the prefix's word pieces, without [CLS]/[SEP]."""
        prefix_ids = self.processor.tokenizer(prefix, add_special_tokens=False)["input_ids"] if prefix else []
        return torch.tensor([[self.bos_token_id, *prefix_ids]], dtype=torch.long, device=self.device)

    @property
    def max_text_tokens(self) -> int:
        """Word pieces a text may have so that [DEC] + text + [SEP] fits the decoder's positions."""
        return self.model.config.text_config.max_position_embeddings - 2

    def text_ids(self, text: str, label: str = "The text") -> list[int]:
        """``text``'s word pieces, without [CLS]/[SEP]; ValueError if it has none or too many.

        ``label`` starts the error sentences (e.g. "Text 3", "The caption").
        """
        ids = self.processor.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(
                f"{label} ({text!r}) holds nothing BLIP can read (only spaces, control or zero-width "
                "characters); type some words."
            )
        if len(ids) > self.max_text_tokens:
            raise ValueError(
                f"{label} is {len(ids)} word pieces long, over BLIP's limit of {self.max_text_tokens}; shorten it."
            )
        return ids

    def _generate(self, prompt_ids: torch.LongTensor, image_embeds: torch.Tensor, request: CaptionRequest):
        """Greedy or sampling through ``generate()``; returns sequences and raw token log-probs."""
        kwargs = request.generate_kwargs()
        if request.strategy == CaptionStrategy.SAMPLING:
            # Caption i of every image draws from its own stream seeded with seed + i, so it does not
            # depend on the batch, the image's place in it, the process or a resume.
            seeds = row_seeds(request.seed, image_embeds.shape[0], request.num_captions)
            sampler = SeededSampler(seeds, temperature=request.temperature, top_k=request.top_k, top_p=request.top_p)
            kwargs["logits_processor"] = LogitsProcessorList([sampler])
            # generate()'s greedy step takes no num_return_sequences: repeat each image's rows here,
            # image-major as generate would (image 0's captions first).
            prompt_ids = prompt_ids.repeat_interleave(request.num_captions, dim=0)
            image_embeds = image_embeds.repeat_interleave(request.num_captions, dim=0)
            kwargs["num_return_sequences"] = 1
        output = self.model.text_decoder.generate(
            input_ids=prompt_ids,
            attention_mask=torch.ones_like(prompt_ids),
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device),
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            return_dict_in_generate=True,
            output_logits=True,
            **kwargs,
        )
        sequences = output.sequences
        generated_ids = sequences[:, prompt_ids.shape[1] :]
        # Raw (unprocessed) log-probabilities, so scores mean the same for every strategy.
        raw_logprobs = torch.stack([logits.float().log_softmax(dim=-1) for logits in output.logits], dim=1)
        picked = raw_logprobs[:, : generated_ids.shape[1]]
        token_logprobs = picked.gather(-1, generated_ids.unsqueeze(-1)).squeeze(-1)
        generated = _mask_after_eos(generated_ids, self.eos_token_id)
        return sequences, token_logprobs * generated, generated


def switch_adapter_layers(layers: list, adapter: str | list[str] | None) -> None:
    """Make ``adapter`` the active one in every peft LoRA layer of ``layers``; None disables them all.

    A disabled LoRA layer returns its base layer's output exactly, so None gives
    the base model bit for bit. A layer that holds no weights for ``adapter``
    (the adapter did not target it) passes its input through the base layer.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns when an adapter is absent from some layer: that is expected
        for layer in layers:
            if adapter is None:
                layer.enable_adapters(False)
            else:
                layer.enable_adapters(True)
                layer.set_adapter(adapter)


def _mask_after_eos(generated_ids: torch.LongTensor, eos_token_id: int) -> torch.BoolTensor:
    """True for each generated token up to and including the first eos."""
    is_eos = generated_ids == eos_token_id
    eos_seen_before = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
    return ~eos_seen_before
