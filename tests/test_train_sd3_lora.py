"""`python -m pipelines.training.train_sd3_lora`: the loss falls, the LoRA loads, resume, bad data, buckets, cache.

One training run on the tiny Large (64 px, rank 4) is shared by most tests; the
others reuse its cache folder, so no test but the first encodes anything.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.torch import load_file
from test_import_graph import import_graph

from pipelines import settings
from pipelines.training.dataset import TrainingDataError, read_dataset
from pipelines.training.sd3_data import (
    BucketBatchSampler,
    assign_buckets,
    bucket_sizes,
    epoch_batches,
    fit_to_bucket,
    nearest_bucket,
    precompute,
)
from pipelines.training.train_sd3_lora import SD3LoraTrainingConfig, train

EXAMPLES = Path(__file__).resolve().parent.parent / "assets" / "examples"
CAPTIONS = {
    "astronaut.png": "an astronaut in a space suit",
    "chelsea.png": "a cat sitting on a couch",
    "coffee.png": "a cup of coffee on a table",
    "rocket.jpg": "a rocket launch with smoke",
    "circle.png": "a red circle",
    "tower.png": "a blue square",
}
TRIGGER = "sks"
VALIDATION_PROMPT = "a sks cat"


def _write_dataset(folder: Path) -> Path:
    """The four example photos plus two drawn shapes, one wide and one tall."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg"):
        shutil.copy(EXAMPLES / name, folder / name)
    circle = Image.new("RGB", (192, 108), "white")
    ImageDraw.Draw(circle).ellipse((60, 10, 132, 98), fill="red")
    circle.save(folder / "circle.png")
    tower = Image.new("RGB", (90, 160), "black")
    ImageDraw.Draw(tower).rectangle((20, 40, 70, 120), fill="blue")
    tower.save(folder / "tower.png")
    lines = [json.dumps({"file_name": name, "text": text}) for name, text in CAPTIONS.items()]
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return _write_dataset(tmp_path_factory.mktemp("sd3-dataset"))


def _config(dataset: Path, output_dir: Path, tiny_root: Path, cache_dir: Path, **overrides) -> SD3LoraTrainingConfig:
    values = {
        "dataset": dataset,
        "output_dir": output_dir,
        "tiny": "large",
        "tiny_dir": tiny_root,
        "resolution": 64,
        "rank": 4,
        "lora_alpha": 8,  # alpha != rank: loading must honour the saved scale (2x)
        "learning_rate": 1e-2,
        "batch_size": 2,
        "trigger": TRIGGER,
        "device": "cpu",
        "cache_dir": cache_dir,
        "checkpoint_every": 0,
        "log_every": 5,
    }
    values.update(overrides)
    return SD3LoraTrainingConfig(**values)


class _Counter:
    """Counts what goes through SD3's text encoders and VAE encoder."""

    def __init__(self, monkeypatch) -> None:
        from diffusers import AutoencoderKL, StableDiffusion3Pipeline

        self.prompts: list[str] = []
        self.images = 0
        self.pipelines_loaded = 0
        encode_prompt, vae_encode = StableDiffusion3Pipeline.encode_prompt, AutoencoderKL.encode
        from_pretrained = StableDiffusion3Pipeline.from_pretrained.__func__

        def counted_encode_prompt(pipeline, prompt, *args, **kwargs):
            if prompt is not None:  # None: a call that passes ready embeddings (validation images)
                self.prompts += [prompt] if isinstance(prompt, str) else list(prompt)
            return encode_prompt(pipeline, prompt, *args, **kwargs)

        def counted_vae_encode(vae, pixels, *args, **kwargs):
            self.images += pixels.shape[0]
            return vae_encode(vae, pixels, *args, **kwargs)

        def counted_from_pretrained(cls, *args, **kwargs):
            self.pipelines_loaded += 1
            return from_pretrained(cls, *args, **kwargs)

        monkeypatch.setattr(StableDiffusion3Pipeline, "encode_prompt", counted_encode_prompt)
        monkeypatch.setattr(AutoencoderKL, "encode", counted_vae_encode)
        monkeypatch.setattr(StableDiffusion3Pipeline, "from_pretrained", classmethod(counted_from_pretrained))


