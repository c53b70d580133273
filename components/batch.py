"""Batch tab: caption many images or a zip for LoRA training (API ``/caption_batch``)."""

from __future__ import annotations

import base64
import dataclasses
import gc
import io
import shutil
import tempfile
import time
from pathlib import Path

import gradio as gr
import torch

from components.caption import BASE_MODEL_LABEL, build_adapter_picker, requested_adapter
from components.common import (
    OUT_OF_MEMORY_MESSAGE,
    StopRequests,
    ValidatedSlider,
    client_identity,
    download_folder,
    launch_alone,
    named_endpoint,
    parameter,
    visitor_id,
)
from components.decoding import build_decoding_controls, decoding_parameters, request_from_values
from pipelines import settings
from pipelines.blip.batch_caption import (
    CaptionedImage,
    FailedImage,
    KeptZips,
    caption_decoration,
    caption_files,
    collect_uploads,
    dataset_zip,
    edited_results,
    least_zip_bytes,
    shown_source,
    sidecar_name,
)
from pipelines.images import load_image
from pipelines.settings import CaptionStrategy
from pipelines.studio import Studio
from pipelines.validation import as_int

TABLE_HEADERS = ["image", "file", "caption", "score"]
FILE_COLUMN, CAPTION_COLUMN = TABLE_HEADERS.index("file"), TABLE_HEADERS.index("caption")
THUMBNAIL_SIDE = 64
MAX_THUMBNAILS = 200  # rows past this show no thumbnail, keeping the page light


def thumbnail_markdown(path: Path) -> str:
    """A small inline JPEG, so the table shows what was captioned without serving files.

    The file goes through ``load_image``, the same safe decoder the captioner used: only the
    upload formats, and size and pixel limits checked before any pixel is decoded. "" if refused.
    """
    try:
        image = load_image(path)
    except ValueError:  # the caption row already says whether the file was readable
        return ""
    image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return f"![]({'data:image/jpeg;base64,' + base64.b64encode(buffer.getvalue()).decode()})"


def result_rows(results: list[CaptionedImage | FailedImage], root: Path) -> list[list]:
    """Table rows; only captioned images get a thumbnail (a refused file is never opened again)."""
    rows = []
    for index, item in enumerate(results):
        if isinstance(item, CaptionedImage):
            thumbnail = thumbnail_markdown(root / item.file_name) if index < MAX_THUMBNAILS else ""
            rows.append([thumbnail, item.file_name, item.text, round(item.score, 4)])
        else:
            rows.append(["", item.file_name, f"⚠ {item.reason}", None])
    return rows


def summary_markdown(
    captioned: int, failures: list[FailedImage], total: int, seconds: float, stopped: bool, adapter: str | None = None
) -> str:
    lines = [f"**{captioned} of {total} images captioned** in {seconds:.1f} s with {adapter_words(adapter)}."]
    if stopped:
        lines.append("Stopped on request: the captions made so far are in the zip.")
    if failures:
        lines.append(f"**{len(failures)} file(s) could not be used:**")
        lines += [f"- `{failure.file_name}`: {failure.reason}" for failure in failures]
    return "\n".join(lines)


def renamed_markdown(renamed: dict[str, str]) -> str:
    """A paragraph naming the images renamed in the zip so that no two share a sidecar; empty if none."""
    if not renamed:
        return ""
    lines = [f"\n\n**{len(renamed)} image(s) renamed in the zip** so that each has its own `.txt` caption:"]
    lines += [
        f"- `{old}` → `{new}` (it would have shared `{sidecar_name(old)}`)" for old, new in sorted(renamed.items())
    ]
    return "\n".join(lines)


def converted_markdown(converted: dict[str, str]) -> str:
    """A paragraph naming the BMP, TIFF and GIF images stored as PNG in the zip; empty if none."""
    if not converted:
        return ""
    listed = ", ".join(
        f"`{old}` → `{new}`" if old != new else f"`{old}`" for old, new in sorted(converted.items())[:10]
    )
    more = ", ..." if len(converted) > 10 else ""
    return f"\n\n**{len(converted)} image(s) stored as PNG in the zip** (with their captions): {listed}{more}."


