"""Image to image tab: img2img, inpainting (a brush mask) and variations (APIs ``/img2img``, ``/inpaint``,
``/variations``), on the generation service (pipelines/sd3/image_to_image.py)."""

from __future__ import annotations

import base64
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import gradio as gr
from fastapi import HTTPException
from gradio.components.base import server
from gradio.data_classes import FileData

from components.common import (
    StopRequests,
    UploadedImage,
    ValidatedNumber,
    ValidatedSlider,
    blank_to_none,
    client_identity,
    generation_request,
    launch_alone,
    markdown_text,
    named_endpoint,
    on_gpu,
    parameter,
    visitor_id,
)
from components.job_stream import stream_job
from pipelines import settings, workspace
from pipelines.catalog import CATALOG
from pipelines.images import load_image
from pipelines.memory import SD3_MODES
from pipelines.sd3.handoff import image_to_image_form_values
from pipelines.sd3.image_to_image import editor_images
from pipelines.sd3.jobs import ImageToImageRequest
from pipelines.sd3.png_info import read_generation_settings
from pipelines.sd3.text_to_image import MODEL_CHOICES
from pipelines.studio import Studio

OUTPUT_COUNT = 5  # gallery, summary, prompt used, preview, details
EDIT_PARTS = ("background", "composite", "layer")  # what the editor's page sends ahead of an event


@dataclass
class PendingEdit:
    """The files of one edit that the editor's page sent ahead of the event that reads them."""

    client: str
    background: bytes | None = None
    composite: bytes | None = None
    layers: dict[int, bytes] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return sum(len(data) for data in (self.background or b"", self.composite or b"", *self.layers.values()))


class PendingEdits:
    """Edits by the id the page chose, bounded: at most ``per_client`` a client (its oldest dropped), at
    most ``max_edits`` and ``max_bytes`` for everyone (the oldest dropped), layers only below ``max_layers``.

    Gradio's own store keeps every edit a client sends until an event reads it, and grows a layer list
    to whatever index the client names; these bounds are known before anything is stored.
    """

    def __init__(self, *, per_client: int, max_edits: int, max_bytes: int, max_layers: int) -> None:
        self.per_client, self.max_edits, self.max_bytes, self.max_layers = per_client, max_edits, max_bytes, max_layers
        self._edits: OrderedDict[str, PendingEdit] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, edit_id: str, client: str, part: str, index: int | None, data: bytes) -> None:
        if part not in EDIT_PARTS or (part == "layer" and not (index is not None and 0 <= index < self.max_layers)):
            raise ValueError(f"The editor sent an unknown part ({part} {index}); reload the page and draw again.")
        if len(data) > min(self.max_bytes, settings.MAX_UPLOAD_BYTES):
            raise ValueError("The editor's image is over the upload limit; downscale it and upload again.")
        with self._lock:
            edit = self._edits.get(edit_id)
            if edit is None or edit.client != client:
                if edit is not None:  # another client's id: never written into
                    raise ValueError("That edit is not yours; reload the page and draw again.")
                edit = self._edits[edit_id] = PendingEdit(client)
                own = [key for key, pending in self._edits.items() if pending.client == client]
                for key in own[: max(0, len(own) - self.per_client)]:
                    del self._edits[key]
            if part == "layer":
                edit.layers[index] = data
            else:
                setattr(edit, part, data)
            self._edits.move_to_end(edit_id)
            # At most max_edits to add up: the newest stays, whatever the others are.
            while len(self._edits) > 1 and (
                len(self._edits) > self.max_edits
                or sum(pending.size for pending in self._edits.values()) > self.max_bytes
            ):
                self._edits.popitem(last=False)

    def take(self, edit_id: str) -> PendingEdit | None:
        with self._lock:
            return self._edits.pop(edit_id, None)

    def __len__(self) -> int:
        return len(self._edits)


def _file_source(file: FileData | None):
    """An uploaded file as the safe decoder takes it: its path (or a data URL's bytes); never opened here."""
    if file is None:
        return None
    if file.url and file.url.startswith("data:"):
        return base64.b64decode(file.url.split(",", 1)[-1])
    return file.path