@pytest.fixture(scope="module")
def trained(dataset, tiny_root, tmp_path_factory):
    """One run: 20 steps with a validation prompt every 10; every encoder call counted."""
    cache_dir = tmp_path_factory.mktemp("sd3-cache")
    output_dir = tmp_path_factory.mktemp("sd3-lora")
    config = _config(
        dataset,
        output_dir,
        tiny_root,
        cache_dir,
        steps=20,
        validation_prompt=VALIDATION_PROMPT,
        validation_every=10,
        validation_steps=2,
    )
    lines: list[str] = []
    with pytest.MonkeyPatch.context() as monkeypatch:
        counter = _Counter(monkeypatch)
        result = train(config, log=lines.append)
    return {"config": config, "result": result, "counter": counter, "lines": lines, "cache_dir": cache_dir}


def _fresh_pipeline(tiny_root: Path):
    from diffusers import StableDiffusion3Pipeline

    pipeline = StableDiffusion3Pipeline.from_pretrained(str(tiny_root / "sd35-large"))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _load_in_studio(pipeline, lora_file: Path) -> None:
    """The Studio's own path: resolve the file, load it into the library, select it at weight 1."""
    from pipelines.lora.library import LoraLibrary
    from pipelines.lora.sources import resolve_lora_source

    library = LoraLibrary("sd35-large")
    loaded = library.load(pipeline, resolve_lora_source(upload=lora_file))
    library.apply(pipeline, [(loaded.name, 1.0)])
    assert loaded.modules_changed == 2 * 4  # two tiny blocks x to_q, to_k, to_v, to_out.0


def _training_set(pipeline, dataset: Path):
    """The dataset as the trainer sees it (same buckets, trigger and encoders), encoded by ``pipeline`` in fp32."""
    return precompute(
        read_dataset(dataset),
        resolution=64,
        center_crop=False,
        random_flip=False,
        trigger=TRIGGER,
        extra_prompts=[],
        max_sequence_length=settings.SD3_TRAIN_T5_TOKENS,
        dtype=torch.float32,
        device=torch.device("cpu"),
        model_fingerprint={},
        cache_dir=None,
        load_text_pipeline=lambda: pipeline,
        get_vae=lambda: pipeline.vae,
    ).examples


@torch.no_grad()
def _fixed_noise_loss(transformer, examples) -> float:
    """Flow-matching MSE at fixed noise levels with fixed noise: comparable before and after training."""
    generator = torch.Generator().manual_seed(1234)
    total, count = 0.0, 0
    for item in examples:
        latents = item.latents[None]
        noise = torch.randn(latents.shape, generator=generator)
        for sigma in (0.4, 0.7, 0.9):
            noisy = (1 - sigma) * latents + sigma * noise
            prediction = transformer(
                hidden_states=noisy,
                timestep=torch.tensor([sigma * 1000]),
                encoder_hidden_states=item.prompt_embeds[None],
                pooled_projections=item.pooled_prompt_embeds[None],
                return_dict=False,
            )[0]
            total += torch.mean((prediction - (noise - latents)) ** 2).item()
            count += 1
    return total / count


def test_the_fixed_noise_loss_on_the_training_set_falls(trained, dataset, tiny_root):
    pipeline = _fresh_pipeline(tiny_root)
    examples = _training_set(pipeline, dataset)
    before = _fixed_noise_loss(pipeline.transformer, examples)
    _load_in_studio(pipeline, trained["result"].lora_path)
    after = _fixed_noise_loss(pipeline.transformer, examples)
    assert after < 0.95 * before, (before, after)
    result = trained["result"]
    assert result.steps == 20 and len(result.losses) == 20 and all(loss > 0 for loss in result.losses)