def kept_zips() -> KeptZips:
    """The book of Batch zips kept in Gradio's cache, with the caps and the cache's lifetime from settings."""
    return KeptZips(settings.MAX_BATCH_KEPT_BYTES_PER_CLIENT, settings.MAX_BATCH_KEPT_BYTES, settings.CACHE_SECONDS)


def adapter_words(adapter: str | None) -> str:
    return f"the adapter {adapter}" if adapter else f"the {BASE_MODEL_LABEL}"


def make_caption_batch_function(studio: Studio, stop_requests: StopRequests, kept: KeptZips | None = None):
    """The `/caption_batch` endpoint: uploads are laid out in a work folder that is deleted when the call ends.

    The zip stays in Gradio's cache, counted in ``kept`` for the caller's client identity.
    """
    kept = kept_zips() if kept is None else kept

    def caption_batch(files, batch_size, trigger, suffix, include_images, progress, request, adapter="", **decoding):
        # 1. Check every input before any upload is unpacked.
        if not files:
            raise ValueError("Upload some images, or a .zip of images, first.")
        caption_request = request_from_values(decoding, num_captions=1).validated()
        batch_size = as_int("batch_size", batch_size, 1, settings.MAX_BATCH_SIZE)
        trigger, suffix = caption_decoration("trigger", trigger), caption_decoration("suffix", suffix)
        captioner = studio.captioner()
        # A wrong name, or another visitor's upload, fails before any upload work.
        adapter = captioner.check_adapter(studio.blip_adapters.use(requested_adapter(adapter), visitor_id(request)))
        client = client_identity(request)
        kept.check_room(client)  # a client whose zips fill its share unpacks nothing
        stop = stop_requests.start(request)

        # 2. Unpack, caption and zip inside a work folder that never outlives the request.
        with tempfile.TemporaryDirectory(prefix="studio-batch-") as work:
            uploads = collect_uploads(
                [getattr(file, "name", file) for file in files],
                Path(work) / "dataset",
                max_files=settings.MAX_BATCH_FILES,
                max_unpacked_bytes=settings.MAX_ZIP_UNCOMPRESSED_BYTES,
                max_ratio=settings.MAX_ZIP_RATIO,
            )
            if not uploads.files and not uploads.failures:
                raise ValueError("No images were found in the upload; use PNG, JPEG, WebP, GIF, BMP or TIFF files.")
            kept.check_room(client, least_zip_bytes(uploads.files) if include_images else 0)  # before captioning
            results, seconds, error_note = _caption_uploads(
                captioner, uploads, caption_request, batch_size, trigger, suffix, adapter, stop, progress
            )
            captioned = [item for item in results if isinstance(item, CaptionedImage)]
            failures = [item for item in results if isinstance(item, FailedImage)] + uploads.failures
            images = {item.file_name: uploads.root / item.file_name for item in captioned} if include_images else None
            manifest = {  # names and settings only: no server path (a local folder shows its name)
                "model": shown_source(studio.manager.source_for("blip-caption")),
                "adapter": adapter,  # null: the base model
                "adapter_source": shown_source(
                    next((info.source for info in studio.blip_adapters.loaded() if info.name == adapter), None)
                ),
                "request": dataclasses.asdict(caption_request),
                "trigger": trigger,
                "suffix": suffix,
                "images": len(uploads.files),
                "captioned": len(captioned),
                "failed": len(failures),
                "images_in_zip": bool(include_images),
            }
            archive = _write_zip(kept, client, results + uploads.failures, images=images, manifest=manifest)
            rows = result_rows(results + uploads.failures, uploads.root)  # thumbnails before the folder goes
        # What "Save edited captions" rewrites: held by the server, one entry per table row, in order.
        batch = {
            "results": results + uploads.failures,
            "zip": str(archive.path),
            "names": archive.names,
            "manifest": manifest,
        }

        # 3. Say what happened.
        summary = summary_markdown(len(captioned), failures, len(uploads.files), seconds, stop.is_set(), adapter)
        summary += renamed_markdown(archive.renamed) + converted_markdown(archive.converted)
        if caption_request.strategy == CaptionStrategy.SAMPLING:
            summary += f"\n\nSampling seed {caption_request.seed} (in the zip's captioning.json)."
        if studio.tiny:
            summary += "\n\nTiny random model: the captions are gibberish by design."
        if captioned:
            summary += "\n\nEdit any caption in the table, then press **Save edited captions** to rebuild the zip."
        return rows, str(archive.path), summary + error_note, batch

    return named_endpoint(
        caption_batch,
        [
            parameter("files"),
            parameter("batch_size", settings.DEFAULT_BATCH_SIZE),
            parameter("trigger", ""),
            parameter("suffix", ""),
            parameter("include_images", True),
            parameter("progress", gr.Progress()),
            parameter("request", None, gr.Request),
            *decoding_parameters(skip=("num_captions",)),
            parameter("adapter", ""),  # new parameters go at the end, so positional API callers keep working
        ],
    )


