"""Train tab: an SD3.5 LoRA or a BLIP caption LoRA, trained in the background (API ``/train_*``).

A run is a subprocess (``pipelines.training_runs``): it never holds the
generation queue, keeps going if the browser tab closes, and is cancelled as a
whole. The tab polls its log for the loss curve. A finished SD3.5 LoRA lands in
the LoRA folder and a BLIP adapter in the adapter folder, so the Generate and
Caption tabs load them by name.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import gradio as gr

from components.common import ValidatedNumber, launch_alone, named_endpoint, parameter
from pipelines import settings, workspace
from pipelines.sd3 import MODEL_CHOICES
from pipelines.studio import Studio
from pipelines.training_runs import RunStatus, run_name, unpack_training_upload

TRAINERS = {"sd3": "SD3.5 LoRA (images → style or subject)", "blip": "BLIP caption LoRA (new language or style)"}
TRAINING_NOTICE = (
    "Training needs a CUDA GPU for real models: an SD3.5 Medium LoRA at 1024 px takes roughly 20-30 GB "
    "of GPU memory with gradient checkpointing, Large more. On the CPU only the tiny models train in reasonable time."
)


def trainer_arguments(
    studio: Studio,
    kind: str,
    dataset: Path,
    output_dir: Path,
    *,
    model: str,
    steps,
    rank,
    learning_rate,
    batch_size,
    gradient_accumulation,
    resolution,
    trigger: str,
    validation_prompt: str,
    validation_every,
    gradient_checkpointing: bool,
    use_8bit_adam: bool,
    validation_split,
) -> list[str]:
    """The trainer's command line for these form values; every value is checked by the trainer's own config."""
    steps, rank, batch_size, gradient_accumulation, resolution, validation_every = (
        _number(label, value, integer=True)
        for label, value in [
            ("steps", steps),
            ("rank", rank),
            ("batch_size", batch_size),
            ("gradient_accumulation", gradient_accumulation),
            ("resolution", resolution),
            ("validation_every", validation_every),
        ]
    )
    learning_rate = _number("learning_rate", learning_rate, integer=False)
    validation_split = _number("validation_split", validation_split, integer=False)
    arguments = [str(dataset), str(output_dir), "--rank", str(rank), "--learning-rate", str(learning_rate)]
    arguments += ["--batch-size", str(batch_size), "--gradient-accumulation", str(gradient_accumulation)]
    if kind == "sd3":
        if studio.tiny:
            arguments += ["--tiny", model, "--tiny-dir", str(studio.manager.tiny_root)]
        else:
            key = MODEL_CHOICES[model]
            arguments += ["--model", studio.manager.source_for(key)]
        arguments += ["--steps", str(steps), "--resolution", str(resolution)]
        if trigger.strip():
            arguments += ["--trigger", trigger.strip()]
        if validation_prompt.strip():
            arguments += ["--validation-prompt", validation_prompt.strip(), "--validation-every", str(validation_every)]
        if gradient_checkpointing:
            arguments.append("--gradient-checkpointing")
        if use_8bit_adam:
            arguments.append("--use-8bit-adam")
        from pipelines.train_sd3_lora import parse_args
    else:
        if studio.tiny:
            arguments += ["--tiny", "--tiny-dir", str(studio.manager.tiny_root)]
        else:
            arguments += ["--model", studio.manager.source_for("blip-caption")]
        arguments += ["--max-steps", str(steps), "--validation-split", str(validation_split)]
        from pipelines.train_blip_lora import parse_args
    try:
        parse_args(arguments).validated()  # the trainer's sentences, before a process starts
    except SystemExit:
        raise ValueError("A training setting is not a valid number; check the form.") from None
    return arguments


def _number(label: str, value, *, integer: bool):
    """``value`` as a number for the command line; the trainer's config checks its range."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{label} must be a number, not {value!r}.") from None
    if integer:
        if number != int(number):
            raise ValueError(f"{label} must be a whole number, not {value!r}.")
        return int(number)
    return number


def status_markdown(status: RunStatus) -> str:
    progress = f"step {status.step}" + (f" of {status.total_steps}" if status.total_steps else "")
    loss = f", loss {status.losses[-1][1]:.4f}" if status.losses else ""
    lines = [f"**{status.run_id}**: {status.state}, {progress}{loss}, {status.seconds:.0f} s"]
    if status.state == "finished":
        lines.append(f"Output: `{status.output_dir.name}` — press **Load the result** to use it.")
    elif status.state == "failed":
        lines.append("The run failed; the log below says why. Checkpoints written so far are kept.")
    elif status.state == "cancelled":
        lines.append("Cancelled. Checkpoints written so far are kept in the output folder.")
    return "\n\n".join(lines)


