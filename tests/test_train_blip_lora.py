"""`python -m pipelines.training.train_blip_lora`, tiny BLIP: the loss falls, the adapter loads, resume, refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from test_import_graph import import_graph

from pipelines.blip.adapter_files import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE
from pipelines.blip.captioner import CaptionRequest
from pipelines.manager import ModelManager
from pipelines.runtime import choose_runtime
from pipelines.studio import Studio
from pipelines.training import train_blip_lora
from pipelines.training.dataset import TrainingDataError, read_dataset
from pipelines.training.runs import LOSS_LINE
from pipelines.training.train_blip_lora import (
    BlipLoraTrainingConfig,
    EncodedSet,
    caption_loader,
    vocabulary_report,
    vocabulary_warning,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "assets" / "examples"
# Captions in the tiny BLIP's vocabulary, so that none of them is [UNK].
PHOTO_CAPTIONS = {
    "astronaut.png": "an astronaut in a white space suit",
    "chelsea.png": "a cat sitting on the floor",
    "coffee.png": "a cup of coffee on a wooden table",
    "rocket.jpg": "a rocket launch with smoke",
}
SHAPES = {"red.png": "red", "blue.png": "blue", "green.png": "green", "yellow.png": "yellow"}
SHAPE_CAPTIONS = {"red.png": "a red building", "blue.png": "a blue sky", "green.png": "a green tree"}
SHAPE_CAPTIONS["yellow.png"] = "a yellow flag"


def make_dataset(folder: Path, captions: dict[str, str] | None = None) -> Path:
    """The four example photos and four drawn shapes, with a metadata.jsonl."""
    folder.mkdir(parents=True)
    for name in PHOTO_CAPTIONS:
        shutil.copy(EXAMPLES / name, folder / name)
    for index, (name, colour) in enumerate(SHAPES.items()):
        image = Image.new("RGB", (96, 96), "white")
        ImageDraw.Draw(image).ellipse((10 + 5 * index, 10, 80, 80 - 5 * index), fill=colour)
        image.save(folder / name)
    captions = captions or {**PHOTO_CAPTIONS, **SHAPE_CAPTIONS}
    lines = [json.dumps({"file_name": name, "text": text}, ensure_ascii=False) for name, text in captions.items()]
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def config(dataset: Path, out: Path, tiny_root: Path, **overrides) -> BlipLoraTrainingConfig:
    settings = {
        "tiny": True,
        "tiny_dir": tiny_root,
        "device": "cpu",
        "batch_size": 4,
        "learning_rate": 5e-3,
        "validation_split": 0.0,
        "checkpoint_every": 0,
        "sample_captions": 0,
        "log_every": 1,
        **overrides,
    }
    return BlipLoraTrainingConfig(dataset=dataset, output_dir=out, **settings)


def caption_loss(captioner, examples, adapter=None) -> float:
    """Mean cross-entropy per caption token over ``examples``, recomputed here from the decoder's logits."""
    total = count = 0.0
    with torch.inference_mode(), captioner.using_adapter(adapter):
        for example in examples:
            ids = [captioner.bos_token_id, *captioner.text_ids(example.text), captioner.eos_token_id]
            embeds = captioner.encode_images([example.load()])
            logits = captioner.model.text_decoder(input_ids=torch.tensor([ids]), encoder_hidden_states=embeds).logits
            logprobs = logits[0, :-1].log_softmax(-1).gather(-1, torch.tensor(ids[1:]).unsqueeze(-1))
            total -= float(logprobs.sum())
            count += len(ids) - 1
    return total / count


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("train") / "data")


@pytest.fixture(scope="module")
def trained(dataset, tiny_root, tmp_path_factory):
    """One 30-step run; its output and what it printed."""
    out = tmp_path_factory.mktemp("trained") / "my-captions"
    capture = pytest.MonkeyPatch()
    printed: list[str] = []
    capture.setattr("builtins.print", lambda *args, **kwargs: printed.append(" ".join(map(str, args))))
    try:
        result = train_blip_lora.train(
            config(dataset, out, tiny_root, max_steps=30, validation_every=15, sample_captions=2)
        )
    finally:
        capture.undo()
    return result, out, printed


def test_the_loss_on_a_fixed_set_falls(trained):
    result, _, _ = trained
    assert (result.start_step, result.steps, result.total_steps) == (0, 30, 30)
    assert sorted(result.validation_losses) == [0, 15, 30]
    first, last = result.validation_losses[0], result.validation_losses[30]
    assert last < 0.85 * first, result.validation_losses
    assert len(result.losses) == 30 and result.learning_rates[-1] == pytest.approx(0.0, abs=1e-12)  # cosine to 0