def test_the_adapter_is_diffusers_format_and_changes_the_studios_images(trained, tiny_root):
    from peft import LoraConfig, set_peft_model_state_dict

    lora_file = trained["result"].lora_path
    assert lora_file.name == "pytorch_lora_weights.safetensors"
    with safe_open(str(lora_file), "pt") as handle:
        keys = sorted(handle.keys())
        metadata = handle.metadata()
    modules = {key.removeprefix("transformer.").rsplit(".lora_", 1)[0] for key in keys}
    expected = {f"transformer_blocks.{block}.attn.{name}" for block in (0, 1) for name in ("to_q", "to_k", "to_v")}
    expected |= {f"transformer_blocks.{block}.attn.to_out.0" for block in (0, 1)}
    assert modules == expected
    assert all(key.startswith("transformer.") and (".lora_A." in key or ".lora_B." in key) for key in keys)
    assert json.loads(metadata["lora_adapter_metadata"])["transformer.lora_alpha"] == 8

    def draw(pipeline):
        return pipeline(
            "a red circle",
            num_inference_steps=2,
            height=64,
            width=64,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
        ).images[0]

    studio = _fresh_pipeline(tiny_root)
    base = draw(studio)
    _load_in_studio(studio, lora_file)
    with_lora = draw(studio)
    assert abs(with_lora - base).max() > 0.05

    # The same weights attached by hand with rank 4, alpha 8 draw the same image: the scale survived saving.
    by_hand = _fresh_pipeline(tiny_root)
    by_hand.transformer.add_adapter(
        LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"]), adapter_name="default"
    )
    state = {key.removeprefix("transformer."): value for key, value in load_file(lora_file).items()}
    assert not set_peft_model_state_dict(by_hand.transformer, state, adapter_name="default").unexpected_keys
    assert abs(draw(by_hand) - with_lora).max() < 1e-4

    # Plain diffusers reads the output folder as it is (third-party code: no Studio involved).
    plain = _fresh_pipeline(tiny_root)
    plain.load_lora_weights(str(lora_file.parent))
    assert abs(draw(plain) - with_lora).max() < 1e-4

    # The run's other outputs: settings, model card, validation images, and log lines the Train tab reads.
    from pipelines.training.runs import LOSS_LINE

    folder = trained["result"].output_dir
    assert json.loads((folder / "training_args.json").read_text())["trigger"] == TRIGGER
    assert f"`{TRIGGER}`" in (folder / "README.md").read_text()
    # The card's YAML front matter, as the Hub reads it.
    from huggingface_hub import ModelCard

    card = ModelCard.load(folder / "README.md").data
    assert card.base_model == "stabilityai/stable-diffusion-3.5-large"
    assert {"lora", "sd3", "text-to-image", "diffusers"} <= set(card.tags)
    assert (card.license, card.license_name, card.library_name) == ("other", "stabilityai-ai-community", "diffusers")
    assert card.instance_prompt == TRIGGER
    assert card.widget == [{"text": VALIDATION_PROMPT, "output": {"url": "validation/step-000020.png"}}]
    assert [path.name for path in trained["result"].validation_images] == ["step-000010.png", "step-000020.png"]
    assert Image.open(trained["result"].validation_images[0]).size == (64, 64)
    logged = [LOSS_LINE.search(line) for line in trained["lines"]]
    assert [(int(match.group(1)), int(match.group(2))) for match in logged if match] == [
        (5, 20),
        (10, 20),
        (15, 20),
        (20, 20),
    ]


