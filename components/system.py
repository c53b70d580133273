"""System tab: this machine, the loaded models, and the memory planner (API ``/system`` and ``/unload``)."""

from __future__ import annotations

import gradio as gr

from components.common import ValidatedNumber, launch_alone, named_endpoint, parameter
from pipelines import settings
from pipelines.blip.precision import runtime_blip_precision
from pipelines.memory import GIB, auto_choice, gpu_memory, machine_report, plan_table
from pipelines.memory.activations import ACTIVATION_NOTES
from pipelines.memory.planner import PLANNED_CONTROLNET
from pipelines.sd3.fast import fast_path_details
from pipelines.studio import Studio
from pipelines.validation import as_float, as_int

MAX_PLAN_SIDE = 100_000  # only a type check: the planner itself names each model's real range

# Key numbers first (fits, the peak), the long text last; every column is wide enough for its header's
# longest word, so headers wrap between words and the text columns wrap inside their width.
LOADED_HEADERS = ["model", "footprint (GiB)", "load seconds", "source"]
LOADED_WIDTHS = ["20%", "16%", "14%", "50%"]
PLAN_HEADERS = [
    "model",
    "mode",
    "fits",
    "est. peak (GiB)",
    "batch",
    "weights (GiB)",
    "activations (GiB)",
    "peak during",
]
PLAN_WIDTHS = ["13%", "19%", "6%", "10%", "7%", "10%", "12%", "23%"]
PLAN_NOTE = (
    "Estimates, not measurements: weights are exact element counts of the real architectures (built from their "
    "config files on the meta device) times the bytes of each format; activations come from the formulas below. "
    "Unquantized tensors are counted in bf16; **fits** means the estimated peak plus a {margin:.0f} GiB margin is "
    "at most the GPU size above."
)


def default_gpu_gib(studio: Studio) -> float:
    """This GPU's total memory in GiB, or PLAN_DEFAULT_GPU_GIB on a machine without one."""
    gpu = gpu_memory(studio.manager.runtime.device) if studio.manager.runtime.device.type == "cuda" else None
    return round(gpu["total_bytes"] / GIB, 1) if gpu else float(settings.PLAN_DEFAULT_GPU_GIB)


def device_markdown(report: dict) -> str:
    gpu = report["gpu"]
    if gpu:
        memory = f"**{gpu['name']}**: {gpu['free_bytes'] / GIB:.1f} GiB free of {gpu['total_bytes'] / GIB:.1f} GiB"
    else:
        memory = "no GPU (CUDA is not available)"
    ram = f"{report['ram_total_bytes'] / GIB:.1f} GiB" if report["ram_total_bytes"] else "unknown"
    return (
        f"**Device** {report['description']} · **GPU** {memory} · **RAM** {ram}  \n"
        f"torch {report['torch']} · CUDA {report['cuda']} · Python {report['python']} · "
        f"{report['cpu_threads']} CPU {'thread' if report['cpu_threads'] == 1 else 'threads'}"
    )


def loaded_rows(studio: Studio) -> list[list]:
    """One row per loaded model; its source names no server path (``<models>/blip-caption``, a Hub id)."""
    return [
        [item.key, round(item.footprint_bytes / GIB, 4), round(item.load_seconds, 2), studio.shown(item.source)]
        for item in studio.manager.loaded_models()
    ]


def loaded_choices(studio: Studio) -> gr.Dropdown:
    keys = [item.key for item in studio.manager.loaded_models()]
    return gr.Dropdown(choices=keys, value=keys[0] if keys else None)


