"""Round trip tab: prompt -> image -> caption -> score, image -> caption -> image, and an evaluation run."""

from __future__ import annotations

import dataclasses
import shutil

import gradio as gr

from components.common import (
    StopRequests,
    UploadedImage,
    ValidatedNumber,
    ValidatedSlider,
    blank_to_none,
    generation_request,
    launch_alone,
    markdown_text,
    named_endpoint,
    parameter,
    t5_tokens_slider,
    visitor_id,
)
from pipelines import settings, workspace
from pipelines.catalog import CATALOG
from pipelines.images import load_image
from pipelines.memory import SD3_MODES
from pipelines.roundtrip.loop import (
    PROMPTS_DIR,
    check_evaluation_size,
    evaluation_table,
    image_round_trip,
    load_prompts,
    prompt_round_trip,
    run_evaluation,
)
from pipelines.sd3.image_to_image import check_strength
from pipelines.sd3.jobs import GenerationRequest
from pipelines.sd3.text_to_image import MODEL_CHOICES, model_key
from pipelines.studio import Studio
from pipelines.validation import as_int

RESULTS_DIR = settings.EVALUATION_RESULTS_DIR  # the Scoreboard reads evaluations from here too
SCORE_NOTE = (
    "**Scores** are BLIP's: the mean log-probability per token of a text given the image (0 is the maximum; "
    "the same number as in the Match tab). *Prompt* asks whether BLIP would describe the image with the "
    "prompt's words: a proxy for prompt adherence, not a human judgement. ITM (optional) is the retrieval "
    "model's match probability."
)


SKIP_LAYER_GUIDANCE_CHOICES = [("the model's preset", "preset"), ("on", "on"), ("off", "off")]


# Scores first, the long text last and wrapped; each column is wide enough for its header's longest
# word, so headers wrap between words ("mean log-prob", not "mean log-pr / ob").
SCORE_HEADERS = ["text", "mean log-prob", "ITM P(match)", "words"]
SCORE_WIDTHS = ["18%", "17%", "17%", "48%"]
EVALUATION_ROW_HEADERS = ["model", "prompt mean log-prob", "category", "seed", "prompt", "caption"]
EVALUATION_ROW_WIDTHS = ["14%", "13%", "14%", "7%", "26%", "26%"]


def optional_flag(name: str, value) -> bool | None:
    """A yes/no setting that may also be "preset" (None): True/False, "on"/"off", or ""/"preset"/None."""
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("", "preset"):
        return None
    if text in ("on", "true", "yes", "1"):
        return True
    if text in ("off", "false", "no", "0"):
        return False
    raise ValueError(f"{name} must be on, off or preset, not {str(value)[:40]!r}.")


def _model_choices():
    return [(CATALOG[key].title.removeprefix("Stable Diffusion "), name) for name, key in MODEL_CHOICES.items()]


