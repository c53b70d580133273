"""LoRAs named in a request: A1111's ``<lora:name:w>`` tags in the prompt and the ``lora`` parameter.

    prompt, tagged = split_lora_tags("a fox <lora:style:0.8>")   # ("a fox", [LoraChoice("style", 0.8, "prompt")])
    choices = merge_lora_choices(tagged, parse_lora_text("style:1, other"))

Plain text in, ``LoraChoice``s out: no model, no file. The generation service finds and loads
what the choices name (pipelines/sd3/generation.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from pipelines import settings
from pipelines.lora.library import LoadedLora
from pipelines.lora.sources import sanitize_lora_name
from pipelines.validation import as_float

# A1111's extra-network syntax: <lora:name> or <lora:name:weight> anywhere in the prompt.
LORA_TAG = re.compile(r"<lora:([^<>]*)>", flags=re.IGNORECASE)


@dataclass(frozen=True)
class LoraChoice:
    """One LoRA a request names: its (sanitized) name, its weight (None: its default), where it was named."""

    name: str  # the adapter name: sanitized, a file's stem without folders or .safetensors
    weight: float | None
    origin: str  # "prompt" | "lora"
    text: str = field(default="", compare=False)  # as written: what the LoRA folder is searched for
    scale: float = 1.0  # lora_scale, for a LoRA drawn at its default weight (weight None)

    def weight_for(self, entry: LoadedLora) -> float:
        """The weight to draw with: the one given, else ``entry``'s default times ``scale``."""
        if self.weight is not None:
            return self.weight
        return _weight(f"the weight of {self.name} times lora_scale", entry.default_scale * self.scale)


def split_lora_tags(prompt: str) -> tuple[str, list[LoraChoice]]:
    """(the prompt without its ``<lora:name:w>`` tags, the LoRAs they name).

    A tag and the spaces before it are removed, so ``"a fox <lora:x:1>"`` becomes ``"a fox"``,
    exactly the text the Studio drew before it appended the tag to the PNG's prompt.
    """
    if not isinstance(prompt, str):
        return prompt, []
    matches = list(LORA_TAG.finditer(prompt))
    if not matches:
        return prompt, []
    choices = [_choice(match.group(1), "prompt", f"<lora:{match.group(1)}>") for match in matches]
    # One pass: the text between tags, each piece without the spaces that stood before the next tag.
    # (A pattern with a leading [ \t]* would retry at every space of a long run: quadratic.)
    pieces, start = [], 0
    for match in matches:
        pieces.append(prompt[start : match.start()].rstrip(" \t"))
        start = match.end()
    pieces.append(prompt[start:])
    return "".join(pieces).strip(), choices


def parse_lora_text(text: str | None, lora_scale: float | None = None) -> list[LoraChoice]:
    """The ``lora`` parameter ("name", "name:0.8, other:0.5", or A1111 tags) -> choices; weights times ``lora_scale``."""
    if text is None or text == "":
        return []
    if not isinstance(text, str):
        raise ValueError(f"lora must be text such as 'name:0.8, other:0.5', not {type(text).__name__}.")
    multiplier = 1.0 if lora_scale is None else _weight("lora_scale", lora_scale)
    choices = []
    for raw in re.split(r"[,\n]", text):
        item = raw.strip()
        if item.lower().startswith("<lora:") and item.endswith(">"):
            item = item[len("<lora:") : -1]
        if item:
            choices.append(_choice(item, "lora", item, multiplier))
    return choices


def _choice(item: str, origin: str, shown: str, multiplier: float = 1.0) -> LoraChoice:
    name, _, weight_text = item.partition(":")
    if ":" in weight_text:
        raise ValueError(f"{shown} gives several weights; give one: <lora:name:0.8>.")
    if not name.strip():
        raise ValueError(f"{shown} names no LoRA; write <lora:name:0.8>.")
    text = name.strip()
    key = sanitize_lora_name(PurePosixPath(text).stem if text.lower().endswith(".safetensors") else text)
    if not weight_text.strip():
        return LoraChoice(key, None, origin, text, multiplier)
    weight = _weight(f"the weight of {key}", weight_text)
    if multiplier != 1.0:
        weight = _weight(f"the weight of {key} times lora_scale", weight * multiplier)
    return LoraChoice(key, weight, origin, text)


def _weight(name: str, value) -> float:
    return as_float(name, value, -settings.MAX_LORA_WEIGHT, settings.MAX_LORA_WEIGHT)


def merge_lora_choices(
    from_prompt: list[LoraChoice], from_lora: list[LoraChoice]
) -> tuple[list[LoraChoice], list[str]]:
    """(the LoRAs to draw with, notes): the prompt's tags, then the ``lora`` parameter's names.

    A LoRA in both is drawn at the prompt tag's weight, as A1111 does: ``<lora:name:0.8>`` sets that
    LoRA's weight for this image whatever the LoRA panel says, with a note when the two differ.
    """
    merged: dict[str, LoraChoice] = {}
    notes = []
    for choice in [*from_prompt, *from_lora]:
        earlier = merged.get(choice.name)
        if earlier is None:
            merged[choice.name] = choice
        elif earlier.origin == choice.origin:
            raise ValueError(f"The LoRA {choice.name!r} is named twice; give each LoRA once.")
        elif earlier.weight != choice.weight:
            notes.append(
                f"The prompt's <lora:{earlier.name}:{_shown(earlier.weight)}> sets its weight for this image; "
                f"the LoRA panel's {_shown(choice.weight)} does not apply."
            )
    if len(merged) > settings.MAX_ACTIVE_LORAS:
        raise ValueError(f"{len(merged)} LoRAs were named; use at most {settings.MAX_ACTIVE_LORAS} at once.")
    return list(merged.values()), notes


def _shown(weight: float | None) -> str:
    return "default" if weight is None else f"{weight:g}"