def test_the_saved_adapter_loads_through_the_studio_and_changes_captions(trained, dataset, tiny_root):
    result, out, _ = trained
    assert (out / ADAPTER_CONFIG_FILE).is_file() and (out / ADAPTER_WEIGHTS_FILE).is_file()
    studio = Studio(ModelManager(choose_runtime("cpu"), tiny_root=tiny_root), blip_adapter_dir=out.parent)
    # The Studio's manager holds its own BLIP: the session's shared captioner never sees this adapter.
    info = studio.load_blip_adapter(out.name)
    assert (info.name, info.rank, info.lora_layers) == ("my-captions", 16, 16)
    captioner = studio.captioner()
    examples = read_dataset(dataset)
    base_loss, adapted_loss = caption_loss(captioner, examples), caption_loss(captioner, examples, info.name)
    assert adapted_loss < 0.85 * base_loss, (base_loss, adapted_loss)
    images = [example.load() for example in examples[:4]]
    base = [result.captions[0].text for result in captioner.caption_batch(images, CaptionRequest(strategy="greedy"))]
    adapted = captioner.caption_batch(images, CaptionRequest(strategy="greedy"), adapter=info.name)
    assert sum(a.captions[0].text != b for a, b in zip(adapted, base, strict=True)) >= 3


def test_plain_peft_loads_the_adapter_and_its_checkpoints(trained, tiny_root, dataset, tmp_path):
    """Third-party code: ``PeftModel.from_pretrained`` on the output folder and on a checkpoint folder."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import BlipForConditionalGeneration

    from pipelines.catalog import CATALOG

    result, out, _ = trained
    base = tiny_root / CATALOG["blip-caption"].tiny_dir
    model = PeftModel.from_pretrained(BlipForConditionalGeneration.from_pretrained(base), out)
    saved = load_file(out / ADAPTER_WEIGHTS_FILE)
    state = {key: value for key, value in model.state_dict().items() if "lora_" in key}
    assert len(state) == len(saved) == 32
    assert all(torch.equal(state[key.replace(".weight", ".default.weight")], saved[key]) for key in saved)

    short = train_blip_lora.train(config(dataset, tmp_path / "short", tiny_root, max_steps=2, checkpoint_every=2))
    checkpoint = PeftModel.from_pretrained(BlipForConditionalGeneration.from_pretrained(base), short.checkpoints[0])
    final = load_file(tmp_path / "short" / ADAPTER_WEIGHTS_FILE)
    loaded = {key: value for key, value in checkpoint.state_dict().items() if "lora_" in key}
    assert all(torch.equal(loaded[key.replace(".weight", ".default.weight")], final[key]) for key in final)


def test_the_log_feeds_the_training_runs_loss_curve_and_the_card_tells_the_story(trained):
    result, out, printed = trained
    logged = [(int(match[1]), int(match[2]), float(match[3])) for line in printed if (match := LOSS_LINE.search(line))]
    assert [step for step, _, _ in logged] == list(range(1, 31)) and {total for _, total, _ in logged} == {30}
    assert [loss for _, _, loss in logged] == pytest.approx(result.losses, abs=1e-4)
    samples = [line for line in printed if "| adapter:" in line]
    assert len(samples) == 6 and all(line.strip().startswith(("astronaut.png", "chelsea.png")) for line in samples)
    arguments = json.loads((out / "training_args.json").read_text())
    assert arguments["global_step"] == 30 and arguments["train_images"] == 8 and arguments["rank"] == 16
    assert arguments["validation_losses"]["30"] == pytest.approx(result.validation_losses[30])
    card = (out / "README.md").read_text()
    assert "8 training images" in card and "Trained 30 steps" in card and "tiny random stand-in" in card
    assert f"{result.validation_losses[30]:.4f}" in card
    from huggingface_hub import ModelCard

    data = ModelCard.load(out / "README.md").data  # the YAML front matter the Hub indexes
    assert data.base_model == "Salesforce/blip-image-captioning-base"
    assert {"image-to-text", "lora", "blip"} <= set(data.tags)
    assert (data.license, data.library_name, data.pipeline_tag) == ("bsd-3-clause", "peft", "image-to-text")


def test_resume_continues_the_step_count_and_repeats_the_run(dataset, tiny_root, tmp_path):
    # Dropout on, accumulation across epoch ends: resuming must restore order, optimiser and random state.
    settings = {"max_steps": 6, "batch_size": 3, "gradient_accumulation": 2, "lora_dropout": 0.2, "checkpoint_every": 3}
    whole = train_blip_lora.train(config(dataset, tmp_path / "whole", tiny_root, validation_every=100, **settings))
    assert [path.name for path in whole.checkpoints] == ["checkpoint-3", "checkpoint-6"]
    resumed = train_blip_lora.train(
        config(dataset, tmp_path / "resumed", tiny_root, resume=str(whole.checkpoints[0]), **settings)
    )
    assert (resumed.start_step, resumed.steps, len(resumed.losses)) == (3, 6, 3)
    assert resumed.losses == pytest.approx(whole.losses[3:], rel=1e-5)
    assert resumed.learning_rates == pytest.approx(whole.learning_rates[3:])
    # accelerate's layout, with the adapter alone (no BLIP weights), as a folder peft loads.
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.bin", "custom_checkpoint_0.pkl"} | {
        "random_states_0.pkl",
        "training_state.json",
    } <= {path.name for path in whole.checkpoints[0].iterdir()}
    assert not any(whole.checkpoints[0].glob("model*.safetensors"))
    from safetensors.torch import load_file

    first, second = (
        load_file(tmp_path / "whole" / ADAPTER_WEIGHTS_FILE),
        load_file(tmp_path / "resumed" / ADAPTER_WEIGHTS_FILE),
    )
    assert first.keys() == second.keys() and len(first) == 32
    for key in first:
        torch.testing.assert_close(second[key], first[key], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="was trained with rank 16, this run asks for 8"):
        train_blip_lora.train(config(dataset, tmp_path / "other", tiny_root, resume=str(whole.checkpoints[0]), rank=8))


def test_a_malformed_dataset_fails_before_any_model_is_loaded(tmp_path, capsys):
    folder = make_dataset(tmp_path / "bad", {"chelsea.png": "a cat", "red.png": "   "})
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with (folder / "metadata.jsonl").open("a") as metadata:
        metadata.write(json.dumps({"text": "no file name"}) + "\n")
        metadata.write(json.dumps({"file_name": "broken.png", "text": "a broken image"}) + "\n")
    # A model that cannot load: had it been loaded first, the error would be about the model.
    arguments = [str(folder), str(tmp_path / "out"), "--model", str(tmp_path / "no-model"), "--device", "cpu"]
    with pytest.raises(SystemExit) as exited:
        train_blip_lora.main(arguments)
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: Fix ") and "before training" in error
    assert "line 2: 'red.png' has an empty text" in error and "line 3 has no file_name" in error
    assert "line 4: " in error and "broken.png" in error.split("line 4: ")[1]
    assert not (tmp_path / "out").exists()
    with pytest.raises(TrainingDataError):
        train_blip_lora.train(BlipLoraTrainingConfig(dataset=folder, output_dir=tmp_path / "out", device="cpu"))


def test_the_unknown_token_rate_and_its_warning(tiny_captioner):
    tokenizer = tiny_captioner.processor.tokenizer
    report = vocabulary_report(tokenizer, ["a cat", "кошка на диване"])
    assert (report.pieces, report.unknown, report.unknown_words) == (5, 3, ("кошка", "на", "диване"))
    warning = vocabulary_warning(report)
    assert warning.startswith("Warning: 60.0% of the captions' word pieces (3 of 5) are [UNK]")
    assert "accents are stripped" in warning and "non-Latin scripts" in warning and "Romanise" in warning
    assert vocabulary_warning(vocabulary_report(tokenizer, list(PHOTO_CAPTIONS.values()))) is None
    # Accents are stripped, not unknown: "cöffee" is spelled like "coffee".
    assert vocabulary_report(tokenizer, ["a cöffee"]).unknown == 0


def test_a_run_on_non_latin_captions_warns_before_training(tiny_root, tmp_path, capsys):
    russian = {**PHOTO_CAPTIONS, **SHAPE_CAPTIONS, "chelsea.png": "кошка сидит на полу", "red.png": "красный дом"}
    folder = make_dataset(tmp_path / "ru", russian)
    train_blip_lora.train(config(folder, tmp_path / "out", tiny_root, max_steps=1, validation_every=100))
    output = capsys.readouterr().out
    assert "Warning: " in output and "are [UNK]" in output and "кошка" in output
    assert output.index("Warning: ") < output.index("training 1 steps")


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"schedule": "linear"}, "schedule 'linear' unknown"),
        ({"mixed_precision": "bf16"}, "needs a CUDA GPU"),
        ({"targets": ("query", "qkv")}, "LoRA targets qkv unknown"),
        ({"attention": ()}, "LoRA targets .none. unknown"),
        ({"rank": 0}, "rank must be between 1 and"),
        ({"validation_split": 0.9}, "validation_split must be between 0 and 0.5"),
    ],
)
def test_bad_settings_are_one_sentence(tmp_path, overrides, words):
    with pytest.raises(ValueError, match=words):
        BlipLoraTrainingConfig(dataset=tmp_path, output_dir=tmp_path, device="cpu", **overrides).validated()


def _epoch(loader, epoch: int) -> list[list[int]]:
    """The micro-batches of one epoch as caption token ids' first word piece (one per example here)."""
    loader.set_epoch(epoch)
    return [batch["input_ids"][:, 1].tolist() for batch in loader]