def test_resume_continues_the_step_count_and_the_optimiser(dataset, tiny_root, trained, tmp_path):
    cache_dir = trained["cache_dir"]
    common = {"checkpoint_every": 2, "gradient_accumulation": 2, "warmup_steps": 3, "validation_split": 0.2}
    common |= {"validation_every": 2, "random_flip": True}
    straight = train(_config(dataset, tmp_path / "straight", tiny_root, cache_dir, steps=5, **common), log=print)
    # "latest" with no checkpoint yet starts afresh, so one command serves the first run and every restart.
    first = train(_config(dataset, tmp_path / "split", tiny_root, cache_dir, steps=2, resume="latest", **common))
    resumed = train(
        _config(dataset, tmp_path / "split", tiny_root, cache_dir, steps=5, resume="latest", **common), log=print
    )

    assert (first.start_step, first.steps) == (0, 2) and [path.name for path in first.checkpoints] == ["checkpoint-2"]
    assert (resumed.start_step, resumed.steps, len(resumed.losses)) == (2, 5, 3)
    assert [path.name for path in resumed.checkpoints] == ["checkpoint-4", "checkpoint-5"]
    # Same data order, noise, learning-rate warmup and Adam moments as the run that never stopped.
    assert resumed.losses == pytest.approx(straight.losses[2:], rel=1e-5)
    assert resumed.learning_rates == pytest.approx(straight.learning_rates[2:])
    assert straight.learning_rates == pytest.approx([0.0, 1e-2 / 3, 2e-2 / 3, 1e-2, 1e-2])  # diffusers' warmup
    assert resumed.held_out_losses == pytest.approx({4: straight.held_out_losses[4], 5: straight.held_out_losses[5]})
    ours, theirs = load_file(resumed.lora_path), load_file(straight.lora_path)
    assert all(torch.allclose(ours[key], theirs[key], atol=1e-6) for key in theirs)
    # accelerate's layout, the LoRA alone (no base model); the checkpoint's LoRA loads like the final one.
    checkpoint = tmp_path / "split" / "checkpoint-2"
    assert sorted(path.name for path in checkpoint.iterdir()) == [
        "custom_checkpoint_0.pkl",
        "optimizer.bin",
        "pytorch_lora_weights.safetensors",
        "random_states_0.pkl",
        "training_state.json",
    ]
    optimizer = torch.load(checkpoint / "optimizer.bin", weights_only=True)
    assert all(int(state["step"]) == 2 for state in optimizer["state"].values())
    assert load_file(checkpoint / "pytorch_lora_weights.safetensors").keys() == theirs.keys()
    pipeline = _fresh_pipeline(tiny_root)
    pipeline.load_lora_weights(str(checkpoint))  # a checkpoint is a LoRA diffusers loads, too
    assert pipeline.get_list_adapters() == {"transformer": ["default_0"]}

    with pytest.raises(ValueError, match="rank 4"):
        train(_config(dataset, tmp_path / "split", tiny_root, cache_dir, steps=6, rank=8, resume="latest"))
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        train(_config(dataset, tmp_path / "other", tiny_root, cache_dir, resume=str(tmp_path / "nowhere")))
    (checkpoint / "optimizer.bin").rename(checkpoint / "optimizer.pt")  # as the older layout had it
    with pytest.raises(ValueError, match="older checkpoint layout"):
        train(_config(dataset, tmp_path / "other", tiny_root, cache_dir, resume=str(checkpoint)))


@pytest.mark.parametrize(
    ("line", "complaint"),
    [
        ({"text": "a cat"}, "has no file_name"),
        ({"file_name": "broken.png", "text": "a broken file"}, "broken.png"),
        ({"file_name": "extra.png", "text": "   "}, "'extra.png' has an empty text"),
    ],
)
def test_a_malformed_dataset_fails_before_any_model_is_loaded(
    dataset, tmp_path, tiny_root, monkeypatch, line, complaint
):
    from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline

    folder = tmp_path / "data"
    shutil.copytree(dataset, folder)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    shutil.copy(folder / "circle.png", folder / "extra.png")
    with open(folder / "metadata.jsonl", "a") as handle:
        handle.write(json.dumps(line) + "\n")

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the dataset was checked")

    for cls in (StableDiffusion3Pipeline, SD3Transformer2DModel, AutoencoderKL):
        monkeypatch.setattr(cls, "from_pretrained", refuse)
        monkeypatch.setattr(cls, "load_config", refuse)
    with pytest.raises(TrainingDataError, match=complaint) as raised:
        train(_config(folder, tmp_path / "out", tiny_root, None, steps=1))
    assert "line 7" in str(raised.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("overrides", "complaint"),
    [
        ({"use_8bit_adam": True}, "needs a CUDA GPU"),
        ({"mixed_precision": "bf16"}, "needs a CUDA GPU"),
        ({"resolution": 100}, "multiple of 16"),
        ({"lora_layers": ("attn", "mlp")}, "mlp"),
        ({"weighting_scheme": "cosine"}, "weighting scheme"),
        ({"resolution": 1024}, "position embedding"),  # tiny models draw at most 512 px
    ],
)
def test_bad_settings_are_refused_in_one_sentence(dataset, tmp_path, tiny_root, overrides, complaint):
    if torch.cuda.is_available() and "needs a CUDA GPU" in complaint:
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match=complaint):
        train(_config(dataset, tmp_path / "out", tiny_root, None, steps=1, **overrides))