def make_export_function(kept: KeptZips | None = None):
    """The `/caption_batch_export` endpoint: the last batch's zip again, with the captions as edited in ``table``.

    Only the caption cells come from the page; the files, the images and the settings are the
    server's own record of this session's last batch (``batch``, a ``gr.State``). The new zip
    replaces the batch's previous one (deleted), so saving again never adds another copy.
    """
    kept = kept_zips() if kept is None else kept

    def caption_batch_export(table, batch, request):
        if not isinstance(batch, dict) or not batch.get("results"):
            raise ValueError("Caption a batch first; then edit its captions and save them.")
        source = Path(batch["zip"])
        if not kept.holds(source) or not source.is_file():
            raise ValueError("This batch's files have expired; caption the images again.")
        rows = table.get("data", []) if isinstance(table, dict) else table  # the API may send {"headers", "data"}
        results, edited = edited_results(
            batch["results"], rows if isinstance(rows, list) else [], file_column=FILE_COLUMN,
            caption_column=CAPTION_COLUMN,
        )  # fmt: skip
        manifest = {**batch["manifest"], "edited_captions": edited}
        archive = _write_zip(
            kept, client_identity(request), results, images_zip=source, names=batch["names"], manifest=manifest
        )
        listed = ", ".join(f"`{name}`" for name in edited[:10]) + (", ..." if len(edited) > 10 else "")
        summary = (
            f"**Saved {len(edited)} edited caption(s)** in a new zip: {listed}."
            if edited
            else "No caption differs from BLIP's; the new zip holds the same captions."
        )
        return str(archive.path), summary, {"edited": edited}, {**batch, "zip": str(archive.path)}

    return named_endpoint(
        caption_batch_export,
        [parameter("table", None), parameter("batch", None), parameter("request", None, gr.Request)],
    )


def _write_zip(kept: KeptZips, client: str, results, *, images_zip: Path | None = None, **options):
    """``dataset_zip`` into a fresh download folder, within ``client``'s room in ``kept``; it replaces ``images_zip``."""
    with kept.writing(client, replacing=images_zip) as room:
        if images_zip is not None and not images_zip.is_file():  # expired while waiting for the writer's turn
            raise ValueError("This batch's files have expired; caption the images again.")
        download = download_folder("studio-batch-")
        try:
            archive = dataset_zip(results, download / "captions.zip", images_zip=images_zip, max_bytes=room, **options)
        except BaseException:
            shutil.rmtree(download, ignore_errors=True)
            raise
        kept.keep(client, archive.path, replacing=images_zip)
    return archive


def _caption_uploads(captioner, uploads, caption_request, batch_size, trigger, suffix, adapter, stop, progress):
    """(results, seconds, error note): every caption made before the end or the first error."""
    results: list[CaptionedImage | FailedImage] = []
    started = time.perf_counter()
    total = len(uploads.files)
    progress((0, total), desc="captioning", unit="images")
    error_note = ""
    try:
        for batch in caption_files(
            captioner,
            uploads.files,
            uploads.root,
            caption_request,
            batch_size=batch_size,
            num_workers=settings.BATCH_LOADER_WORKERS,
            trigger=trigger,
            suffix=suffix,
            should_stop=stop.is_set,
            adapter=adapter,
        ):
            results.extend(batch)
            progress((len(results), total), desc="captioning", unit="images")
    except Exception as error:  # keep every caption already made, and say what stopped the rest
        reason = OUT_OF_MEMORY_MESSAGE if isinstance(error, torch.OutOfMemoryError) else f"{error}"
        gr.Warning(f"The batch stopped early: {reason} The captions made so far are kept.")
        error_note = f"\n\nStopped early by an error: {reason}"
        out_of_memory = isinstance(error, torch.OutOfMemoryError)
    else:
        out_of_memory = False
    if out_of_memory:  # outside the except block, so the failed batch's tensors are gone first
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return results, time.perf_counter() - started, error_note