def build_roundtrip_tab(studio: Studio) -> dict:
    """Build the Round trip tab inside the current Blocks; returns its main components."""
    stop_evaluations = StopRequests()
    known_categories = sorted(path.stem for path in PROMPTS_DIR.glob("*.txt"))

    def settings_request(
        prompt, model, seed, steps, negative_prompt="", guidance="", width="", height="",
        max_sequence_length=settings.DEFAULT_T5_TOKENS, skip_layer_guidance="preset", memory_mode=None, lora="",
        lora_scale=1.0, lora_fuse=False,
    ) -> GenerationRequest:  # fmt: skip
        """The settings both directions share, as /generate takes them (empty = preset)."""
        return generation_request(
            prompt, model, negative_prompt=negative_prompt, seed=seed, steps=steps, guidance=guidance, width=width,
            height=height,
            max_sequence_length=settings.DEFAULT_T5_TOKENS if max_sequence_length is None else max_sequence_length,
            skip_layer_guidance=optional_flag("skip_layer_guidance", skip_layer_guidance), memory_mode=memory_mode,
            lora=lora, lora_scale=lora_scale, lora_fuse=lora_fuse,
        )  # fmt: skip

    # The functions that return a file are generators: the file is written into a folder of this
    # request and yielded; Gradio copies it to its cache, then the folder is deleted.
    def roundtrip(prompt, model, seed, steps, second_opinion, request, **shared):
        visitor = visitor_id(request)
        job = settings_request(prompt, model, seed, steps, **shared)
        studio.generation.check(job, visitor=visitor)  # refuse a bad request before loading two models
        with workspace.request_folder(visitor) as folder:
            trip = prompt_round_trip(
                studio.generation,
                job,
                studio.matcher(),
                visitor=visitor,
                second_opinion=bool(second_opinion),
                notify=gr.Info,
                folder=folder,
            )
            details = trip.details()
            scores = [  # in SCORE_HEADERS order: the numbers before the text
                [
                    "prompt",
                    round(trip.prompt_fit.mean_logprob, 4),
                    trip.prompt_fit.itm_probability,
                    trip.prompt_fit.text,
                ],
                [
                    "BLIP's caption",
                    round(trip.caption_fit.mean_logprob, 4),
                    trip.caption_fit.itm_probability,
                    trip.caption_fit.text,
                ],
            ]
            summary = (
                f"Seed {details['seed']}, {details['steps']} steps, {details['timings']['generate_seconds']:.1f} s"
                + "".join(f", LoRA {markdown_text(item['name'])}:{item['weight']:g}" for item in details["loras"])
                + f". BLIP wrote: **{markdown_text(trip.caption)}**"
            )
            if trip.second_opinion_note:
                summary += f"\n\nNo second opinion: {trip.second_opinion_note}"
            if studio.tiny:
                summary += (
                    "\n\nTiny random models: image, caption and scores are real computations of models that "
                    "learnt nothing."
                )
            yield str(trip.generation.paths[0]), summary, scores, trip.diff, details["seed"], details

    def reverse_trip(image, model, seed, steps, request, strength="", **shared):
        if image is None:
            raise ValueError("Upload an image (PNG, JPEG, WebP, GIF, BMP or TIFF) first.")
        picture = load_image(image)
        strength = None if blank_to_none(strength) is None else check_strength(strength)  # set: img2img
        visitor = visitor_id(request)
        job = settings_request("", model, seed, steps, **shared)
        # The caption is the prompt, so it is not known yet; every other setting is checked now.
        studio.generation.check(dataclasses.replace(job, prompt="the caption"), visitor=visitor)
        with workspace.request_folder(visitor) as folder:
            trip = image_round_trip(
                picture,
                studio.generation,
                studio.matcher(),
                job,
                visitor=visitor,
                notify=gr.Info,
                folder=folder,
                strength=strength,
            )
            fits = f"The caption fits the redrawn image with a mean log-prob of {trip.fit.mean_logprob:.3f}."
            yield trip.caption, str(trip.generation.paths[0]), fits, trip.details()

    def evaluate(categories, models, seeds, steps, side, progress, request):
        # 1. Check every input before anything runs or any file name is made from it.
        studio.require_operator("Running an evaluation")  # hours of GPU time, written where the Scoreboard reads
        categories = list(categories or [])
        models = list(models or [])
        if not categories or not models:
            raise ValueError("Choose at least one prompt category and one model.")
        unknown = [category for category in categories if category not in known_categories]
        if unknown:
            raise ValueError(f"Unknown prompt category {unknown[0]!r}; choose from: {', '.join(known_categories)}.")
        for model in models:
            model_key(model)  # ValueError naming the choices
        seed_texts = [text for text in str(seeds).replace(" ", "").split(",") if text]
        if len(seed_texts) > settings.MAX_EVALUATION_SEEDS:
            raise ValueError(
                f"{len(seed_texts)} seeds were given; one evaluation run takes at most {settings.MAX_EVALUATION_SEEDS}."
            )
        seed_list = [as_int("seed", seed, 0, settings.MAX_SEED) for seed in seed_texts]
        if not seed_list:
            raise ValueError("Give at least one seed, e.g. 0 or 0,1,2.")
        steps = None if blank_to_none(steps) is None else as_int("steps", steps, 1, settings.MAX_STEPS)
        side = None if blank_to_none(side) is None else as_int("side", side, 16, 4096)

        prompts = load_prompts([PROMPTS_DIR / f"{category}.txt" for category in categories])
        check_evaluation_size(models, seed_list, prompts, settings.MAX_EVALUATION_IMAGES)  # before any model loads

        # 2. Run, writing the resumable file under the results folder.
        name = f"roundtrip-eval-{'tiny' if studio.tiny else 'real'}-{steps or 'preset'}steps-{side or 'default'}px.json"
        stop = stop_evaluations.start(request)
        payload = run_evaluation(
            studio.manager,
            studio.matcher(),
            prompts,
            models=models,
            seeds=seed_list,
            out_path=RESULTS_DIR / name,
            steps=steps,
            side=side,
            machine=studio.manager.runtime.description,
            model_size="tiny" if studio.tiny else "real weights",
            on_progress=lambda done, total: progress((done, total), desc="prompts", unit="images"),
            should_stop=stop.is_set,
            max_images=settings.MAX_EVALUATION_IMAGES,
        )
        rows = [  # in EVALUATION_ROW_HEADERS order: the score before the long text
            [
                row["model"],
                round(row["prompt_mean_logprob"], 4),
                row["category"],
                row["seed"],
                row["prompt"],
                row["caption"],
            ]
            for row in payload["rows"]
        ]
        # 3. Hand back a copy: the results folder may be a volume outside what Gradio may serve.
        with workspace.request_folder(visitor_id(request)) as folder:
            download = folder / name
            shutil.copyfile(RESULTS_DIR / name, download)
            yield evaluation_table(payload), rows, str(download)

    gr.Markdown(
        "Neither model's own demo does this: SD3.5 draws, BLIP reads the picture back and scores how well it "
        "fits. " + SCORE_NOTE
    )
    with gr.Accordion("Prompt → image → caption → score", open=True), gr.Row():
        with gr.Column(scale=1):
            prompt = gr.Textbox(label="Prompt", lines=2, value="", max_length=settings.MAX_PROMPT_CHARS)
            model = gr.Radio(choices=_model_choices(), value="large", label="Model")
            with gr.Row():
                seed = ValidatedNumber(value=-1, precision=0, label="Seed (-1 = random)")
                # A text box: an empty number box would send 0, not "use the preset".
                steps = gr.Textbox(value="", label="Steps (empty = preset)", placeholder="preset")
            second_opinion = gr.Checkbox(value=False, label="Second opinion (ITM) from BLIP's retrieval model")
            run = gr.Button("Run the round trip", variant="primary")
        with gr.Column(scale=1):
            image = gr.Image(label="SD3.5's image", format="png", interactive=False, height=320)
            summary = gr.Markdown()
            diff = gr.HighlightedText(
                label="Prompt vs caption, word by word",
                color_map={"both": "green", "prompt": "red", "caption": "blue"},
                show_legend=True,
            )
            scores = gr.Dataframe(
                headers=SCORE_HEADERS,
                label="How well the image fits",
                interactive=False,
                wrap=True,
                column_widths=SCORE_WIDTHS,
            )
            used_seed = gr.Number(visible=False)
            with gr.Accordion("Details (JSON)", open=False):
                details = gr.JSON(label="Details")
    with gr.Accordion("Image → caption → image", open=False):
        with gr.Row():
            upload = UploadedImage(label="Your image", height=280)
            redrawn = gr.Image(label="Drawn from BLIP's caption", format="png", interactive=False, height=280)
        with gr.Row():
            reverse_model = gr.Radio(choices=_model_choices(), value="large", label="Model")
            reverse_seed = ValidatedNumber(value=-1, precision=0, label="Seed (-1 = random)")
            reverse_run = gr.Button("Caption, then draw the caption", variant="primary")
        with gr.Row():
            reverse_steps = gr.Textbox(value="", label="Steps (empty = preset)", placeholder="preset")
            # Empty: text to image from the caption alone. A strength: the caption redraws the image itself.
            reverse_strength = gr.Textbox(
                value="",
                label=f"Strength (empty = from the caption alone; {settings.STRENGTH.low:g}-{settings.STRENGTH.high:g} "
                "= img2img from your image)",
                placeholder="empty: text to image",
            )
        reverse_caption = gr.Textbox(label="BLIP's caption", interactive=False)
        reverse_summary = gr.Markdown()
        with gr.Accordion("Details (JSON)", open=False):
            reverse_details = gr.JSON(label="Details")
    with gr.Accordion("Generation settings for both directions (as in the Generate tab)", open=False):
        with gr.Row():
            negative_prompt = gr.Textbox(
                label="Negative prompt", lines=1, value="", max_length=settings.MAX_PROMPT_CHARS
            )
            guidance = gr.Textbox(value="", label="Guidance / CFG (empty = preset)", placeholder="preset")
        with gr.Row():
            # Empty: the preset's size (prompt -> image) or the upload's shape (image -> image).
            width = gr.Textbox(value="", label="Width (empty = preset / the image's shape)", placeholder="preset")
            height = gr.Textbox(value="", label="Height (empty = preset / the image's shape)", placeholder="preset")
            max_sequence_length = t5_tokens_slider()
        with gr.Row():
            skip_layer_guidance = gr.Dropdown(
                choices=SKIP_LAYER_GUIDANCE_CHOICES, value="preset", label="Skip-layer guidance (Medium)"
            )
            memory_mode = gr.Dropdown(
                choices=[("auto: the fastest that fits", "auto")]
                + [(f"{mode.key}: {mode.title}", mode.key) for mode in SD3_MODES],
                value=studio.memory_mode,
                label="Memory mode (quantization / offload)",
                visible=not studio.public,  # a public instance runs the operator's --memory
            )
        with gr.Row():
            lora = gr.Textbox(
                value="",
                label="LoRAs (name:weight, comma-separated; loaded on demand from the LoRA folder or registry)",
                placeholder="pixel_style:0.8",
            )
            lora_scale = ValidatedSlider(
                -settings.MAX_LORA_WEIGHT, settings.MAX_LORA_WEIGHT, value=1.0, step=0.05, label="LoRA scale"
            )
            lora_fuse = gr.Checkbox(value=False, label="Fuse the LoRAs")
    with gr.Accordion(
        "Evaluation run (prompt adherence per model and category)", open=False, visible=not studio.public
    ):
        with gr.Row():
            chosen_categories = gr.CheckboxGroup(
                choices=known_categories, value=known_categories, label="Prompt categories"
            )
            chosen_models = gr.CheckboxGroup(choices=_model_choices(), value=["large"], label="Models")
        with gr.Row():
            seeds = gr.Textbox(value="0", label="Seeds (comma-separated)")
            eval_steps = gr.Textbox(value="", label="Steps (empty = preset)", placeholder="preset")
            eval_side = gr.Textbox(value="", label="Side px (empty = default)", placeholder="default")
        with gr.Row():
            evaluate_run = gr.Button("Run (resumes where it stopped)", variant="primary")
            evaluate_stop = gr.Button("Stop", variant="stop")
        eval_summary = gr.Dataframe(
            headers=["model", "category", "mean", "std", "n"], label="Per category", interactive=False
        )
        eval_file = gr.File(label="Results JSON (the Scoreboard reads it)")
        eval_rows = gr.Dataframe(
            headers=EVALUATION_ROW_HEADERS,
            label="Every image",
            interactive=False,
            wrap=True,
            column_widths=EVALUATION_ROW_WIDTHS,
        )

    # The settings /generate takes, after each endpoint's own parameters (positional callers keep working).
    shared_parameters = [
        parameter("negative_prompt", ""),
        parameter("guidance", ""),
        parameter("width", ""),
        parameter("height", ""),
        parameter("max_sequence_length", settings.DEFAULT_T5_TOKENS),
        parameter("skip_layer_guidance", "preset"),
        parameter("memory_mode", studio.memory_mode),
        parameter("lora", ""),
        parameter("lora_scale", 1.0),
        parameter("lora_fuse", False),
        parameter("request", None, gr.Request),
    ]
    shared_inputs = [
        negative_prompt, guidance, width, height, max_sequence_length, skip_layer_guidance, memory_mode, lora,
        lora_scale, lora_fuse,
    ]  # fmt: skip

    run.click(
        named_endpoint(
            roundtrip,
            [
                parameter("prompt"),
                parameter("model", "large"),
                parameter("seed", -1),
                parameter("steps", ""),
                parameter("second_opinion", False),
                *shared_parameters,
            ],
        ),
        inputs=[prompt, model, seed, steps, second_opinion, *shared_inputs],
        outputs=[image, summary, scores, diff, used_seed, details],
        api_name="roundtrip",
        concurrency_id=settings.GPU_CONCURRENCY_ID,
    )
    reverse_run.click(
        named_endpoint(
            reverse_trip,
            [
                parameter("image"),
                parameter("model", "large"),
                parameter("seed", -1),
                parameter("steps", ""),
                *shared_parameters[:-1],
                parameter("strength", ""),  # last, so positional callers keep working
                shared_parameters[-1],
            ],
        ),
        inputs=[upload, reverse_model, reverse_seed, reverse_steps, *shared_inputs, reverse_strength],
        outputs=[reverse_caption, redrawn, reverse_summary, reverse_details],
        api_name="roundtrip_image",
        concurrency_id=settings.GPU_CONCURRENCY_ID,
    )
    evaluate_run.click(
        named_endpoint(
            evaluate,
            [
                parameter("categories", known_categories),
                parameter("models", ["large"]),
                parameter("seeds", "0"),
                parameter("steps", ""),
                parameter("side", ""),
                parameter("progress", gr.Progress()),
                parameter("request", None, gr.Request),
            ],
        ),
        inputs=[chosen_categories, chosen_models, seeds, eval_steps, eval_side],
        outputs=[eval_summary, eval_rows, eval_file],
        api_name="evaluate",
        concurrency_id=settings.GPU_CONCURRENCY_ID,
    )

    def stop_evaluation(request: gr.Request):
        stop_evaluations.stop(request)

    evaluate_stop.click(stop_evaluation, queue=False, api_name="evaluate_stop")
    return {"prompt": prompt, "image": image, "diff": diff}


if __name__ == "__main__":
    launch_alone(build_roundtrip_tab, "Round trip")