def test_a_model_that_cannot_load_is_named_with_the_fix(dataset, tmp_path, tiny_root, monkeypatch):
    from pipelines.manager import ModelLoadError

    with pytest.raises(ModelLoadError, match="holds no model_index.json"):
        train(_config(dataset, tmp_path / "out", tiny_root, None, tiny=None, model=str(tmp_path / "nowhere")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match=r"not in the local Hugging Face cache.*--model DIR.*--tiny large"):
        train(_config(dataset, tmp_path / "out", tiny_root, None, tiny=None, model="someone/not-cached-sd3"))


def test_aspect_buckets():
    from pipelines.catalog import CATALOG
    from pipelines.sd3.text_to_image import size_for_aspect

    buckets = bucket_sizes(1024)
    # At SD3.5's native size the buckets are the Generate tab's aspect presets: train at the sizes users draw.
    ratios = [f"{width}:{height}" for width, height in settings.SD3_TRAIN_BUCKET_RATIOS]
    assert buckets == [size_for_aspect(ratio, CATALOG["sd35-large"], tiny=False) for ratio in ratios]
    for width, height in buckets:
        assert width % 16 == 0 and height % 16 == 0
        assert abs(width * height / 1024**2 - 1) < 0.03
    assert nearest_bucket(1920, 1080, buckets) == (1360, 768)  # 16:9
    assert nearest_bucket(1080, 1920, buckets) == (768, 1360)  # 9:16
    assert nearest_bucket(600, 400, buckets) == (1248, 832)  # 3:2
    assert nearest_bucket(300, 400, buckets) == (880, 1184)  # 3:4
    assert nearest_bucket(500, 490, buckets) == (1024, 1024)
    # The dataset's own sizes: astronaut 512², chelsea 451x300, coffee 600x400, rocket 640x427, 192x108, 90x160.
    sizes = [(512, 512), (451, 300), (600, 400), (640, 427), (192, 108), (90, 160)]
    assert assign_buckets(sizes, 64, center_crop=False) == [(64, 64), (80, 48), (80, 48), (80, 48), (80, 48), (48, 80)]
    assert assign_buckets(sizes, 64, center_crop=True) == [(64, 64)] * 6

    # Cover, then crop the centre: a wide image keeps its middle column, scaled.
    wide = Image.new("RGB", (300, 100), "black")
    ImageDraw.Draw(wide).rectangle((140, 0, 159, 99), fill="white")
    fitted = fit_to_bucket(wide, (64, 64))
    assert fitted.size == (64, 64)
    assert fitted.getpixel((32, 32)) == (255, 255, 255) and fitted.getpixel((5, 32)) == (0, 0, 0)

    # One bucket per batch, every image once per epoch, and the order depends on the epoch.
    assigned = [(64, 64), (80, 48), (80, 48), (48, 80), (80, 48), (64, 64), (80, 48)]
    batches = epoch_batches(assigned, 2, seed=0, epoch=0)
    assert sorted(index for batch in batches for index in batch) == list(range(7))
    assert all(len({assigned[index] for index in batch}) == 1 for batch in batches)
    assert epoch_batches(assigned, 2, seed=0, epoch=0) == batches != epoch_batches(assigned, 2, seed=0, epoch=1)

    # The same order through a DataLoader's batch sampler; split between two processes as accelerate does,
    # each takes whole one-bucket batches, the same number of them, and together they cover the epoch.
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import DataLoader

    sampler = BucketBatchSampler(assigned, 2, seed=0)
    loader = DataLoader(list(range(7)), batch_sampler=sampler, collate_fn=list)
    assert len(loader) == len(batches) and list(loader) == batches
    sampler.set_epoch(1)
    assert list(loader) == epoch_batches(assigned, 2, seed=0, epoch=1)
    shards = [list(BatchSamplerShard(sampler, num_processes=2, process_index=rank)) for rank in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == math.ceil(len(batches) / 2)
    assert all(len({assigned[index] for index in batch}) == 1 for shard in shards for batch in shard)
    assert {index for shard in shards for batch in shard for index in batch} == set(range(7))


def test_captions_and_images_are_encoded_once_and_cached(trained, dataset, tiny_root, tmp_path, monkeypatch):
    counter = trained["counter"]
    texts = [f"{TRIGGER}, {caption}" for caption in CAPTIONS.values()] + [VALIDATION_PROMPT, ""]
    assert sorted(counter.prompts) == sorted(texts)  # each once, for 20 steps of 6 images
    assert counter.images == len(CAPTIONS)

    again = _Counter(monkeypatch)
    result = train(_config(dataset, tmp_path / "again", tiny_root, trained["cache_dir"], steps=2))
    assert (again.prompts, again.images, again.pipelines_loaded) == ([], 0, 0)  # the text encoders never loaded
    assert result.steps == 2

    copy = shutil.copytree(dataset, tmp_path / "copy")  # same sizes and mtimes: still cached
    (copy / "coffee.png").touch()  # a changed file: the latents are stale, the captions are not
    train(_config(copy, tmp_path / "touched", tiny_root, trained["cache_dir"], steps=1))
    assert (again.prompts, again.images) == ([], len(CAPTIONS))


def test_gradient_checkpointing_recomputes_blocks_and_trains_the_same_adapter(
    dataset, tiny_root, trained, tmp_path, monkeypatch
):
    from diffusers.models.attention import JointTransformerBlock

    calls = []
    forward = JointTransformerBlock.forward

    def counted(block, *args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return forward(block, *args, **kwargs)

    monkeypatch.setattr(JointTransformerBlock, "forward", counted)
    plain = train(_config(dataset, tmp_path / "plain", tiny_root, trained["cache_dir"], steps=2))
    plain_calls, calls[:] = len(calls), []
    checkpointed = train(
        _config(dataset, tmp_path / "ckpt", tiny_root, trained["cache_dir"], steps=2, gradient_checkpointing=True)
    )
    assert plain_calls == 2 * 2  # 2 steps x 2 blocks
    assert len(calls) == 2 * plain_calls  # every block runs again in backward
    assert checkpointed.losses == pytest.approx(plain.losses, rel=1e-6)
    ours, theirs = load_file(checkpointed.lora_path), load_file(plain.lora_path)
    assert all(torch.allclose(ours[key], theirs[key], atol=1e-6) for key in theirs)
    assert any(theirs[key].abs().max() > 0 for key in theirs if "lora_B" in key)


@pytest.mark.slow
def test_two_processes_train_one_adapter(dataset, tiny_root, trained, tmp_path):
    """Two CPU processes (torch.distributed, as `accelerate launch --multi_gpu` starts them) share the steps."""
    import os
    import subprocess
    import sys

    output_dir = tmp_path / "two"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "pipelines.training.train_sd3_lora", str(dataset), str(output_dir), "--tiny", "large"]
    command += ["--tiny-dir", str(tiny_root), "--cache-dir", str(trained["cache_dir"]), "--device", "cpu"]
    command += ["--resolution", "64", "--rank", "4", "--lora-alpha", "8", "--trigger", TRIGGER, "--lr", "1e-2"]
    command += ["--steps", "2", "--checkpoint-every", "2", "--log-every", "1"]
    # No GPU for CPU processes: gloo's barrier picks CUDA tensors on a machine that has one.
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    completed = subprocess.run(
        command,
        cwd=Path(__file__).resolve().parent.parent,
        env=environment,
        capture_output=True,
        text=True,
        timeout=240,
    )
    errors = [line for line in completed.stderr.splitlines() if "Error" in line or "error:" in line]
    assert completed.returncode == 0, "\n".join(errors)[-3000:] or completed.stderr[-3000:]
    assert "on 2 process(es)" in completed.stdout
    assert completed.stdout.count("step 1/2  loss") == completed.stdout.count("saved ") == 1  # the main process logs
    assert "encoding" not in completed.stdout  # both processes read the cache
    checkpoint = output_dir / "checkpoint-2"
    assert sorted(path.name for path in checkpoint.glob("random_states_*.pkl")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]
    assert json.loads((checkpoint / "training_state.json").read_text())["processes"] == 2
    weights = load_file(output_dir / "pytorch_lora_weights.safetensors")
    assert any(weights[key].abs().max() > 0 for key in weights if "lora_B" in key)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 and 8-bit Adam need a CUDA GPU")
def test_cuda_bf16_8bit_adam_checkpointing_and_resume(dataset, tiny_root, tmp_path):
    options = {"device": "cuda", "use_8bit_adam": True, "gradient_checkpointing": True, "checkpoint_every": 10}
    options |= {"validation_prompt": VALIDATION_PROMPT, "validation_every": 10, "validation_steps": 2}
    cache_dir = tmp_path / "cache"
    first = train(_config(dataset, tmp_path / "gpu", tiny_root, cache_dir, steps=10, **options))
    resumed = train(_config(dataset, tmp_path / "gpu", tiny_root, cache_dir, steps=20, resume="latest", **options))
    assert json.loads((tmp_path / "gpu" / "training_args.json").read_text())["mixed_precision"] == "auto"
    assert (resumed.start_step, resumed.steps) == (10, 20)
    assert all(0 < loss < 10 for loss in first.losses + resumed.losses)
    assert [path.name for path in resumed.validation_images] == ["step-000020.png"]
    optimizer = torch.load(tmp_path / "gpu" / "checkpoint-10" / "optimizer.bin", weights_only=False)
    assert optimizer["state"] and not any("exp_avg" in state for state in optimizer["state"].values())  # bnb's
    assert any(cache_dir.glob("latents-*.pt"))

    # The bf16-trained LoRA, loaded into the fp32 CPU pipeline, lowers the fixed-noise loss there too.
    pipeline = _fresh_pipeline(tiny_root)
    examples = _training_set(pipeline, dataset)
    before = _fixed_noise_loss(pipeline.transformer, examples)
    _load_in_studio(pipeline, resumed.lora_path)
    assert _fixed_noise_loss(pipeline.transformer, examples) < 0.95 * before


def test_the_trainers_modules_import_nothing_above_them():
    """Shared types sit below the code that uses them: no module of the SD3 trainer imports the driver, lazily or
    for type checking either, and the common pieces import neither trainer."""
    below = {
        "sd3_config": {"train_sd3_lora", "flow_matching", "sd3_lora_files"},
        "flow_matching": {"train_sd3_lora", "sd3_lora_files"},
        "sd3_lora_files": {"train_sd3_lora", "flow_matching"},
        "sd3_data": {"train_sd3_lora", "flow_matching", "sd3_lora_files", "sd3_config"},
        "common": {"train_sd3_lora", "train_blip_lora", "sd3_lora_files", "sd3_config"},
    }
    graph = import_graph()  # every import, lazy ones and `from pipelines.training import x` included
    for module, above in below.items():
        imported = {name.removeprefix("pipelines.training.") for name in graph[f"pipelines.training.{module}"]}
        assert not imported & above, module
