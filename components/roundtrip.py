"""Round trip tab: prompt -> image -> caption -> score, image -> caption -> image, and an evaluation run."""

from __future__ import annotations

import shutil

import gradio as gr

from components.common import (
    StopRequests,
    UploadedImage,
    ValidatedNumber,
    blank_to_none,
    launch_alone,
    named_endpoint,
    parameter,
    visitor_id,
)
from pipelines import settings, workspace
from pipelines.catalog import CATALOG
from pipelines.images import load_image
from pipelines.png_metadata import save_png
from pipelines.roundtrip import (
    PROMPTS_DIR,
    check_evaluation_size,
    evaluation_table,
    image_round_trip,
    load_prompts,
    prompt_round_trip,
    run_evaluation,
)
from pipelines.sd3 import MODEL_CHOICES, GenerateRequest, model_key, resolve_request
from pipelines.studio import Studio
from pipelines.validation import as_int

RESULTS_DIR = settings.EVALUATION_RESULTS_DIR  # the Scoreboard reads evaluations from here too
SCORE_NOTE = (
    "**Scores** are BLIP's: the mean log-probability per token of a text given the image (0 is the maximum; "
    "the same number as in the Match tab). *Prompt* asks whether BLIP would describe the image with the "
    "prompt's words: a proxy for prompt adherence, not a human judgement. ITM (optional) is the retrieval "
    "model's match probability."
)


def _model_choices():
    return [(CATALOG[key].title.removeprefix("Stable Diffusion "), name) for name, key in MODEL_CHOICES.items()]


def build_roundtrip_tab(studio: Studio) -> dict:
    """Build the Round trip tab inside the current Blocks; returns its main components."""
    stop_evaluations = StopRequests()
    known_categories = sorted(path.stem for path in PROMPTS_DIR.glob("*.txt"))

    # The functions that return a file are generators: the file is written into a folder of this
    # request and yielded; Gradio copies it to its cache, then the folder is deleted.
    def roundtrip(prompt, model, seed, steps, second_opinion, request):
        key = model_key(model)
        request = GenerateRequest(
            prompt=prompt, model=model, seed=-1 if seed is None else seed, steps=blank_to_none(steps)
        )
        resolve_request(request, tiny=studio.tiny)  # refuse a bad request before loading two models
        trip = prompt_round_trip(
            studio.manager.get(key),
            request,
            studio.matcher(),
            repo_id=CATALOG[key].repo_id,
            tiny=studio.tiny,
            second_opinion=bool(second_opinion),
        )
        generated = trip.generated
        scores = [
            ["prompt", trip.prompt_fit.text, round(trip.prompt_fit.mean_logprob, 4), trip.prompt_fit.itm_probability],
            [
                "BLIP's caption",
                trip.caption_fit.text,
                round(trip.caption_fit.mean_logprob, 4),
                trip.caption_fit.itm_probability,
            ],
        ]
        summary = (
            f"Seed {generated.seeds[0]}, {generated.request.steps} steps, {generated.seconds:.1f} s. "
            f"BLIP wrote: **{trip.caption}**"
        )
        if trip.second_opinion_note:
            summary += f"\n\nNo second opinion: {trip.second_opinion_note}"
        if studio.tiny:
            summary += (
                "\n\nTiny random models: image, caption and scores are real computations of models that learnt nothing."
            )
        with workspace.request_folder(visitor_id(request)) as folder:
            name = workspace.unique_name("roundtrip", generated.seeds[0], suffix=".png")
            path = save_png(trip.image, folder / name, generated.parameters[0], generated.settings[0])
            yield str(path), summary, scores, trip.diff, generated.seeds[0]

    def reverse_trip(image, model, seed, request):
        if image is None:
            raise ValueError("Upload an image (PNG, JPEG, WebP, GIF, BMP or TIFF) first.")
        picture = load_image(image)
        key = model_key(model)
        seed = -1 if seed is None else as_int("seed", seed, -1, settings.MAX_SEED)
        caption, generated, fit = image_round_trip(
            picture,
            studio.manager.get(key),
            studio.matcher(),
            repo_id=CATALOG[key].repo_id,
            model=model,
            seed=seed,
            tiny=studio.tiny,
        )
        with workspace.request_folder(visitor_id(request)) as folder:
            name = workspace.unique_name("redrawn", generated.seeds[0], suffix=".png")
            path = save_png(generated.images[0], folder / name, generated.parameters[0], generated.settings[0])
            fits = f"The caption fits the redrawn image with a mean log-prob of {fit.mean_logprob:.3f}."
            yield caption, str(path), fits

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
        rows = [
            [
                row["model"],
                row["seed"],
                row["category"],
                row["prompt"],
                row["caption"],
                round(row["prompt_mean_logprob"], 4),
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
                headers=["text", "words", "mean log-prob", "ITM P(match)"],
                label="How well the image fits",
                interactive=False,
                wrap=True,
            )
            used_seed = gr.Number(visible=False)
    with gr.Accordion("Image → caption → image", open=False):
        with gr.Row():
            upload = UploadedImage(label="Your image", height=280)
            redrawn = gr.Image(label="Drawn from BLIP's caption", format="png", interactive=False, height=280)
        with gr.Row():
            reverse_model = gr.Radio(choices=_model_choices(), value="large", label="Model")
            reverse_seed = ValidatedNumber(value=-1, precision=0, label="Seed (-1 = random)")
            reverse_run = gr.Button("Caption, then draw the caption", variant="primary")
        reverse_caption = gr.Textbox(label="BLIP's caption", interactive=False)
        reverse_summary = gr.Markdown()
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
            headers=["model", "seed", "category", "prompt", "caption", "prompt mean log-prob"],
            label="Every image",
            interactive=False,
            wrap=True,
        )

    run.click(
        named_endpoint(
            roundtrip,
            [
                parameter("prompt"),
                parameter("model", "large"),
                parameter("seed", -1),
                parameter("steps", ""),
                parameter("second_opinion", False),
                parameter("request", None, gr.Request),
            ],
        ),
        inputs=[prompt, model, seed, steps, second_opinion],
        outputs=[image, summary, scores, diff, used_seed],
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
                parameter("request", None, gr.Request),
            ],
        ),
        inputs=[upload, reverse_model, reverse_seed],
        outputs=[reverse_caption, redrawn, reverse_summary],
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
