"""The Generate tab's LoRA panel: load, list, mix and unload SD3.5 LoRAs (API ``/lora_load``, ``/lora_list``, ``/lora_unload``).

What a generation uses is the ``lora`` text ("name:0.8, other:0.5"), the same
parameter ``/generate`` takes, so the page and a script mix LoRAs the same way.
Loading adds the LoRA to that text at its default weight; unloading removes it.
A name in that text (or a ``<lora:name:w>`` tag in the prompt) that is not loaded
yet loads on demand from the LoRA folder or the registry (``pipelines.sd3.generation``);
loading here first only checks it early. Models come from the generation service too.

An uploaded LoRA belongs to the visitor who sent it (``visitor_id``): nobody else
lists, uses or unloads it. On a public instance so does a LoRA a visitor names from
the Hub or the registry; the operator's folder LoRAs are shared, and visitors cannot
unload those. A Hub repo a visitor names is fetched by ``load_hub_lora``: public repos
only, checked by its header against the model before the download, charged to the
client (``client_identity``), never through the operator's Hugging Face cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from components.common import (
    ValidatedSlider,
    blank_to_none,
    client_identity,
    named_endpoint,
    parameter,
    visitor_id,
)
from pipelines import settings
from pipelines.catalog import SD3_LABELS
from pipelines.lora.formats import PICKLED_SUFFIXES
from pipelines.lora.library import LIST_HEADERS, LoadedLora
from pipelines.lora.sources import list_lora_files, resolve_lora_source, sanitize_lora_name
from pipelines.sd3.text_to_image import MODEL_CHOICES, model_key
from pipelines.studio import HUB_REPO_ID, Studio
from pipelines.validation import as_float

TABLE_HEADERS = ["model", *LIST_HEADERS]


@dataclass
class LoraPanel:
    lora: gr.Textbox  # the active set: "name:weight, ..."
    lora_scale: gr.Slider
    lora_fuse: gr.Checkbox
    table: gr.Dataframe
    note: gr.Markdown
    model: gr.Radio  # the Generate tab's model choice, which the panel's LoRAs belong to
    file_choice: gr.Dropdown  # "Files in the LoRA folder"
    accordion: gr.Accordion  # the panel itself, opened to show a LoRA loaded from elsewhere
    # (details, active, request) -> new values for ``loaded_outputs()``, or None where nothing changes:
    # show a LoRA that "Load the result" put on a model (see show_training_result).
    show_loaded: Callable = None

    def loaded_outputs(self) -> list:
        return [self.model, self.lora, self.table, self.note, self.file_choice, self.accordion]


def active_without(active: str, names: list[str]) -> str:
    """The ``lora`` text with ``names`` taken out (names compared as the library stores them)."""
    removed = set(names)
    kept = [item.strip() for item in (active or "").split(",") if item.strip()]
    return ", ".join(item for item in kept if sanitize_lora_name(item.partition(":")[0]) not in removed)


def active_with(active: str, name: str, weight: float) -> str:
    """The ``lora`` text with ``name:weight`` added (replacing an earlier weight for that name)."""
    kept = active_without(active, [name])
    return ", ".join(part for part in (kept, f"{name}:{weight:g}") if part)


def lora_rows(studio: Studio, model: str = "", visitor: str | None = None) -> list[list]:
    """One row per loaded LoRA ``visitor`` may use (of ``model``, or of every SD3.5 model when empty)."""
    keys = [model_key(model)] if model else list(studio.sd3_loras)
    return [[key, *row] for key in keys for row in studio.sd3_loras[key].list(visitor)]


def show_training_result(studio: Studio, details, active: str, visitor: str | None) -> tuple:
    """(model, active set, table rows, note, file choices, accordion) once a trained LoRA is loaded, or Nones.

    ``details`` is ``/train_load_result``'s dict as the page holds it: nothing in it is trusted beyond
    naming a LoRA that is loaded, for ``visitor``, on the model it names; the trigger words and the weight
    come from the loaded LoRA itself.
    """
    unchanged = (None,) * 6
    if not isinstance(details, dict) or details.get("kind") != "sd3" or details.get("model") not in MODEL_CHOICES:
        return unchanged
    key = MODEL_CHOICES[details["model"]]
    library = studio.sd3_loras[key]
    name = details.get("name")
    if not isinstance(name, str) or name not in library.names(visitor):
        return unchanged
    loaded = library.get(name, visitor)
    kept = [item for item in (active or "").split(",") if item.partition(":")[0].strip() in library.names(visitor)]
    lora_text = active_with(", ".join(kept), name, loaded.default_scale)
    triggers = f" Trigger word: **{', '.join(loaded.trigger_words)}** (added to the prompt)." * bool(
        loaded.trigger_words
    )
    note = f"**{name}** from the Train tab is active on {SD3_LABELS[details['model']]}.{triggers}"
    choices = gr.update(choices=list_lora_files(studio.lora_dir))
    shown = gr.Accordion(open=True)
    return details["model"], lora_text, lora_rows(studio, visitor=visitor), note, choices, shown


def names_a_hub_repo(studio: Studio, source: str) -> bool:
    """Whether ``Studio.lora_source`` would read ``source`` as a Hub repo id (owner/name)."""
    source = str(source or "").strip()
    if not HUB_REPO_ID.match(source) or Path(source).suffix.lower() in (".safetensors", *PICKLED_SUFFIXES):
        return False
    try:
        if source in studio.lora_registry():
            return False
    except (OSError, ValueError):
        pass
    return not (Path(studio.lora_dir) / source).exists()


def load_hub_lora(
    studio: Studio,
    key: str,
    repo: str,
    *,
    weight_name: str = "",
    name: str | None = None,
    scale: float | None = None,
    memory_mode: str | None = None,
    notify=None,
    visitor: str | None = None,
    client: str = "local",
) -> LoadedLora:
    """``Studio.load_sd3_lora`` for a Hub repo a visitor names: the model first, so that the file's header
    is checked against it before a byte of weights is downloaded, charged to ``client``."""
    if studio.public and memory_mode:
        side = settings.PLAN_DEFAULT_SIDE
        studio.memory_mode_for(memory_mode, key, side, side)
        memory_mode = None  # as loaded, else the operator's mode
    pipeline = studio.generation.pipeline(key, memory_mode, notify)
    library = studio.sd3_loras[key]
    source = resolve_lora_source(
        repo=repo,
        weight_name=weight_name or None,
        client=client,
        check_header=lambda header, label: library.check_header(pipeline, header, label),
    )
    return library.load(pipeline, source, name=name, scale=scale, visitor=visitor)


def _registry_choices(studio: Studio) -> list[tuple[str, str]]:
    try:
        registry = studio.lora_registry()
    except (OSError, ValueError):
        return []
    choices = []
    for entry in registry.values():
        bases = "/".join(base.removeprefix("sd35-") for base in entry.bases)
        triggers = f" — trigger: {', '.join(entry.trigger_words)}" if entry.trigger_words else ""
        choices.append((f"{entry.name} ({bases}){triggers}", entry.name))
    return choices


def build_lora_panel(studio: Studio, model: gr.Radio, memory_mode: gr.Dropdown) -> LoraPanel:
    """The LoRA accordion, inside the current Blocks; ``model`` and ``memory_mode`` are the tab's own inputs."""

    def load_lora(source, weight_name, upload, model, name, scale, memory_mode, active, progress, request):
        """Load a LoRA onto the chosen SD3.5 model and add it to the active set at its default weight.

        An upload is the caller's own LoRA; a public instance refuses a memory mode other than its own.
        """
        key = model_key(model)
        visitor = visitor_id(request)
        progress(0, desc=f"loading {key} and the LoRA")
        upload = getattr(upload, "name", upload) or None
        options = dict(
            name=(name or "").strip() or None,
            scale=None if blank_to_none(scale) is None else as_float("scale", scale, 0, settings.MAX_LORA_WEIGHT),
            memory_mode=None if memory_mode in (None, "", "auto") else memory_mode,
            notify=gr.Info,
            visitor=visitor,
        )
        if upload is None and names_a_hub_repo(studio, source):
            loaded = load_hub_lora(
                studio,
                key,
                str(source).strip(),
                weight_name=weight_name or "",
                client=client_identity(request),
                **options,
            )
        else:
            loaded = studio.load_sd3_lora(key, source or "", weight_name=weight_name or "", upload=upload, **options)
        for warning in loaded.warnings:
            gr.Warning(warning)
        triggers = f" Trigger words, added to the prompt when it is active: {', '.join(loaded.trigger_words)}." * bool(
            loaded.trigger_words
        )
        note = (
            f"Loaded **{loaded.name}** ({loaded.style} keys, {loaded.modules_changed} layers changed) "
            f"on {key}.{triggers}"
        )
        return lora_rows(studio, visitor=visitor), note, active_with(active or "", loaded.name, loaded.default_scale)

    def list_loras(request: gr.Request):
        """The loaded LoRAs of every SD3.5 model that the caller may use (the first column names the model)."""
        return lora_rows(studio, visitor=visitor_id(request))

    def unload_lora(name, model, active, request):
        """Unload one LoRA by name, or all of this model's with an empty name; the base model draws again.

        Only the caller's own uploads go, and on a public instance never a shared LoRA.
        """
        key = model_key(model)
        visitor = visitor_id(request)
        library = studio.sd3_loras[key]
        if not library.names(visitor):
            return lora_rows(studio, visitor=visitor), f"No LoRA is loaded on {key}.", active or ""
        pipeline = studio.generation.pipeline(key, notify=gr.Info)  # as loaded: unloading never reloads it
        removed = library.unload(pipeline, (name or "").strip() or None, visitor=visitor, shared=not studio.public)
        note = f"Unloaded {', '.join(removed)} from {key}." if removed else f"None of your LoRAs is loaded on {key}."
        return lora_rows(studio, visitor=visitor), note, active_without(active, removed)

    with gr.Accordion("LoRA", open=False) as accordion:
        lora = gr.Textbox(
            value="",
            label="Active LoRAs (name:weight, comma-separated; empty = the base model)",
            placeholder="pixel_style:0.8, ink:0.5",
        )
        with gr.Row():
            lora_scale = ValidatedSlider(
                -settings.MAX_LORA_WEIGHT,
                settings.MAX_LORA_WEIGHT,
                value=1.0,
                step=0.05,
                label="LoRA scale (multiplies the weights above; not the prompt's <lora:name:w> tags)",
            )
            lora_fuse = gr.Checkbox(
                value=False, label="Fuse the active LoRAs (faster steps; not in NF4/8-bit or sequential modes)"
            )
        with gr.Row():
            registry_choice = gr.Dropdown(choices=_registry_choices(studio), value=None, label="Curated LoRAs")
            file_choice = gr.Dropdown(
                choices=list_lora_files(studio.lora_dir),
                value=None,
                label=f"Files in the LoRA folder ({studio.lora_dir.name}/)",
            )
            refresh = gr.Button("↻", size="sm", scale=0, min_width=40)
        with gr.Row():
            source = gr.Textbox(
                value="", label="Source: registry name, file in the LoRA folder, or Hub repo id", scale=2
            )
            weight_name = gr.Textbox(value="", label="weight_name (Hub repos with several files)", scale=1)
        upload = gr.File(label="…or upload a .safetensors LoRA", file_types=[".safetensors"])
        with gr.Row():
            name = gr.Textbox(value="", label="Name (optional)", scale=1)
            scale = gr.Textbox(value="", label="Default weight (empty = the LoRA's own)", scale=1)
        with gr.Row():
            load = gr.Button("Load LoRA", variant="secondary")
            unload_name = gr.Textbox(value="", label="Unload (name; empty = all)", scale=2)
            unload = gr.Button("Unload", variant="stop", scale=1)
        note = gr.Markdown()
        table = gr.Dataframe(headers=TABLE_HEADERS, value=[], interactive=False, label="Loaded LoRAs", wrap=True)
        gr.Markdown(
            "SD3.5 LoRAs in diffusers/peft format load as they are; kohya, ComfyUI and OneTrainer files are "
            "converted exactly or refused by name. Only `.safetensors` (pickles can run code)."
            + (" Tiny mode: the curated list holds tiny random LoRAs built offline." if studio.tiny else "")
        )

    registry_choice.input(lambda value: value or "", inputs=registry_choice, outputs=source, api_visibility="private")
    file_choice.input(lambda value: value or "", inputs=file_choice, outputs=source, api_visibility="private")
    refresh.click(
        lambda: gr.update(choices=list_lora_files(studio.lora_dir)),
        outputs=file_choice,
        queue=False,
        api_visibility="private",
    )
    load.click(
        named_endpoint(
            load_lora,
            [
                parameter("source", ""),
                parameter("weight_name", ""),
                parameter("upload", None),
                parameter("model", "large"),
                parameter("name", ""),
                parameter("scale", ""),
                parameter("memory_mode", "auto"),
                parameter("active", ""),
                parameter("progress", gr.Progress()),
                parameter("request", None, gr.Request),
            ],
        ),
        inputs=[source, weight_name, upload, model, name, scale, memory_mode, lora],
        outputs=[table, note, lora],
        api_name="lora_load",
        concurrency_id=settings.GPU_CONCURRENCY_ID,
    )
    unload.click(
        named_endpoint(
            unload_lora,
            [
                parameter("name", ""),
                parameter("model", "large"),
                parameter("active", ""),
                parameter("request", None, gr.Request),
            ],
        ),
        inputs=[unload_name, model, lora],
        outputs=[table, note, lora],
        api_name="lora_unload",
        concurrency_id=settings.GPU_CONCURRENCY_ID,
    )
    gr.on(
        triggers=[model.change],
        fn=named_endpoint(list_loras, [parameter("request", None, gr.Request)]),
        inputs=None,
        outputs=table,
        api_name="lora_list",
        queue=False,
    )

    def page_opened(request: gr.Request):
        # A fresh page shows what is loaded already, and the LoRA folder as it is now (trained runs included).
        return lora_rows(studio, visitor=visitor_id(request)), gr.update(choices=list_lora_files(studio.lora_dir))

    gr.on(
        triggers=None, fn=page_opened, inputs=None, outputs=[table, file_choice], queue=False, api_visibility="private"
    )

    def show_loaded(details, active, request: gr.Request):
        return show_training_result(studio, details, active, visitor_id(request))

    return LoraPanel(
        lora=lora,
        lora_scale=lora_scale,
        lora_fuse=lora_fuse,
        table=table,
        note=note,
        model=model,
        file_choice=file_choice,
        accordion=accordion,
        show_loaded=show_loaded,
    )
