"""Train tab: an SD3.5 LoRA or a BLIP caption LoRA, trained in the background (API ``/train_*``).

A run is a subprocess (``pipelines.training.runs``): it never holds the
generation queue, keeps going if the browser tab closes, and is cancelled as a
whole. The tab polls its log for the loss curve. A finished SD3.5 LoRA or BLIP
adapter stays in the run's own folder (never the shared LoRA or adapter folders):
"Load the result" loads it for the Generate or Caption tab as the run owner's own
entry, which nobody else can list, use or unload.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from components.common import ValidatedNumber, launch_alone, named_endpoint, parameter, visitor_id
from pipelines import settings
from pipelines.catalog import sd3_model_choices  # the labels Generate shows too
from pipelines.sd3.text_to_image import MODEL_CHOICES
from pipelines.studio import Studio
from pipelines.training.runs import RunStatus, new_run_id, renaming_sentence, run_name, smoothed_losses
from pipelines.validation import as_float, as_int

TRAINERS = {"sd3": "SD3.5 LoRA (images → style or subject)", "blip": "BLIP caption LoRA (new language or style)"}
OPERATOR_ONLY_NOTICE = (
    "Training is reserved for the operator of this public instance; run the Studio yourself (python app.py) "
    "to train a LoRA."
)
TRAINING_NOTICE = (
    "Training needs a CUDA GPU for real models: an SD3.5 Medium LoRA at 1024 px takes roughly 20-30 GB "
    "of GPU memory with gradient checkpointing, Large more. On the CPU only the tiny models train in reasonable time."
)


# The Train tab's number fields per trainer: (low, high) for each; the trainer's own config checks them
# again (resolution's multiple of 16, for one). A field the trainer does not use is not read.
NUMBER_RANGES = {
    "sd3": {
        "steps": (1, settings.SD3_TRAIN_MAX_STEPS),
        "rank": (1, settings.SD3_TRAIN_MAX_RANK),
        "learning_rate": (0.0, settings.SD3_TRAIN_MAX_LEARNING_RATE),
        "batch_size": (1, settings.SD3_TRAIN_MAX_BATCH_SIZE),
        "gradient_accumulation": (1, settings.SD3_TRAIN_MAX_GRADIENT_ACCUMULATION),
        "resolution": (settings.SD3_TRAIN_MIN_RESOLUTION, settings.SD3_TRAIN_MAX_RESOLUTION),
        "validation_every": (1, settings.SD3_TRAIN_MAX_STEPS),
    },
    "blip": {
        "steps": (1, settings.BLIP_TRAIN_MAX_STEPS),
        "rank": (1, settings.BLIP_TRAIN_MAX_RANK),
        "learning_rate": (0.0, settings.BLIP_TRAIN_MAX_LEARNING_RATE),
        "batch_size": (1, settings.BLIP_TRAIN_MAX_BATCH_SIZE),
        "gradient_accumulation": (1, settings.BLIP_TRAIN_MAX_GRADIENT_ACCUMULATION),
        "validation_split": (0.0, 0.5),
    },
}
FLOAT_FIELDS = ("learning_rate", "validation_split")


def training_numbers(kind: str, values: dict) -> dict:
    """The number fields ``kind``'s trainer uses, checked: ValueError with one sentence for any bad one
    (text, inf, nan, 1e400, out of range)."""
    if kind not in NUMBER_RANGES:
        raise ValueError(f"Unknown trainer {kind!r}; choose one of: {', '.join(TRAINERS)}.")
    numbers = {}
    for label, (low, high) in NUMBER_RANGES[kind].items():
        if label == "learning_rate":
            numbers[label] = as_float(label, values.get(label), low, high, low_open=True)
        elif label in FLOAT_FIELDS:
            numbers[label] = as_float(label, values.get(label), low, high)
        else:
            numbers[label] = as_int(label, values.get(label), low, high)
    return numbers


def trainer_arguments(
    studio: Studio,
    kind: str,
    dataset: Path,
    output_dir: Path,
    *,
    model: str,
    trigger: str = "",
    validation_prompt: str = "",
    gradient_checkpointing: bool = False,
    use_8bit_adam: bool = False,
    **values,
) -> list[str]:
    """The trainer's command line for these form values (``values``: the number fields, as sent).

    Numbers are checked here (``training_numbers``) and then by the trainer's own config, so every
    bad value is a sentence before a process starts.
    """
    numbers = training_numbers(kind, values)
    arguments = [str(dataset), str(output_dir), "--rank", str(numbers["rank"])]
    arguments += ["--learning-rate", str(numbers["learning_rate"]), "--batch-size", str(numbers["batch_size"])]
    arguments += ["--gradient-accumulation", str(numbers["gradient_accumulation"])]
    if kind == "sd3":
        if not isinstance(model, str) or model not in MODEL_CHOICES:
            raise ValueError(f"Unknown SD3.5 model {model!r}; choose one of: {', '.join(MODEL_CHOICES)}.")
        if studio.tiny:
            arguments += ["--tiny", model, "--tiny-dir", str(studio.manager.tiny_root)]
        else:
            key = MODEL_CHOICES[model]
            arguments += ["--model", studio.manager.source_for(key)]
        arguments += ["--steps", str(numbers["steps"]), "--resolution", str(numbers["resolution"])]
        if trigger.strip():
            arguments += ["--trigger", trigger.strip()]
        if validation_prompt.strip():
            arguments += ["--validation-prompt", validation_prompt.strip()]
            arguments += ["--validation-every", str(numbers["validation_every"])]
        if gradient_checkpointing:
            arguments.append("--gradient-checkpointing")
        if use_8bit_adam:
            arguments.append("--use-8bit-adam")
        from pipelines.training.train_sd3_lora import parse_args
    else:
        if studio.tiny:
            arguments += ["--tiny", "--tiny-dir", str(studio.manager.tiny_root)]
        else:
            arguments += ["--model", studio.manager.source_for("blip-caption")]
        arguments += ["--max-steps", str(numbers["steps"]), "--validation-split", str(numbers["validation_split"])]
        from pipelines.training.train_blip_lora import parse_args
    try:
        parse_args(arguments).validated()  # the trainer's sentences, before a process starts
    except SystemExit:
        raise ValueError("A training setting is not a valid number; check the form.") from None
    return arguments


LOSS_SERIES, SMOOTHED_SERIES = "loss", f"smoothed (EMA {settings.TRAINING_LOSS_SMOOTHING:g})"
LOG_BOX_ID = "train-log"
# The log box follows the newest line (Gradio's own autoscroll does not follow a read-only box's updates).
FOLLOW_LOG_JS = f"""() => {{
  requestAnimationFrame(() => {{
    const box = document.querySelector('#{LOG_BOX_ID} textarea');
    if (box) box.scrollTop = box.scrollHeight;
  }});
}}"""


def loss_frame(losses: list[tuple[int, float]]):
    """The loss chart's data: the logged loss and its smoothed line, long format (step, loss, series).

    The columns are float from the first (empty) poll on, so the chart's axes are numeric from the start.
    """
    import pandas as pd

    steps = [float(step) for step, _ in losses]
    values = [float(loss) for _, loss in losses]
    frame = pd.DataFrame(
        {
            "step": pd.Series(steps + steps, dtype="float64"),
            "loss": pd.Series(values + smoothed_losses(values), dtype="float64"),
            "series": pd.Series([LOSS_SERIES] * len(steps) + [SMOOTHED_SERIES] * len(steps), dtype="string"),
        }
    )
    return frame


def status_markdown(status: RunStatus, renamed: str = "") -> str:
    progress = f"step {status.step}" + (f" of {status.total_steps}" if status.total_steps else "")
    loss = f", loss {status.losses[-1][1]:.4f}" if status.losses else ""
    lines = [f"**{status.run_id}**: {status.state}, {progress}{loss}, {status.seconds:.0f} s"]
    if renamed:
        lines.append(renamed)
    if status.command:
        lines.append(
            f"Command (runs as printed in a terminal; `<app>` is the Studio's folder, `<dataset>` the copy of your "
            f"upload kept in the run's folder, `<output>` the run's output folder): `{status.command}`"
        )
    if status.state == "finished":
        lines.append(
            "Finished: press **Load the result** to use it. It is kept with the run, and only you can load it."
        )
    elif status.state == "failed":
        lines.append("The run failed; the log below says why. Checkpoints written so far are kept.")
    elif status.state == "cancelled":
        lines.append("Cancelled. Checkpoints written so far are kept in the run's output folder.")
    return "\n\n".join(lines)


def build_train_tab(studio: Studio) -> dict:
    """Build the Train tab inside the current Blocks; returns its main components."""
    runs = studio.training_runs

    def start_training(
        kind, files, name, model, steps, rank, learning_rate, batch_size, gradient_accumulation, resolution,
        trigger, validation_prompt, validation_every, gradient_checkpointing, use_8bit_adam, validation_split,
        request: gr.Request,
    ):  # fmt: skip
        """Check the settings, then the dataset (one upload at a time), then start the run; returns its id at once."""
        # 1. Who may train: everyone locally; on a public instance only if the operator allows it.
        if not studio.visitors_may_train:
            studio.require_operator("Training")
        if kind not in TRAINERS:
            raise ValueError(f"Unknown trainer {kind!r}; choose one of: {', '.join(TRAINERS)}.")
        # 2. Cheap checks: the name; the numbers come with the arguments below. The output goes into the
        #    run's own folder (its owner's alone), so two runs of one name never meet.
        folder_name = run_name(name)
        run_id = new_run_id(kind, folder_name)
        output_dir = runs.output_folder(run_id)
        numbers = {
            "steps": steps, "rank": rank, "learning_rate": learning_rate, "batch_size": batch_size,
            "gradient_accumulation": gradient_accumulation, "resolution": resolution,
            "validation_every": validation_every, "validation_split": validation_split,
        }  # fmt: skip

        def arguments_for(dataset: Path) -> list[str]:
            return trainer_arguments(
                studio, kind, dataset, output_dir, model=model, trigger=str(trigger or ""),
                validation_prompt=str(validation_prompt or ""), gradient_checkpointing=bool(gradient_checkpointing),
                use_8bit_adam=bool(use_8bit_adam), **numbers,
            )  # fmt: skip

        # 3. The dataset is checked in the runs' dataset thread into the run's own folder, then the run starts.
        paths = [getattr(file, "name", file) for file in (files or [])]
        placeholders = {studio.manager.tiny_root: "<models>"} if studio.tiny else {}
        renamed = renaming_sentence(str(name or ""), folder_name)
        run = runs.start_with_dataset(
            kind, paths, output_dir, arguments_for, name=folder_name, owner=visitor_id(request), run_id=run_id,
            placeholders=placeholders,
            run_settings={"model": str(model), "trigger": str(trigger or "").strip(), "renamed": renamed},
        )  # fmt: skip
        if renamed:
            gr.Info(renamed)
        return run.run_id, status_markdown(run.status(), renamed), gr.Timer(active=True)

    def training_status(run_id, request: gr.Request):
        """Your run's state, loss curve and log tail (the page stops polling once the run has ended)."""
        if not run_id:
            return "No run started yet.", loss_frame([]), "", gr.Timer(active=False)
        run = runs.get(run_id, visitor_id(request))
        status = run.status()
        return (
            status_markdown(status, run.options.get("renamed", "")),
            loss_frame(status.losses),
            status.log_tail,
            gr.Timer(active=not status.done),
        )

    def cancel_training(run_id, request: gr.Request):
        """Stop your run and everything it started; checkpoints stay."""
        if not run_id:
            raise ValueError("No run to cancel; start one first.")
        run = runs.get(run_id, visitor_id(request))
        run.cancel()
        return status_markdown(run.status())

    def load_result(run_id, model, request: gr.Request):
        """Load your finished run's output into the Generate tab (SD3.5) or the Caption tab (BLIP).

        An SD3.5 LoRA loads on the model the run trained on (``model`` only for a run that did not say),
        with the run's trigger word. It is your own entry: nobody else sees, uses or unloads it.
        Returns a sentence and the details: kind, name, model, trigger_words, weight.
        """
        if not run_id:
            raise ValueError("No run yet; start one and wait for it to finish.")
        run = runs.get(run_id, visitor_id(request))
        status = run.status()
        if status.state != "finished":
            raise ValueError(f"Run {run.run_id} is {status.state}; load its result once it has finished.")
        loaded = studio.load_training_result(run, model=run.options.get("model") or model)
        return loaded.sentence, loaded.as_dict()

    gr.Markdown(
        "Train a LoRA on your own captioned images: caption a folder in the **Batch** tab (edit the captions in "
        "its table and press Save edited captions if you like), download its zip, upload it here. "
        "The run goes on in the background; "
        "the command it runs is the first line of its log, so you can run the same thing from a terminal."
    )
    gr.Markdown(TRAINING_NOTICE if not studio.tiny else "Tiny mode: the tiny models train on the CPU in seconds.")
    if not studio.visitors_may_train:
        gr.Markdown(f"**{OPERATOR_ONLY_NOTICE}**")
    with gr.Row():
        with gr.Column(scale=1):
            kind = gr.Radio([(label, key) for key, label in TRAINERS.items()], value="sd3", label="Train")
            files = gr.File(
                label="Dataset: a zip with metadata.jsonl (the Batch tab's export) or images + .txt captions",
                file_count="multiple",
                file_types=[".zip", "image", ".txt", ".jsonl"],
            )
            name = gr.Textbox(label="Run name (the output folder)", value="my-lora")
            model = gr.Radio(sd3_model_choices(), value="medium", label="SD3.5 base model")
            trigger = gr.Textbox(
                value="", label="Trigger word (put before every caption; SD3.5 only)", placeholder="sks"
            )
            with gr.Accordion("Settings", open=False):
                with gr.Row():
                    steps = ValidatedNumber(value=settings.TRAIN_TAB_DEFAULT_STEPS, precision=0, label="Steps")
                    rank = ValidatedNumber(value=16, precision=0, label="LoRA rank")
                    learning_rate = ValidatedNumber(value=1e-4, label="Learning rate")
                with gr.Row():
                    batch_size = ValidatedNumber(value=1, precision=0, label="Batch size")
                    gradient_accumulation = ValidatedNumber(value=1, precision=0, label="Gradient accumulation")
                    resolution = ValidatedNumber(
                        value=settings.TRAIN_TAB_DEFAULT_RESOLUTION if not studio.tiny else 64,
                        precision=0,
                        label="Resolution (SD3.5; aspect buckets)",
                    )
                with gr.Row():
                    gradient_checkpointing = gr.Checkbox(value=not studio.tiny, label="Gradient checkpointing")
                    use_8bit_adam = gr.Checkbox(value=False, label="8-bit Adam (CUDA + bitsandbytes)")
                    validation_split = ValidatedNumber(value=0.0, label="Validation split (BLIP)")
                validation_prompt = gr.Textbox(value="", label="Validation prompt (SD3.5: rendered every N steps)")
                validation_every = ValidatedNumber(value=100, precision=0, label="Validation every N steps")
            with gr.Row():
                start = gr.Button("Start training", variant="primary", visible=studio.visitors_may_train)
                cancel = gr.Button("Cancel", variant="stop", visible=studio.visitors_may_train)
        with gr.Column(scale=1):
            run_id = gr.Textbox(label="Run id", interactive=False)
            status = gr.Markdown("No run started yet.")
            loss_plot = gr.LinePlot(
                loss_frame([]),  # typed from the start: numeric axes, never categorical ones
                x="step",
                y="loss",
                color="series",
                color_map={LOSS_SERIES: "#9ca3af", SMOOTHED_SERIES: "#4f46e5"},
                x_axis_format="~g",  # steps are floats (numeric axes); no "2.000000"
                y_axis_format="~g",
                label="Training loss",
                height=260,
            )
            load = gr.Button("Load the result")
            loaded = gr.Markdown()
            loaded_details = gr.JSON(visible=False)  # the API's second output; the Generate tab follows it
            log_tail = gr.Textbox(
                label="Log (last lines, newest at the bottom)",
                lines=10,
                max_lines=10,
                interactive=False,
                elem_id=LOG_BOX_ID,
            )
    timer = gr.Timer(settings.TRAIN_TAB_POLL_SECONDS, active=False)  # runs while a run is going

    start_parameters = [
        parameter("kind", "sd3"),
        parameter("files", None),
        parameter("name", "my-lora"),
        parameter("model", "medium"),
        parameter("steps", settings.TRAIN_TAB_DEFAULT_STEPS),
        parameter("rank", 16),
        parameter("learning_rate", 1e-4),
        parameter("batch_size", 1),
        parameter("gradient_accumulation", 1),
        parameter("resolution", settings.TRAIN_TAB_DEFAULT_RESOLUTION),
        parameter("trigger", ""),
        parameter("validation_prompt", ""),
        parameter("validation_every", 100),
        parameter("gradient_checkpointing", True),
        parameter("use_8bit_adam", False),
        parameter("validation_split", 0.0),
        parameter("request", None, gr.Request),
    ]
    start.click(
        named_endpoint(start_training, start_parameters),
        inputs=[
            kind,
            files,
            name,
            model,
            steps,
            rank,
            learning_rate,
            batch_size,
            gradient_accumulation,
            resolution,
            trigger,
            validation_prompt,
            validation_every,
            gradient_checkpointing,
            use_8bit_adam,
            validation_split,
        ],  # fmt: skip
        outputs=[run_id, status, timer],
        api_name="train_start",
        # One start at a time: its dataset check unpacks and decodes up to MAX_TRAINING_IMAGES images.
        # Other starts wait in the queue (holding no thread); the run itself is a separate process.
        concurrency_limit=1,
        concurrency_id="train_start",
    )
    timer.tick(
        named_endpoint(training_status, [parameter("run_id", ""), parameter("request", None, gr.Request)]),
        inputs=run_id,
        outputs=[status, loss_plot, log_tail, timer],
        api_name="train_status",
        queue=False,
        show_progress="hidden",
    )
    cancel.click(
        named_endpoint(cancel_training, [parameter("run_id", ""), parameter("request", None, gr.Request)]),
        inputs=run_id,
        outputs=status,
        api_name="train_cancel",
        queue=False,
    )
    log_tail.change(None, js=FOLLOW_LOG_JS, queue=False)  # runs in the browser only
    load_event = load.click(
        named_endpoint(
            load_result,
            [parameter("run_id", ""), parameter("model", "medium"), parameter("request", None, gr.Request)],
        ),
        inputs=[run_id, model],
        outputs=[loaded, loaded_details],
        api_name="train_load_result",
        concurrency_id=settings.GPU_CONCURRENCY_ID,
    )
    return {
        "run_id": run_id,
        "start": start,
        "cancel": cancel,
        "status": status,
        "load": load,
        "load_event": load_event,
        "loaded_details": loaded_details,
        "model": model,
    }


def send_results_to_generate(train: dict, lora_panel, tabs: gr.Tabs) -> None:
    """After "Load the result" of an SD3.5 run: the Generate tab on the run's model, with its LoRA active.

    ``train`` is ``build_train_tab``'s dict, ``lora_panel`` the Generate tab's ``LoraPanel``, ``tabs``
    the app's tabs. A BLIP adapter leaves the Generate tab as it is.
    """

    def show_in_generate(details, active, request: gr.Request):
        shown = lora_panel.show_loaded(details, active, request)
        switch = gr.Tabs(selected="generate") if shown[0] is not None else gr.Tabs()
        return (*(gr.update() if value is None else value for value in shown), switch)

    train["load_event"].success(
        show_in_generate,
        inputs=[train["loaded_details"], lora_panel.lora],
        outputs=[*lora_panel.loaded_outputs(), tabs],
        queue=False,
        api_visibility="private",
    )


if __name__ == "__main__":
    launch_alone(build_train_tab, "Train")