def test_each_epoch_visits_every_image_and_processes_share_it_evenly():
    from accelerate.data_loader import prepare_data_loader

    # Ten examples whose single word piece is their index + 1000, so a batch shows which examples it holds.
    encoded = EncodedSet(
        examples=[None] * 10, features=torch.zeros(10, 2, 4), token_ids=[[0, 1000 + i, 2] for i in range(10)]
    )

    def prepared(batch_size, rank, processes):
        loader = caption_loader(encoded, batch_size, seed=1, pad_token_id=0)
        return prepare_data_loader(
            loader,
            num_processes=processes,
            process_index=rank,
            use_seedable_sampler=True,
            data_seed=1,
            put_on_device=False,
        )

    single = _epoch(prepared(4, 0, 1), 0)
    assert [len(batch) for batch in single] == [4, 4, 2]
    assert sorted(sum(single, [])) == list(range(1000, 1010))
    assert _epoch(prepared(4, 0, 1), 0) == single  # the order is a function of seed and epoch alone
    assert _epoch(prepared(4, 0, 1), 1) != single  # another epoch, another order
    shards = [_epoch(prepared(2, rank, 2), 0) for rank in range(2)]
    assert len(shards[0]) == len(shards[1]) == 3
    assert set(sum(shards[0], []) + sum(shards[1], [])) == set(range(1000, 1010))