def build_batch_tab(studio: Studio) -> dict:
    """Build the Batch tab inside the current Blocks; returns its main components."""
    stop_requests = StopRequests()
    kept = kept_zips()  # both events count the zips they leave in Gradio's cache

    def stop_batch(request: gr.Request):
        stop_requests.stop(request)
        gr.Info("Stopping after the current batch; the captions made so far will be downloadable.")

    gr.Markdown(
        "Caption a dataset for LoRA training. Drop images or a .zip; get a zip with one `<stem>.txt` per image "
        "(kohya-ss, taggui), `metadata.jsonl` (Hugging Face `imagefolder`), `captions.csv` and "
        "`captioning.json` (model, adapter, settings). "
        "For folders on disk use `python -m pipelines.blip.caption_folder DIR` (see docs/caption-folder.md)."
    )
    with gr.Row():
        with gr.Column(scale=1):
            files = gr.File(
                label="Images or .zip files",
                file_count="multiple",
                file_types=["image", ".zip"],
                type="filepath",
            )
            with gr.Row():
                trigger = gr.Textbox(value="", label="Trigger word(s) before each caption", placeholder="e.g. sks")
                suffix = gr.Textbox(value="", label="Text after each caption", placeholder="e.g. high quality photo")
            with gr.Row():
                batch_size = ValidatedSlider(
                    1, settings.MAX_BATCH_SIZE, value=settings.DEFAULT_BATCH_SIZE, step=1, label="Batch size"
                )
                include_images = gr.Checkbox(value=True, label="Put the images in the zip (a ready dataset)")
            adapter = build_adapter_picker(studio)
            controls = build_decoding_controls(show_num_captions=False)
            with gr.Row():
                run = gr.Button("Caption all", variant="primary")
                stop = gr.Button("Stop", variant="stop")
        with gr.Column(scale=2):
            summary = gr.Markdown()
            archive = gr.File(label="Dataset zip")
            table = gr.Dataframe(
                headers=TABLE_HEADERS,
                datatype=["markdown", "str", "str", "number"],
                label="Captions (click a caption to edit it)",
                interactive=True,
                static_columns=[index for index in range(len(TABLE_HEADERS)) if index != CAPTION_COLUMN],
                type="array",
                wrap=True,
                column_widths=["12%", "20%", "56%", "12%"],
            )
            save_edits = gr.Button("Save edited captions", variant="secondary")
            export_details = gr.JSON(visible=False)  # the API's third output: which captions were edited
    batch = gr.State(None)  # this session's last batch: its rows, zip and settings (never sent to the page)
    run.click(
        make_caption_batch_function(studio, stop_requests, kept),
        inputs=[files, batch_size, trigger, suffix, include_images, *controls.inputs(skip=("num_captions",)), adapter],
        outputs=[table, archive, summary, batch],
        api_name="caption_batch",
        concurrency_id=settings.GPU_CONCURRENCY_ID,
    )
    save_edits.click(
        make_export_function(kept),
        inputs=[table, batch],
        outputs=[archive, summary, export_details, batch],
        api_name="caption_batch_export",
        concurrency_limit=1,  # writes a zip (images copied, the old zip deleted): one at a time, outside the GPU queue
        concurrency_id="caption_batch_export",
    )
    stop.click(stop_batch, inputs=None, outputs=None, queue=False, api_name="caption_batch_stop")
    return {
        "files": files,
        "table": table,
        "save_edits": save_edits,
        "archive": archive,
        "summary": summary,
        "run": run,
        "stop": stop,
        "adapter": adapter,
    }


if __name__ == "__main__":
    launch_alone(build_batch_tab, "Batch captioning")
