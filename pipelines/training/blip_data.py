"""BLIP LoRA training data: how well BLIP's vocabulary spells the captions, the images encoded once, and the
``DataLoader`` of collated micro-batches the trainer (``pipelines.training.train_blip_lora``) walks.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from pipelines import settings
from pipelines.blip.captioner import BlipCaptioner
from pipelines.training.dataset import TrainingExample

# ----------------------------------------------------------------------------- vocabulary


@dataclass(frozen=True)
class VocabularyReport:
    """How well BLIP's tokenizer spells the captions."""

    pieces: int  # word pieces in all captions
    unknown: int  # of which [UNK]
    unknown_words: tuple[str, ...]  # a few words that became [UNK], for the warning

    @property
    def unknown_rate(self) -> float:
        return self.unknown / self.pieces if self.pieces else 0.0


def vocabulary_report(tokenizer, texts: list[str], examples: int = 5) -> VocabularyReport:
    """Count the [UNK] word pieces over every caption, and keep a few words that caused them."""
    unknown_id = tokenizer.unk_token_id
    pieces = unknown = 0
    words: list[str] = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        pieces += len(ids)
        found = sum(1 for piece in ids if piece == unknown_id)
        unknown += found
        if found and len(words) < examples:
            for word in text.split():
                spelled = tokenizer(word, add_special_tokens=False)["input_ids"]
                if unknown_id in spelled and word not in words and len(words) < examples:
                    words.append(word)
    return VocabularyReport(pieces=pieces, unknown=unknown, unknown_words=tuple(words))


def vocabulary_warning(report: VocabularyReport) -> str | None:
    """The warning printed before training when too many caption pieces are [UNK]; None when they are few."""
    if report.unknown_rate <= settings.BLIP_TRAIN_UNKNOWN_TOKEN_WARNING:
        return None
    examples = f" (e.g. {', '.join(report.unknown_words)})" if report.unknown_words else ""
    return (
        f"Warning: {report.unknown_rate:.1%} of the captions' word pieces ({report.unknown} of {report.pieces}) "
        f"are [UNK], words BLIP cannot spell{examples}. BLIP's decoder writes with BERT's uncased English "
        "vocabulary: accents are stripped (é becomes e) and non-Latin scripts (Cyrillic, Greek, Arabic, CJK, ...) "
        "are mostly not in it, so the adapter cannot learn to write those words. Romanise the captions "
        "(transliterate them to Latin letters), or train a decoder with a multilingual vocabulary."
    )


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class EncodedSet:
    """Examples ready for the decoder: frozen image features and caption token ids."""

    examples: list[TrainingExample]
    features: torch.Tensor  # (N, 1 + grid², hidden) on the CPU
    token_ids: list[list[int]]  # [DEC] + caption pieces + [SEP], each

    def __len__(self) -> int:
        return len(self.examples)


def caption_token_ids(captioner: BlipCaptioner, text: str) -> list[int]:
    """``[DEC] + text's word pieces + [SEP]``, the pieces cut to what the decoder's positions hold."""
    ids = captioner.processor.tokenizer(text, add_special_tokens=False)["input_ids"][: captioner.max_text_tokens]
    return [captioner.bos_token_id, *ids, captioner.eos_token_id]


@torch.no_grad()
def encode_examples(
    captioner: BlipCaptioner, examples: list[TrainingExample], *, batch_size: int, dtype: torch.dtype
) -> EncodedSet:
    """Encode every image once with the frozen vision encoder; features stay on the CPU in ``dtype``."""
    features = []
    for start in range(0, len(examples), batch_size):
        images = [example.load() for example in examples[start : start + batch_size]]
        encoded = captioner.encode_pixels(captioner.pixel_values(images), cache=False)
        features.append(encoded.to("cpu", dtype))
    return EncodedSet(
        examples=list(examples),
        features=torch.cat(features) if features else torch.empty(0),
        token_ids=[caption_token_ids(captioner, example.text) for example in examples],
    )


def collate(encoded: EncodedSet, indices: list[int], pad_token_id: int, device) -> dict[str, torch.Tensor]:
    """A micro-batch: image features, right-padded ids, attention mask, labels with padding at -100."""
    rows = [encoded.token_ids[index] for index in indices]
    length = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {
        "features": encoded.features[indices].to(device),
        "input_ids": input_ids.to(device),
        "attention_mask": attention_mask.to(device),
        "labels": labels.to(device),
    }


def caption_loader(encoded: EncodedSet, batch_size: int, seed: int, pad_token_id: int):
    """The training set as a shuffled ``DataLoader`` of collated micro-batches (on the CPU; accelerate moves them).

    Under ``accelerator.prepare`` with a seedable sampler (``make_accelerator(data_seed=seed)``) every process
    walks the same order of each epoch, a function of seed and epoch, and takes whole batches of it in turn.
    """
    from torch.utils.data import DataLoader

    return DataLoader(
        list(range(len(encoded))),
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
        collate_fn=functools.partial(collate, encoded, pad_token_id=pad_token_id, device="cpu"),
    )