def make_system_function(studio: Studio):
    """The `/system` endpoint: no required input; ``gpu_gb`` defaults to this GPU (or 24 GiB)."""

    def system(gpu_gb=None, height=settings.PLAN_DEFAULT_SIDE, width=settings.PLAN_DEFAULT_SIDE):
        # Every value is checked here: API callers skip the number boxes' own bounds.
        if gpu_gb is None:
            gpu_gb = default_gpu_gib(studio)
        gpu_gb = as_float("GPU memory (GiB)", gpu_gb, 0, settings.PLAN_MAX_GPU_GIB, low_open=True)
        gpu_bytes = int(gpu_gb * GIB)
        height = settings.PLAN_DEFAULT_SIDE if height is None else as_int("height", height, 1, MAX_PLAN_SIDE)
        width = settings.PLAN_DEFAULT_SIDE if width is None else as_int("width", width, 1, MAX_PLAN_SIDE)
        plans = plan_table(height, width)  # raises a sentence for a size SD3.5 cannot draw
        margin = settings.PLAN_MARGIN_BYTES
        rows = [
            [  # in PLAN_HEADERS order
                item.title,  # "sd35-large + ControlNet" for the ControlNet rows
                item.mode.title,
                "yes" if item.fits(gpu_bytes, margin) else "no",
                round(item.peak_bytes / GIB, 2),
                item.batch,
                round(item.weight_bytes / GIB, 2),
                round(item.activation_bytes / GIB, 2),
                f"{item.peak_phase} ({', '.join(item.resident_at_peak)} on the GPU)",
            ]
            for item in plans
        ]
        sd3_keys = sorted({item.model_key for item in plans if item.model_key.startswith("sd35")})
        choices = {key: auto_choice(key, gpu_bytes, height, width, margin) for key in sd3_keys}
        with_controlnet = [item for item in plans if item.controlnet]
        if with_controlnet:  # Large with a ControlNet (the three share one architecture)
            base = with_controlnet[0].model_key
            choices[with_controlnet[0].title] = auto_choice(
                base, gpu_bytes, height, width, margin, controlnet=PLANNED_CONTROLNET
            )
        summary = [f"**Automatic choice for a {float(gpu_gb):g} GiB GPU at {width}×{height}:**"]
        summary += [f"- `{key}`: {reason}" for key, (_, reason) in choices.items()]
        report = machine_report(studio.manager.runtime)
        details = {
            "machine": report,
            "tiny_mode": studio.tiny,
            "blip_precision": runtime_blip_precision(studio.manager.runtime).as_dict(),
            "sd3_fast_path": fast_path_details(studio.manager),
            "loaded_models": [
                {
                    "key": item.key,
                    "source": item.source,
                    "load_seconds": round(item.load_seconds, 3),
                    "footprint_bytes": item.footprint_bytes,
                }
                for item in studio.manager.loaded_models()
            ],
            "planner": {
                "gpu_gb": float(gpu_gb),
                "height": height,
                "width": width,
                "margin_bytes": margin,
                "note": "Estimates from the real architectures' parameter counts; see activation_notes.",
                "activation_notes": ACTIVATION_NOTES,
                "plans": [dict(item.as_dict(), fits=item.fits(gpu_bytes, margin)) for item in plans],
                "auto": {key: {"mode": mode, "reason": reason} for key, (mode, reason) in choices.items()},
            },
        }
        device = (
            f"{device_markdown(report)}  \n{details['blip_precision']['label']}  \n{details['sd3_fast_path']['label']}"
        )
        # Sources, cache folders and anything else that names a server folder: placeholders for visitors.
        return studio.shown(device), loaded_rows(studio), rows, "\n".join(summary), studio.shown(details)

    return named_endpoint(
        system,
        [
            parameter("gpu_gb", None, float | None),
            parameter("height", settings.PLAN_DEFAULT_SIDE, int),
            parameter("width", settings.PLAN_DEFAULT_SIDE, int),
        ],
    )


