"""BLIP decoding controls, shared by every tab that captions.

The controls are created in the order of ``CaptionRequest``'s fields, so their
values map onto a request by name, and each strategy shows only the controls
that apply to it. Every number control takes its range from
``settings.CAPTION_RANGES``, the ranges ``CaptionRequest.validated`` checks.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import gradio as gr

from components.common import ValidatedNumber, ValidatedSlider, parameter
from pipelines import settings
from pipelines.blip.captioner import FIELD_LABELS, STRATEGY_LABELS, CaptionRequest
from pipelines.settings import BEAM_STRATEGIES, CaptionStrategy

# What the tabs start from: the library's defaults, but sampling with a random seed (reported back).
UI_DEFAULTS = CaptionRequest(seed=settings.UI_CAPTION_SEED)


@dataclass
class DecodingControls:
    strategy: gr.Radio
    prefix: gr.Textbox
    num_captions: gr.Slider
    num_beams: gr.Slider
    length_penalty: gr.Slider
    early_stopping: gr.Checkbox
    num_beam_groups: gr.Slider
    diversity_penalty: gr.Slider
    top_k: gr.Slider
    top_p: gr.Slider
    temperature: gr.Slider
    seed: gr.Number
    reuse_seed: gr.Button  # the Caption tab fills it in from the last result's seed
    min_new_tokens: gr.Slider
    max_new_tokens: gr.Slider
    repetition_penalty: gr.Slider
    no_repeat_ngram_size: gr.Slider
    beam_group: gr.Group
    diverse_group: gr.Group
    sampling_group: gr.Group

    def inputs(self, skip: tuple[str, ...] = ()) -> list[gr.components.Component]:
        """The request's controls, in CaptionRequest's field order (as ``decoding_parameters``)."""
        return [getattr(self, field.name) for field in fields(CaptionRequest) if field.name not in skip]


def request_from_values(values: dict, **overrides) -> CaptionRequest:
    """A CaptionRequest (unvalidated) from endpoint values keyed by field name; other keys are ignored."""
    chosen = {field.name: values[field.name] for field in fields(CaptionRequest) if field.name in values}
    return CaptionRequest(**{**chosen, **overrides})


def decoding_parameters(skip: tuple[str, ...] = ()) -> list:
    """API parameters for CaptionRequest's fields, named and defaulted as the request is."""
    defaults = UI_DEFAULTS
    return [
        parameter(field.name, getattr(defaults, field.name))
        for field in fields(CaptionRequest)
        if field.name not in skip
    ]


def _visible_groups(strategy: str) -> tuple[dict, dict, dict]:
    return (
        gr.update(visible=strategy in BEAM_STRATEGIES),
        gr.update(visible=strategy == CaptionStrategy.DIVERSE_BEAM),
        gr.update(visible=strategy == CaptionStrategy.SAMPLING),
    )


def _slider(name: str, value, label: str, **kwargs) -> ValidatedSlider:
    """A slider over CaptionRequest field ``name``'s validation range."""
    return ValidatedSlider.over(settings.CAPTION_RANGES[name], value, label, **kwargs)


def build_decoding_controls(
    defaults: CaptionRequest | None = None, *, show_num_captions: bool = True, show_reuse_seed: bool = False
) -> DecodingControls:
    """Create the decoding controls inside the current Blocks context.

    ``show_num_captions=False`` hides the caption-count slider (the Batch tab keeps one caption per image);
    ``show_reuse_seed`` shows a "Reuse last seed" button beside the sampling seed, for the tab to wire.
    """
    defaults = defaults or UI_DEFAULTS
    strategy = gr.Radio(
        choices=[(label, key.value) for key, label in STRATEGY_LABELS.items()],
        value=CaptionStrategy(defaults.strategy).value,
        label="Decoding strategy",
    )
    prefix = gr.Textbox(
        value=defaults.prefix,
        label="Prefix (conditional captioning)",
        placeholder="e.g. a picture of — leave empty for unconditional captions",
        max_length=settings.MAX_CAPTION_PREFIX_CHARS,
    )
    num_captions = _slider(
        "num_captions", defaults.num_captions, FIELD_LABELS["num_captions"], visible=show_num_captions
    )
    with gr.Accordion("Decoding settings", open=False):
        with gr.Group(visible=defaults.strategy in BEAM_STRATEGIES) as beam_group:
            num_beams = _slider("num_beams", defaults.num_beams, FIELD_LABELS["num_beams"])
            length_penalty = _slider(
                "length_penalty", defaults.length_penalty, f"{FIELD_LABELS['length_penalty']} (>1 favours longer)"
            )
            early_stopping = gr.Checkbox(value=defaults.early_stopping, label="Early stopping")
        with gr.Group(visible=defaults.strategy == CaptionStrategy.DIVERSE_BEAM) as diverse_group:
            num_beam_groups = _slider("num_beam_groups", defaults.num_beam_groups, FIELD_LABELS["num_beam_groups"])
            diversity_penalty = _slider(
                "diversity_penalty", defaults.diversity_penalty, FIELD_LABELS["diversity_penalty"]
            )
        with gr.Group(visible=defaults.strategy == CaptionStrategy.SAMPLING) as sampling_group:
            top_k = _slider("top_k", defaults.top_k, f"{FIELD_LABELS['top_k']} (0 = off)")
            top_p = _slider("top_p", defaults.top_p, f"{FIELD_LABELS['top_p']} (1 = off)")
            temperature = _slider("temperature", defaults.temperature, FIELD_LABELS["temperature"])
            seed_range = settings.CAPTION_RANGES["seed"]
            seed = ValidatedNumber(
                value=defaults.seed,
                precision=0,
                minimum=seed_range.low,
                maximum=seed_range.high,
                label="Seed (-1 = random)",
            )
            reuse_seed = gr.Button("♻ Reuse last seed", size="sm", visible=show_reuse_seed)
        with gr.Row():
            min_new_tokens = _slider("min_new_tokens", defaults.min_new_tokens, FIELD_LABELS["min_new_tokens"])
            max_new_tokens = _slider("max_new_tokens", defaults.max_new_tokens, FIELD_LABELS["max_new_tokens"])
        with gr.Row():
            repetition_penalty = _slider(
                "repetition_penalty", defaults.repetition_penalty, FIELD_LABELS["repetition_penalty"]
            )
            no_repeat_ngram_size = _slider(
                "no_repeat_ngram_size", defaults.no_repeat_ngram_size, FIELD_LABELS["no_repeat_ngram_size"]
            )
    strategy.change(
        _visible_groups,
        inputs=strategy,
        outputs=[beam_group, diverse_group, sampling_group],
        queue=False,
        api_visibility="private",  # a UI-only visibility toggle, not an API
    )
    return DecodingControls(
        strategy=strategy,
        prefix=prefix,
        num_captions=num_captions,
        num_beams=num_beams,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
        num_beam_groups=num_beam_groups,
        diversity_penalty=diversity_penalty,
        top_k=top_k,
        top_p=top_p,
        temperature=temperature,
        seed=seed,
        reuse_seed=reuse_seed,
        min_new_tokens=min_new_tokens,
        max_new_tokens=max_new_tokens,
        repetition_penalty=repetition_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size,
        beam_group=beam_group,
        diverse_group=diverse_group,
        sampling_group=sampling_group,
    )