class EditorFiles(gr.ImageEditor):
    """An image editor that hands the Studio its files undecoded: ``{"background", "layers", "composite"}``
    as paths or bytes, decoded later by ``pipelines.sd3.image_to_image.editor_images``.

    ``gr.ImageEditor`` opens the image, the composite and every layer with PIL before the event runs, in
    any format Pillow knows (EPS through Ghostscript, PSD, ...), with its bomb warning silenced and no
    cap on layers. What the page sends ahead of the event (``accept_blobs``) is kept in ``PendingEdits``.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pending = PendingEdits(
            per_client=settings.MAX_PENDING_EDITS_PER_CLIENT,
            max_edits=settings.MAX_PENDING_EDITS,
            max_bytes=settings.MAX_PENDING_EDIT_BYTES,
            max_layers=settings.MAX_MASK_LAYERS,
        )

    def get_block_name(self) -> str:
        return "imageeditor"  # render with the stock editor front end

    def get_config(self, cls=None):
        return super().get_config(cls or gr.ImageEditor)  # the front end's props are ImageEditor's

    def preprocess(self, payload):
        if payload is None:
            return None
        if payload.id is not None:
            edit = self.pending.take(payload.id)
            if edit is None:
                return {"background": None, "layers": [], "composite": None}
            layers = [edit.layers[index] for index in sorted(edit.layers)]
            return {"background": edit.background, "layers": layers, "composite": edit.composite}
        return {
            "background": _file_source(payload.background),
            "layers": [_file_source(layer) for layer in payload.layers],
            "composite": _file_source(payload.composite),
        }

    @server
    def accept_blobs(self, data, request: gr.Request = None):
        """The page's files of one edit (its image, composite or a layer), kept until the event reads them."""
        fields = data.data
        index = fields.get("index")
        index = int(index) if index not in (None, "", "null") and str(index).isdigit() else None
        try:
            if not data.files:
                raise ValueError("The editor sent no file; draw again.")
            self.pending.put(str(fields.get("id")), client_identity(request), str(fields.get("type")), index,
                             data.files[0][1])  # fmt: skip
        except ValueError as error:  # the page's call answers 400 with the sentence, not a logged 500
            raise HTTPException(status_code=400, detail=str(error)) from None


def image_to_image_summary(details: dict) -> str:
    """One line for people about a details dict (clients read the dict)."""
    seeds = details["seeds"]
    summary = (
        f"{details['mode']}: {len(details['seeds'])} image(s), {details['output_size']}, strength "
        f"{details['strength']:g} = {details['steps_done']}/{details['denoising_steps']} denoising steps of "
        f"{details['steps']}, guidance {details['guidance']:g}, seed {seeds[0]}"
        + (f"–{seeds[-1]}" if len(seeds) > 1 else "")
        + f", {details['timings']['generate_seconds']:.1f} s"
    )
    if details["loras"]:
        summary += " · LoRA " + ", ".join(
            f"{markdown_text(item['name'])}:{item['weight']:g}" for item in details["loras"]
        )
    if details["caption"]:
        summary += f" · prompt = BLIP's caption: **{markdown_text(details['caption'])}**"
    if details["resized"]:
        summary += f" · drawn at {details['size']} (the input is {details['input_size']}, not a multiple of 16)"
    if details["stopped"]:
        summary += f" · stopped at step {details['steps_done']}"
    if details["tiny"]:
        summary += " · tiny random model: the images are noise by design"
    return summary


def estimated_gpu_seconds(*args, **named) -> int:
    """A generous ZeroGPU duration for one call: loading plus at most 100 steps of a ~1 MP image."""
    return 120


def _model_choices():
    return [(CATALOG[key].title.removeprefix("Stable Diffusion "), name) for name, key in MODEL_CHOICES.items()]


