"""BLIP decoding controls, shared by every tab that captions.

The controls are created in the order of ``CaptionRequest``'s fields, so their
values map onto a request by name, and each strategy shows only the controls
that apply to it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import gradio as gr

from components.common import ValidatedNumber, ValidatedSlider, parameter
from pipelines import settings
from pipelines.blip import CaptionRequest

STRATEGY_LABELS = {
    "greedy": "Greedy",
    "beam": "Beam search",
    "diverse_beam": "Diverse beam search",
    "sampling": "Sampling (top-k / top-p)",
}


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
    defaults = CaptionRequest()
    return [
        parameter(field.name, getattr(defaults, field.name))
        for field in fields(CaptionRequest)
        if field.name not in skip
    ]


def _visible_groups(strategy: str) -> tuple[dict, dict, dict]:
    return (
        gr.update(visible=strategy in ("beam", "diverse_beam")),
        gr.update(visible=strategy == "diverse_beam"),
        gr.update(visible=strategy == "sampling"),
    )


def build_decoding_controls(
    defaults: CaptionRequest | None = None, *, show_num_captions: bool = True
) -> DecodingControls:
    """Create the decoding controls inside the current Blocks context.

    ``show_num_captions=False`` hides the caption-count slider (the Batch tab keeps one caption per image).
    """
    defaults = defaults or CaptionRequest()
    strategy = gr.Radio(
        choices=[(label, key) for key, label in STRATEGY_LABELS.items()],
        value=defaults.strategy,
        label="Decoding strategy",
    )
    prefix = gr.Textbox(
        value=defaults.prefix,
        label="Prefix (conditional captioning)",
        placeholder="e.g. a picture of — leave empty for unconditional captions",
        max_length=settings.MAX_CAPTION_PREFIX_CHARS,
    )
    num_captions = ValidatedSlider(
        1,
        settings.MAX_CAPTIONS_PER_IMAGE,
        value=defaults.num_captions,
        step=1,
        label="Captions",
        visible=show_num_captions,
    )
    with gr.Accordion("Decoding settings", open=False):
        with gr.Group(visible=defaults.strategy in ("beam", "diverse_beam")) as beam_group:
            num_beams = ValidatedSlider(1, settings.MAX_NUM_BEAMS, value=defaults.num_beams, step=1, label="Beams")
            length_penalty = ValidatedSlider(
                -2.0, 3.0, value=defaults.length_penalty, step=0.1, label="Length penalty (>1 favours longer)"
            )
            early_stopping = gr.Checkbox(value=defaults.early_stopping, label="Early stopping")
        with gr.Group(visible=defaults.strategy == "diverse_beam") as diverse_group:
            num_beam_groups = ValidatedSlider(
                2, settings.MAX_NUM_BEAMS, value=defaults.num_beam_groups, step=1, label="Beam groups"
            )
            diversity_penalty = ValidatedSlider(
                0.0, 5.0, value=defaults.diversity_penalty, step=0.1, label="Diversity penalty"
            )
        with gr.Group(visible=defaults.strategy == "sampling") as sampling_group:
            top_k = ValidatedSlider(0, 200, value=defaults.top_k, step=1, label="Top-k (0 = off)")
            top_p = ValidatedSlider(0.05, 1.0, value=defaults.top_p, step=0.05, label="Top-p (1 = off)")
            temperature = ValidatedSlider(
                0.05, settings.MAX_TEMPERATURE, value=defaults.temperature, step=0.05, label="Temperature"
            )
            seed = ValidatedNumber(value=defaults.seed, precision=0, label="Seed (-1 = random)")
        with gr.Row():
            min_new_tokens = ValidatedSlider(
                0, settings.MAX_NEW_TOKENS, value=defaults.min_new_tokens, step=1, label="Min tokens"
            )
            max_new_tokens = ValidatedSlider(
                1, settings.MAX_NEW_TOKENS, value=defaults.max_new_tokens, step=1, label="Max tokens"
            )
        with gr.Row():
            repetition_penalty = ValidatedSlider(
                1.0,
                settings.MAX_REPETITION_PENALTY,
                value=defaults.repetition_penalty,
                step=0.05,
                label="Repetition penalty",
            )
            no_repeat_ngram_size = ValidatedSlider(
                0, settings.MAX_NO_REPEAT_NGRAM, value=defaults.no_repeat_ngram_size, step=1, label="No-repeat n-gram"
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
        min_new_tokens=min_new_tokens,
        max_new_tokens=max_new_tokens,
        repetition_penalty=repetition_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size,
        beam_group=beam_group,
        diverse_group=diverse_group,
        sampling_group=sampling_group,
    )