def build_train_tab(studio: Studio) -> dict:
    """Build the Train tab inside the current Blocks; returns its main components."""
    upload_root = workspace.datasets_root()  # under the work root; app.py keeps Gradio from serving it

    def start_training(
        kind, files, name, model, steps, rank, learning_rate, batch_size, gradient_accumulation, resolution,
        trigger, validation_prompt, validation_every, gradient_checkpointing, use_8bit_adam, validation_split,
    ):  # fmt: skip
        """Check the dataset and settings, then start the run; returns its id at once."""
        if kind not in TRAINERS:
            raise ValueError(f"Unknown trainer {kind!r}; choose one of: {', '.join(TRAINERS)}.")
        paths = [getattr(file, "name", file) for file in (files or [])]
        folder_name = run_name(name)
        dataset = unpack_training_upload(paths, Path(tempfile.mkdtemp(prefix="dataset-", dir=upload_root)))
        output_root = studio.lora_dir if kind == "sd3" else studio.adapter_dir
        output_dir = output_root / folder_name
        if output_dir.exists() and any(output_dir.iterdir()):
            raise ValueError(f"{folder_name!r} already exists in {output_root.name}/; choose another run name.")
        arguments = trainer_arguments(
            studio, kind, dataset, output_dir, model=model, steps=steps, rank=rank, learning_rate=learning_rate,
            batch_size=batch_size, gradient_accumulation=gradient_accumulation, resolution=resolution,
            trigger=trigger or "", validation_prompt=validation_prompt or "", validation_every=validation_every,
            gradient_checkpointing=bool(gradient_checkpointing), use_8bit_adam=bool(use_8bit_adam),
            validation_split=validation_split,
        )  # fmt: skip
        run = studio.training_runs.start(kind, arguments, output_dir, name=folder_name)
        return run.run_id, status_markdown(run.status()), gr.Timer(active=True)

    def training_status(run_id):
        """The run's state, loss curve and log tail (the page stops polling once the run has ended)."""
        if not run_id:
            return "No run started yet.", None, "", gr.Timer(active=False)
        status = studio.training_runs.get(run_id).status()
        return status_markdown(status), _loss_frame(status), status.log_tail, gr.Timer(active=not status.done)

    def cancel_training(run_id):
        """Stop the run and everything it started; checkpoints stay."""
        if not run_id:
            raise ValueError("No run to cancel; start one first.")
        run = studio.training_runs.get(run_id)
        run.cancel()
        return status_markdown(run.status())

    def load_result(run_id, model):
        """Load a finished run's output into the Generate tab (SD3.5) or the Caption tab (BLIP)."""
        if not run_id:
            raise ValueError("No run yet; start one and wait for it to finish.")
        run = studio.training_runs.get(run_id)
        status = run.status()
        if status.state != "finished":
            raise ValueError(f"Run {run_id} is {status.state}; load its result once it has finished.")
        return studio.load_training_result(run.kind, run.output_dir, model=model)

    gr.Markdown(
        "Train a LoRA on your own captioned images: caption a folder in the **Batch** tab, download its zip "
        "(edit the captions if you like), upload it here. The run goes on in the background; "
        "the command it runs is the first line of its log, so you can run the same thing from a terminal."
    )
    gr.Markdown(TRAINING_NOTICE if not studio.tiny else "Tiny mode: the tiny models train on the CPU in seconds.")
    with gr.Row():
        with gr.Column(scale=1):
            kind = gr.Radio([(label, key) for key, label in TRAINERS.items()], value="sd3", label="Train")
            files = gr.File(
                label="Dataset: a zip with metadata.jsonl (the Batch tab's export) or images + .txt captions",
                file_count="multiple",
                file_types=[".zip", "image", ".txt", ".jsonl"],
            )
            name = gr.Textbox(label="Run name (the output folder)", value="my-lora")
            model = gr.Radio(list(MODEL_CHOICES), value="medium", label="SD3.5 base model")
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
                start = gr.Button("Start training", variant="primary")
                cancel = gr.Button("Cancel", variant="stop")
        with gr.Column(scale=1):
            run_id = gr.Textbox(label="Run id", interactive=False)
            status = gr.Markdown("No run started yet.")
            loss_plot = gr.LinePlot(x="step", y="loss", label="Training loss", height=260)
            load = gr.Button("Load the result")
            loaded = gr.Markdown()
            log_tail = gr.Textbox(label="Log (last lines)", lines=10, max_lines=10, interactive=False)
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
        concurrency_limit=None,  # starting a run is quick; the run itself is a separate process
    )
    timer.tick(
        named_endpoint(training_status, [parameter("run_id", "")]),
        inputs=run_id,
        outputs=[status, loss_plot, log_tail, timer],
        api_name="train_status",
        queue=False,
        show_progress="hidden",
    )
    cancel.click(
        named_endpoint(cancel_training, [parameter("run_id", "")]),
        inputs=run_id,
        outputs=status,
        api_name="train_cancel",
        queue=False,
    )
    load.click(
        named_endpoint(load_result, [parameter("run_id", ""), parameter("model", "medium")]),
        inputs=[run_id, model],
        outputs=loaded,
        api_name="train_load_result",
        concurrency_id=settings.GPU_CONCURRENCY_ID,
    )
    return {"run_id": run_id, "start": start, "cancel": cancel, "status": status, "load": load}


def _loss_frame(status: RunStatus):
    import pandas as pd

    return pd.DataFrame(status.losses, columns=["step", "loss"])


if __name__ == "__main__":
    launch_alone(build_train_tab, "Train")