def build_image_to_image_tab(studio: Studio) -> dict:
    """Build the Image to image tab inside the current Blocks; returns its main components."""
    stop_requests = StopRequests()

    def redraw(picture, mask, prompt, negative_prompt, strength, model, seed, steps, guidance, lora, lora_scale,
               memory_mode, preview_every, progress, request, *, inpaint=False, mask_blur=None, paste_back=True,
               num_images=1, variations=False):  # fmt: skip
        """Stream previews, then yield (PNGs, summary, the prompt used, hidden preview, details)."""
        job = generation_request(
            prompt, model, negative_prompt=negative_prompt, seed=seed, steps=steps, guidance=guidance,
            num_images=num_images, memory_mode=memory_mode, lora=lora, lora_scale=lora_scale,
            preview_every=0 if preview_every is None else preview_every,
        )  # fmt: skip
        task = ImageToImageRequest(
            picture, job, strength=blank_to_none(strength), inpaint=inpaint, mask=mask,
            mask_blur=blank_to_none(mask_blur), paste_back=bool(paste_back), variations=variations,
        )  # fmt: skip
        visitor = visitor_id(request)
        stop = stop_requests.start(request)
        with workspace.request_folder(visitor) as folder:

            def run(on_step):
                return studio.generation(
                    task, owner=visitor, notify=gr.Info, on_step=on_step, should_stop=stop.is_set, folder=folder
                )

            for kind, value in stream_job(run, progress, name="sd3-img2img"):
                if kind == "preview":
                    yield (gr.skip(),) * 3 + (gr.update(value=value, visible=True), gr.skip())
                else:
                    outcome = value
            details = outcome.details
            for warning in details["warnings"]:
                gr.Warning(warning)
            paths = [str(path) for path in outcome.paths]
            hidden = gr.update(value=None, visible=False)
            yield paths, image_to_image_summary(details), details["prompt"], hidden, details

    def uploaded(image, what="an image"):
        if image is None:
            raise ValueError(f"Upload {what} (PNG, JPEG, WebP, GIF, BMP or TIFF) first.")
        return load_image(image)

    def img2img(image, prompt, negative_prompt, strength, model, seed, steps, guidance, lora, lora_scale,
                memory_mode, preview_every, progress, request):  # fmt: skip
        """Redraw ``image`` at ``strength`` (0.05-1: how much of the schedule is redrawn). The size follows the
        image (snapped to 16 within the model's range); an empty prompt is BLIP's caption of it."""
        yield from redraw(uploaded(image), None, prompt, negative_prompt, strength, model, seed, steps, guidance,
                          lora, lora_scale, memory_mode, preview_every, progress, request)  # fmt: skip

    def inpaint(image, mask, prompt, negative_prompt, strength, mask_blur, paste_back, model, seed, steps, guidance,
                lora, lora_scale, memory_mode, preview_every, progress, request):  # fmt: skip
        """Repaint ``image`` where ``mask`` is white (a mask image of the same size). ``paste_back`` keeps every
        pixel farther than ``mask_blur`` outside the mask exactly as it was; an empty prompt is BLIP's caption."""
        picture = uploaded(image)
        mask_image = None if mask is None else uploaded(mask, "a mask")
        yield from redraw(picture, mask_image, prompt, negative_prompt, strength, model, seed, steps, guidance, lora,
                          lora_scale, memory_mode, preview_every, progress, request, inpaint=True,
                          mask_blur=mask_blur, paste_back=paste_back)  # fmt: skip

    def inpaint_drawn(editor, mask, prompt, negative_prompt, strength, mask_blur, paste_back, model, seed, steps,
                      guidance, lora, lora_scale, memory_mode, preview_every, progress, request):  # fmt: skip
        """The Inpaint button: the image and the brush mask from the editor (an uploaded mask wins)."""
        editor = editor or {}
        # With an uploaded mask the layers are not read at all (not even counted).
        picture, brushed = editor_images(editor.get("background"), [] if mask is not None else editor.get("layers"))
        mask_image = uploaded(mask, "a mask") if mask is not None else brushed
        yield from redraw(picture, mask_image, prompt, negative_prompt, strength, model, seed, steps, guidance, lora,
                          lora_scale, memory_mode, preview_every, progress, request, inpaint=True,
                          mask_blur=mask_blur, paste_back=paste_back)  # fmt: skip

    def variations(image, strength, count, seed, model, steps, guidance, lora, lora_scale, memory_mode, progress,
                   request):  # fmt: skip
        """``count`` img2img redraws of ``image`` with BLIP's caption as the prompt, seeds seed, seed+1, ..."""
        yield from redraw(uploaded(image), None, "", "", strength, model, seed, steps, guidance, lora, lora_scale,
                          memory_mode, 0, progress, request, num_images=count, variations=True)  # fmt: skip

    def stop_run(request: gr.Request):
        stop_requests.stop(request)

    gr.Markdown(
        "Redraw an image with SD3.5: **img2img** keeps its composition at a strength you choose, **Inpaint** "
        "repaints only what you brush over. An empty prompt uses BLIP's caption of the image. The output keeps "
        "the image's size (snapped to multiples of 16 within the model's range)."
    )
    if not studio.tiny:
        gr.Markdown("The SD3.5 repos are gated: start the app with `HF_TOKEN`; a GPU makes this take seconds.")

    def settings_controls(strength_value: float):
        prompt = gr.Textbox(label="Prompt (empty = BLIP's caption of the image)", lines=2, value="",
                            max_length=settings.MAX_PROMPT_CHARS)  # fmt: skip
        negative_prompt = gr.Textbox(label="Negative prompt", value="", max_length=settings.MAX_PROMPT_CHARS)
        strength = ValidatedSlider.over(settings.STRENGTH, strength_value, "Strength (share of the schedule redrawn)")
        model = gr.Radio(choices=_model_choices(), value="large", label="Model")
        with gr.Row():
            seed = ValidatedNumber(value=-1, precision=0, label="Seed (-1 = random)", minimum=-1,
                                   maximum=settings.MAX_SEED)  # fmt: skip
            steps = gr.Textbox(value="", label="Steps (empty = preset)", placeholder="preset")
            guidance = gr.Textbox(value="", label="Guidance (empty = preset)", placeholder="preset")
        with gr.Accordion("LoRA, memory, previews", open=False):
            lora = gr.Textbox(value="", label="LoRAs (name:weight, comma-separated)", placeholder="pixel_style:0.8")
            lora_scale = ValidatedSlider(-settings.MAX_LORA_WEIGHT, settings.MAX_LORA_WEIGHT, value=1.0, step=0.05,
                                         label="LoRA scale")  # fmt: skip
            memory_mode = gr.Dropdown(
                choices=[("auto: the fastest that fits", "auto")]
                + [(f"{mode.key}: {mode.title}", mode.key) for mode in SD3_MODES],
                value=studio.memory_mode,
                label="Memory mode (quantization / offload)",
                visible=not studio.public,
            )
            preview_every = ValidatedSlider(0, settings.MAX_PREVIEW_EVERY, value=settings.DEFAULT_PREVIEW_EVERY,
                                            step=1, label="Preview every N steps (0 = off)")  # fmt: skip
        return (
            prompt,
            negative_prompt,
            strength,
            model,
            seed,
            steps,
            guidance,
            lora,
            lora_scale,
            memory_mode,
            preview_every,
        )

    def output_controls():
        preview = gr.Image(label="Preview", format="png", interactive=False, height=256, visible=False)
        gallery = gr.Gallery(label="Images", format="png", columns=2, height=420, preview=True)
        summary = gr.Markdown()
        prompt_used = gr.Textbox(label="Prompt used", interactive=False)
        with gr.Accordion("Details (JSON)", open=False):
            details = gr.JSON(label="Details")
        return [gallery, summary, prompt_used, preview, details]

    shared_parameters = [
        parameter("prompt", ""),
        parameter("negative_prompt", ""),
        parameter("strength", settings.DEFAULT_STRENGTH),
    ]
    tail_parameters = [
        parameter("model", "large"),
        parameter("seed", -1),
        parameter("steps", ""),
        parameter("guidance", ""),
        parameter("lora", ""),
        parameter("lora_scale", 1.0),
        parameter("memory_mode", studio.memory_mode),
        parameter("preview_every", settings.DEFAULT_PREVIEW_EVERY),
        parameter("progress", gr.Progress()),
        parameter("request", None, gr.Request),
    ]
    gpu = on_gpu(estimated_gpu_seconds)

    with gr.Tabs() as modes:
        with gr.Tab("img2img", id="img2img"), gr.Row():
            with gr.Column(scale=1):
                image = UploadedImage(label="Image", height=300)
                (prompt, negative_prompt, strength, model, seed, steps, guidance, lora, lora_scale, memory_mode,
                 preview_every) = settings_controls(settings.DEFAULT_STRENGTH)  # fmt: skip
                img2img_note = gr.Markdown(elem_classes=["sent-note"])  # what a hand-off could not carry
                with gr.Row():
                    run = gr.Button("Redraw", variant="primary", scale=3)
                    stop = gr.Button("Stop", variant="stop", scale=1)
                with gr.Accordion("Variations: BLIP's caption, several seeds", open=False):
                    with gr.Row():
                        variation_strength = ValidatedSlider.over(
                            settings.STRENGTH, settings.DEFAULT_VARIATION_STRENGTH, "Strength"
                        )
                        variation_count = ValidatedSlider(1, settings.MAX_IMAGES_PER_REQUEST, value=4, step=1,
                                                          label="Variations (seed, seed+1, ...)")  # fmt: skip
                    run_variations = gr.Button("Make variations")
            with gr.Column(scale=1):
                img2img_outputs = output_controls()
        with gr.Tab("Inpaint", id="inpaint"), gr.Row():
            with gr.Column(scale=1):
                editor = EditorFiles(
                    label="Image: brush over what to repaint",
                    type="filepath",
                    format="png",  # lossless: paste-back keeps the input's pixels exactly
                    brush=gr.Brush(colors=["#ffffff"], color_mode="fixed", default_size=24),
                    layers=False,
                    transforms=(),
                    height=380,
                )
                with gr.Accordion("Or upload a mask (white = repaint, the image's size)", open=False):
                    mask = UploadedImage(label="Mask", height=200)
                (inpaint_prompt, inpaint_negative, inpaint_strength, inpaint_model, inpaint_seed, inpaint_steps,
                 inpaint_guidance, inpaint_lora, inpaint_lora_scale, inpaint_memory,
                 inpaint_preview) = settings_controls(settings.DEFAULT_STRENGTH)  # fmt: skip
                with gr.Row():
                    mask_blur = ValidatedSlider.over(settings.MASK_BLUR, settings.DEFAULT_MASK_BLUR, "Mask blur (px)")
                    paste_back = gr.Checkbox(value=True, label="Paste back: keep every pixel outside the mask")
                inpaint_note = gr.Markdown(elem_classes=["sent-note"])
                with gr.Row():
                    inpaint_run = gr.Button("Inpaint", variant="primary", scale=3)
                    inpaint_stop = gr.Button("Stop", variant="stop", scale=1)
                # /inpaint for API clients: an image and a mask file (the editor's value is the page's own).
                api_image = UploadedImage(visible=False)
                api_run = gr.Button(visible=False)
            with gr.Column(scale=1):
                inpaint_outputs = output_controls()

    gr.on(
        triggers=[run.click],
        fn=named_endpoint(gpu(img2img), [parameter("image"), *shared_parameters, *tail_parameters]),
        inputs=[
            image,
            prompt,
            negative_prompt,
            strength,
            model,
            seed,
            steps,
            guidance,
            lora,
            lora_scale,
            memory_mode,
            preview_every,
        ],  # fmt: skip
        outputs=img2img_outputs,
        api_name="img2img",
        concurrency_id=settings.GPU_CONCURRENCY_ID,
    )
    run_variations.click(
        named_endpoint(
            gpu(variations),
            [
                parameter("image"),
                parameter("strength", settings.DEFAULT_VARIATION_STRENGTH),
                parameter("count", 4),
                parameter("seed", -1),
                parameter("model", "large"),
                parameter("steps", ""),
                parameter("guidance", ""),
                parameter("lora", ""),
                parameter("lora_scale", 1.0),
                parameter("memory_mode", studio.memory_mode),
                parameter("progress", gr.Progress()),
                parameter("request", None, gr.Request),
            ],
        ),
        inputs=[
            image,
            variation_strength,
            variation_count,
            seed,
            model,
            steps,
            guidance,
            lora,
            lora_scale,
            memory_mode,
        ],  # fmt: skip
        outputs=img2img_outputs,
        api_name="variations",
        concurrency_id=settings.GPU_CONCURRENCY_ID,
    )
    inpaint_parameters = [
        *shared_parameters,
        parameter("mask_blur", settings.DEFAULT_MASK_BLUR),
        parameter("paste_back", True),
        *tail_parameters,
    ]
    inpaint_inputs = [inpaint_prompt, inpaint_negative, inpaint_strength, mask_blur, paste_back, inpaint_model,
                      inpaint_seed, inpaint_steps, inpaint_guidance, inpaint_lora, inpaint_lora_scale, inpaint_memory,
                      inpaint_preview]  # fmt: skip
    api_run.click(
        named_endpoint(gpu(inpaint), [parameter("image"), parameter("mask"), *inpaint_parameters]),
        inputs=[api_image, mask, *inpaint_inputs],
        outputs=inpaint_outputs,
        api_name="inpaint",
        concurrency_id=settings.GPU_CONCURRENCY_ID,
    )
    inpaint_run.click(
        named_endpoint(gpu(inpaint_drawn), [parameter("editor"), parameter("mask"), *inpaint_parameters]),
        inputs=[editor, mask, *inpaint_inputs],
        outputs=inpaint_outputs,
        api_name="inpaint_drawn",
        api_visibility="private",
        concurrency_id=settings.GPU_CONCURRENCY_ID,
    )
    stop.click(stop_run, queue=False, api_name="img2img_stop")
    inpaint_stop.click(stop_run, queue=False, api_name="inpaint_stop")
    # A hand-off's note describes the form as it was sent: editing any of its fields clears it.
    for note, fields in ((img2img_note, (prompt, negative_prompt, strength, model, seed, steps, guidance)),
                         (inpaint_note, (inpaint_prompt, inpaint_negative, inpaint_strength, inpaint_model,
                                         inpaint_seed, inpaint_steps, inpaint_guidance))):  # fmt: skip
        gr.on([field.input for field in fields], lambda: "", outputs=note, queue=False, api_visibility="private")
    return {
        "image": image,
        "editor": editor,
        "modes": modes,
        "gallery": img2img_outputs[0],
        "run": run,
        # The fields a sent image fills (pipelines/sd3/handoff.IMAGE_TO_IMAGE_FIELDS), and the note beside them.
        "img2img_form": {
            "model": model,
            "prompt": prompt,
            "negative_prompt": negative_prompt,
            "seed": seed,
            "steps": steps,
            "guidance": guidance,
            "strength": strength,
        },  # fmt: skip
        "inpaint_form": {
            "model": inpaint_model,
            "prompt": inpaint_prompt,
            "negative_prompt": inpaint_negative,
            "seed": inpaint_seed,
            "steps": inpaint_steps,
            "guidance": inpaint_guidance,
            "strength": inpaint_strength,
        },  # fmt: skip
        "img2img_note": img2img_note,
        "inpaint_note": inpaint_note,
    }


def sent_image(path: str | None, current_model: str, tiny: bool) -> tuple[dict, str]:
    """(the form values ``path``'s own settings give, the note to show) for an image sent to img2img or
    inpaint: prompt, negative prompt, seed, steps, guidance and model, as A1111 carries them."""
    if path is None:
        return {}, ""
    try:
        info = read_generation_settings(path)
    except ValueError:  # a damaged record: the pixels still go, with the sentence why nothing else did
        info = None
    values, notes = image_to_image_form_values(info, current_model, tiny=tiny)
    carried = ", ".join(name.replace("_", " ") for name in values)
    note = (f"Sent with its {carried}." if values else "Sent.") + "".join(f" {note}" for note in notes)
    return values, markdown_text(note)


if __name__ == "__main__":
    launch_alone(build_image_to_image_tab, "Image to image")