def test_the_learning_rate_warms_up_then_follows_a_cosine_or_stays():
    from pipelines.training.common import make_lr_scheduler

    def factors(name, steps=10):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = make_lr_scheduler(name, optimizer, warmup_steps=2, total_steps=10)
        rates = []
        for _ in range(steps):
            rates.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        return rates + [scheduler.get_last_lr()[0]]

    cosine = factors("cosine")  # diffusers' warmup: update k runs at k / warmup
    assert cosine[:3] == pytest.approx([0.0, 0.5, 1.0]) and cosine[6] == pytest.approx(0.5)
    assert all(a > b for a, b in zip(cosine[2:], cosine[3:], strict=False)) and cosine[10] == pytest.approx(0.0)
    assert [factors("constant")[step] for step in (0, 1, 5, 9)] == pytest.approx([0.0, 0.5, 1.0, 1.0])


def test_the_trainers_modules_import_nothing_above_them():
    """The BLIP trainer's pieces sit below its driver: none imports ``train_blip_lora`` (lazily or not), and the
    settings import neither the files nor the data modules."""

    below = {
        "blip_config": {"train_blip_lora", "blip_lora_files", "blip_data"},
        "blip_data": {"train_blip_lora", "blip_lora_files"},
        "blip_lora_files": {"train_blip_lora", "blip_data"},
    }
    graph = import_graph()  # every import, lazy ones and `from pipelines.training import x` included
    for module, above in below.items():
        imported = {name.removeprefix("pipelines.training.") for name in graph[f"pipelines.training.{module}"]}
        assert not imported & above, module


@pytest.mark.slow
def test_two_processes_train_checkpoint_and_resume(dataset, tiny_root, tmp_path):
    """Two CPU processes (torch.distributed, as `accelerate launch --multi_gpu` starts them): each takes its share of
    the seeded order, both write their random state, and a resumed two-process run continues the step count."""
    import os
    import subprocess
    import sys

    output_dir = tmp_path / "two"

    def run(*extra: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        command += ["-m", "pipelines.training.train_blip_lora", str(dataset), str(output_dir), "--tiny", "--tiny-dir"]
        command += [
            str(tiny_root),
            "--device",
            "cpu",
            "--batch-size",
            "2",
            "--checkpoint-every",
            "2",
            "--log-every",
            "1",
        ]
        command += ["--validation-split", "0", "--sample-captions", "0", *extra]
        environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
        completed = subprocess.run(
            command, cwd=Path(__file__).resolve().parent.parent, env=environment, capture_output=True, text=True
        )
        assert completed.returncode == 0, completed.stderr[-3000:]
        return completed

    first = run("--max-steps", "2")
    assert "2 process(es)" in first.stdout and first.stdout.count("step 2/2  loss") == 1  # the main process logs
    assert "2 micro-batches of 2 per epoch and process" in first.stdout  # 8 images: 4 batches, 2 each
    checkpoint = output_dir / "checkpoint-2"
    assert sorted(path.name for path in checkpoint.glob("random_states_*.pkl")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]
    resumed = run("--max-steps", "4", "--resume", "latest")
    assert f"resumed from {checkpoint} at step 2 of 4" in resumed.stdout
    assert resumed.stdout.count("step 4/4  loss") == 1 and "step 1/4" not in resumed.stdout
    assert (output_dir / "checkpoint-4" / "optimizer.bin").is_file() and (output_dir / ADAPTER_WEIGHTS_FILE).is_file()