def make_unload_function(studio: Studio):
    """The `/unload` endpoint: drop one loaded model from memory (the operator's alone on a public instance)."""

    def unload(model):
        studio.require_operator("Unloading models")
        if not isinstance(model, str) or not model.strip():
            raise ValueError("Choose a loaded model to unload (the table above lists them).")
        if studio.manager.unload(model):  # ValueError naming the valid keys for an unknown one
            message = f"Unloaded `{model}`; it loads again on its next use."
        else:
            message = f"`{model}` was not loaded; nothing to do."
        return message, loaded_rows(studio)

    return named_endpoint(unload, [parameter("model", None, str | None)])


def build_system_tab(studio: Studio, tab: gr.Tab | None = None) -> dict:
    """Build the System tab inside the current Blocks; returns its main components.

    With ``tab``, the report is computed when the tab is opened (the first time
    builds the real architectures on the meta device, a few seconds of CPU),
    not on every page load.
    """
    device = gr.Markdown()
    if studio.tiny:
        gr.Markdown("Tiny mode: the loaded models are miniatures; the planner below is for the real models.")
    gr.Markdown("### Loaded models")
    loaded = gr.Dataframe(
        headers=LOADED_HEADERS,
        label="Loaded models (real footprint)",
        interactive=False,
        wrap=True,
        column_widths=LOADED_WIDTHS,
    )
    with gr.Row(visible=not studio.public):  # unloading is the operator's on a public instance
        model = gr.Dropdown(label="Loaded model", choices=[], allow_custom_value=True, scale=3)
        unload_button = gr.Button("Unload", variant="stop", scale=1)
    message = gr.Markdown()

    gr.Markdown("### Memory planner")
    with gr.Row():
        gpu_gb = ValidatedNumber(
            value=default_gpu_gib(studio),
            label="GPU memory (GiB)",
            info="this GPU's total by default; type another card's size",
            minimum=0.5,
            maximum=settings.PLAN_MAX_GPU_GIB,
        )
        height = ValidatedNumber(value=settings.PLAN_DEFAULT_SIDE, label="height", precision=0, step=16)
        width = ValidatedNumber(value=settings.PLAN_DEFAULT_SIDE, label="width", precision=0, step=16)
        refresh = gr.Button("Refresh", variant="primary")
    gr.Markdown(PLAN_NOTE.format(margin=settings.PLAN_MARGIN_BYTES / GIB))
    table = gr.Dataframe(
        headers=PLAN_HEADERS,
        datatype=["str", "str", "str", "number", "number", "number", "number", "str"],
        label="Model × mode (estimates)",
        interactive=False,
        wrap=True,
        column_widths=PLAN_WIDTHS,
    )
    auto = gr.Markdown()
    with gr.Accordion("How the activations are estimated", open=False):
        gr.Markdown(ACTIVATION_NOTES)
    with gr.Accordion("Raw result (JSON)", open=False):
        details = gr.JSON(label="System")

    system = make_system_function(studio)
    outputs = [device, loaded, table, auto, details]
    gr.on(
        triggers=[tab.select] if tab is not None else None,  # None: on page load
        fn=lambda: system(None, settings.PLAN_DEFAULT_SIDE, settings.PLAN_DEFAULT_SIDE),
        outputs=outputs,
        api_visibility="private",
    ).then(lambda: loaded_choices(studio), outputs=model, api_visibility="private")
    gr.on(
        triggers=[refresh.click, gpu_gb.submit, height.submit, width.submit],
        fn=system,
        inputs=[gpu_gb, height, width],
        outputs=outputs,
        api_name="system",
    ).then(lambda: loaded_choices(studio), outputs=model, api_visibility="private")
    unload_button.click(
        make_unload_function(studio),
        inputs=model,
        outputs=[message, loaded],
        api_name="unload",
        # In the GPU group: an unload waits for a running generation or caption instead of pulling its model away.
        concurrency_id=settings.GPU_CONCURRENCY_ID,
    ).then(lambda: loaded_choices(studio), outputs=model, api_visibility="private")
    return {"device": device, "loaded": loaded, "model": model, "table": table, "details": details}


if __name__ == "__main__":
    launch_alone(build_system_tab, "System")
