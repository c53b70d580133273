"""LoRA loading on the tiny SD3 pipelines: exact base output when off, mixing, fusing, refusals that change nothing."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipelines import settings
from pipelines.lora.formats import convert_to_diffusers
from pipelines.lora.library import (
    LIST_HEADERS,
    LoadedLora,
    LoraLibrary,
    check_lora_fits,
    count_adapter_modules,
    parse_lora_selection,
    prompt_with_triggers,
)
from pipelines.lora.sources import list_lora_files, load_registry, resolve_lora_source
from pipelines.runtime import choose_runtime
from pipelines.sd3.loading import load_sd3_pipeline
from pipelines.tiny import tiny_base_names, tiny_lora_dir, tiny_registry_path

STYLE, KOHYA, MEDIUM = "tiny-large-style.safetensors", "tiny-large-kohya.safetensors", "tiny-medium-detail.safetensors"
# Fused vs unfused outputs (images in [0, 1]) differ only by float32 rounding of W + BA vs
# Wx + B(Ax): measured 2.1e-6 on this pipeline; 1e-4 leaves room for other CPUs, and is 1000x
# smaller than what a LoRA changes (~0.1).
FUSED_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def lora_dir(tiny_root, tmp_path_factory):
    """A LoRA folder of this module's own: the tiny LoRA files, plus whatever tests add."""
    folder = tmp_path_factory.mktemp("loras")
    for name in (STYLE, KOHYA, MEDIUM):
        shutil.copy(tiny_lora_dir(tiny_root) / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def pipeline(tiny_root):
    """A tiny Large pipeline of this module's own (the shared manager's pipelines stay untouched)."""
    return load_sd3_pipeline(str(tiny_root / "sd35-large"), choose_runtime("cpu"), "bf16")


def draw(pipeline) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return pipeline(
        "a cat on a table",
        num_inference_steps=2,
        height=64,
        width=64,
        guidance_scale=3.5,
        generator=generator,
        output_type="pt",
    ).images


@pytest.fixture(scope="module")
def base_image(pipeline):
    return draw(pipeline)


@pytest.fixture
def library(pipeline):
    library = LoraLibrary("sd35-large", known_bases=tiny_base_names())
    yield library
    library.unload(pipeline)


def load(library, pipeline, lora_dir, file, **kwargs) -> LoadedLora:
    return library.load(pipeline, resolve_lora_source(file=file, lora_dir=lora_dir), **kwargs)


def lora_modules_in_file(path) -> int:
    return len({key.rsplit(".lora_", 1)[0] for key in load_file(str(path)) if ".lora_A." in key})


def test_a_peft_lora_changes_the_image_and_weight_zero_disable_unload_give_the_base(
    pipeline, library, lora_dir, base_image, monkeypatch
):
    from peft.tuners.lora import LoraLayer

    style = load(library, pipeline, lora_dir, STYLE)
    monkeypatch.setattr(library, "_attach", None)  # from here on, toggling must never load it again
    assert style.modules_changed == lora_modules_in_file(lora_dir / STYLE) == 16
    assert count_adapter_modules(pipeline.transformer, style.name) == 16
    assert torch.equal(draw(pipeline), base_image)  # loading alone draws nothing new

    library.apply(pipeline, [(style.name, 1.0)])
    styled = draw(pipeline)
    assert (styled - base_image).abs().max() > 1e-2

    library.apply(pipeline, [(style.name, 0.0)])
    assert torch.equal(draw(pipeline), base_image)
    library.apply(pipeline, [])
    assert torch.equal(draw(pipeline), base_image)
    library.apply(pipeline, [(style.name, 1.0)])  # back on, without loading it again
    assert torch.equal(draw(pipeline), styled)
    assert count_adapter_modules(pipeline.transformer, style.name) == 16

    assert library.unload(pipeline) == [style.name]
    assert torch.equal(draw(pipeline), base_image)
    assert not any(isinstance(module, LoraLayer) for module in pipeline.transformer.modules())


def test_two_adapters_at_half_weight_are_deterministic_and_mix(pipeline, library, lora_dir, base_image):
    style, kohya = load(library, pipeline, lora_dir, STYLE), load(library, pipeline, lora_dir, KOHYA)
    assert kohya.style == "kohya" and kohya.modules_changed == 21  # 7 kohya layers, qkv split in three
    library.apply(pipeline, [(style.name, 0.5), (kohya.name, 0.5)])
    mixed, again = draw(pipeline), draw(pipeline)
    assert torch.equal(mixed, again)
    library.apply(pipeline, [(style.name, 0.5)])
    style_only = draw(pipeline)
    library.apply(pipeline, [(kohya.name, 0.5)])
    kohya_only = draw(pipeline)
    for other in (base_image, style_only, kohya_only):
        assert (mixed - other).abs().max() > 1e-3
    library.apply(pipeline, [(style.name, 0.5), (kohya.name, 0.5)])
    assert torch.equal(draw(pipeline), mixed)


def test_fused_matches_unfused_and_unfuse_restores_the_weights_exactly(pipeline, library, lora_dir, base_image):
    style, kohya = load(library, pipeline, lora_dir, STYLE), load(library, pipeline, lora_dir, KOHYA)
    weights_before = {name: value.clone() for name, value in pipeline.transformer.state_dict().items()}
    library.apply(pipeline, [(style.name, 1.0)])
    style_alone = draw(pipeline)
    selection = [(style.name, 0.7), (kohya.name, -0.4)]
    library.apply(pipeline, selection)
    unfused = draw(pipeline)

    library.fuse(pipeline, selection)
    assert library.fused
    fused = draw(pipeline)
    assert (fused - unfused).abs().max() < FUSED_TOLERANCE
    assert (fused - base_image).abs().max() > 1e-2
    library.apply(pipeline, selection)  # the same selection keeps the fused weights
    assert library.fused and torch.equal(draw(pipeline), fused)

    library.unfuse(pipeline)
    assert not library.fused
    assert torch.equal(draw(pipeline), unfused)
    after = pipeline.transformer.state_dict()
    assert all(torch.equal(after[name], value) for name, value in weights_before.items())

    # Another selection while fused unfuses first, so it draws what it draws on the original weights.
    library.fuse(pipeline, selection)
    library.apply(pipeline, [(style.name, 1.0)])
    assert not library.fused
    assert torch.equal(draw(pipeline), style_alone)
    library.fuse(pipeline, [(style.name, 1.0)])
    library.unload(pipeline)  # unloading while fused restores the weights first
    assert torch.equal(draw(pipeline), base_image)


def test_fusing_a_quantized_transformer_is_refused(pipeline, library, lora_dir, monkeypatch):
    # bitsandbytes needs a GPU; a transformer that says it is quantized takes the same path.
    style = load(library, pipeline, lora_dir, STYLE)
    monkeypatch.setattr(pipeline.transformer, "hf_quantizer", object(), raising=False)
    with pytest.raises(ValueError, match="bitsandbytes-quantized .* keep the LoRAs unfused"):
        library.fuse(pipeline, [(style.name, 1.0)])
    assert not library.fused


def _write(path, tensors):
    save_file(tensors, str(path))
    return path.name


def test_refused_files_say_why_and_leave_the_pipeline_unchanged(pipeline, library, lora_dir, tmp_path):
    style = load(library, pipeline, lora_dir, STYLE)
    library.apply(pipeline, [(style.name, 0.8)])
    before = draw(pipeline)
    adapters_before = list(pipeline.transformer.peft_config)
    ones = torch.ones
    cases = {
        # A kohya layer with no diffusers counterpart (SD3.5 has no attn2 in the context stream).
        _write(
            lora_dir / "kohya-attn2.safetensors",
            {
                "lora_unet_joint_blocks_0_context_block_attn2_qkv.lora_down.weight": ones(4, 32),
                "lora_unet_joint_blocks_0_context_block_attn2_qkv.lora_up.weight": ones(96, 4),
            },
        ): "a layer the Studio cannot map to diffusers' SD3 transformer",
        _write(lora_dir / "weights.safetensors", {"proj_out.weight": ones(64, 32)}): "holds no LoRA weights",
        MEDIUM: "was made for a 48-wide, 10-block MMDiT (SD3.5 Medium (tiny)); the loaded model is Stable Diffusion "
        "3.5 Large (32 wide, 2 blocks). Choose SD3.5 Medium (tiny), or a LoRA made for Stable Diffusion 3.5 Large.",
        _write(
            lora_dir / "deep.safetensors",
            {
                "transformer.transformer_blocks.5.attn.to_q.lora_A.weight": ones(4, 32),
                "transformer.transformer_blocks.5.attn.to_q.lora_B.weight": ones(32, 4),
            },
        ): "changes block 5",
        _write(
            lora_dir / "zero.safetensors",
            {
                "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": ones(4, 32),
                "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 4),
            },
        ): "changes nothing",
    }
    for file, message in cases.items():
        with pytest.raises(ValueError) as error:
            load(library, pipeline, lora_dir, file)
        assert message in str(error.value), file
        assert str(error.value).endswith("."), str(error.value)
        assert list(pipeline.transformer.peft_config) == adapters_before
        assert library.names() == [style.name]
    assert torch.equal(draw(pipeline), before)


def test_a_failure_after_diffusers_touched_the_pipeline_is_undone(pipeline, library, lora_dir, monkeypatch):
    import pipelines.lora.library as lora_module

    style = load(library, pipeline, lora_dir, STYLE)
    library.apply(pipeline, [(style.name, 0.8)])
    before = draw(pipeline)
    real_count = lora_module.count_adapter_modules
    monkeypatch.setattr(
        lora_module, "count_adapter_modules", lambda transformer, name: real_count(transformer, name) - 1
    )
    with pytest.raises(ValueError, match="should change 21 layers .* peft attached it to 20; it was not loaded"):
        load(library, pipeline, lora_dir, KOHYA)
    monkeypatch.undo()
    assert list(pipeline.transformer.peft_config) == [style.name]
    assert count_adapter_modules(pipeline.transformer, "tiny_large_kohya") == 0
    assert library.names() == [style.name]
    assert torch.equal(draw(pipeline), before)


def test_a_reloaded_pipeline_gets_its_adapters_back(pipeline, library, lora_dir, tiny_root):
    style, kohya = load(library, pipeline, lora_dir, STYLE), load(library, pipeline, lora_dir, KOHYA)
    selection = [(style.name, 0.6), (kohya.name, 0.9)]
    library.apply(pipeline, selection)
    expected = draw(pipeline)
    reloaded = load_sd3_pipeline(str(tiny_root / "sd35-large"), choose_runtime("cpu"), "bf16")
    assert not getattr(reloaded.transformer, "peft_config", None)
    library.apply(reloaded, selection)
    assert sorted(reloaded.transformer.peft_config) == sorted([style.name, kohya.name])
    assert torch.equal(draw(reloaded), expected)


def test_text_encoder_keys_load_the_transformer_part_with_a_warning(pipeline, library, lora_dir):
    tensors = load_file(str(lora_dir / STYLE))
    tensors["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"] = torch.ones(4, 32)
    tensors["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight"] = torch.ones(32, 4)
    loaded = load(library, pipeline, lora_dir, _write(lora_dir / "with-te.safetensors", tensors))
    assert loaded.modules_changed == 16
    assert len(loaded.warnings) == 1 and "also trains the text encoders" in loaded.warnings[0]


def test_names_are_sanitised_unique_and_loading_twice_is_one_load(pipeline, library, lora_dir, monkeypatch):
    first = load(library, pipeline, lora_dir, STYLE)
    assert first.name == "tiny_large_style"
    assert load(library, pipeline, lora_dir, STYLE) is first  # the same file: the entry already there
    (lora_dir / "sub").mkdir(exist_ok=True)
    shutil.copy(lora_dir / KOHYA, lora_dir / "sub" / STYLE)  # another file with the same stem
    second = load(library, pipeline, lora_dir, f"sub/{STYLE}", scale=0.6)
    assert (second.name, second.default_scale, second.style) == ("tiny_large_style_2", 0.6, "kohya")
    # The same file under another name is the entry already there, answered with its own name.
    assert load(library, pipeline, lora_dir, KOHYA, name="Tiny Large Style") is second
    generator = torch.Generator().manual_seed(5)
    small = {
        "transformer.transformer_blocks.0.attn.to_k.lora_A.weight": torch.randn(2, 32, generator=generator),
        "transformer.transformer_blocks.0.attn.to_k.lora_B.weight": torch.randn(32, 2, generator=generator),
    }
    small_file = _write(lora_dir / "small.safetensors", small)
    with pytest.raises(ValueError, match="'tiny_large_style' is already loaded; unload it first"):
        load(library, pipeline, lora_dir, small_file, name="Tiny Large Style")
    third = load(library, pipeline, lora_dir, small_file, name="My Style!")
    assert third.name == "my_style" and third.modules_changed == 1
    monkeypatch.setattr(settings, "MAX_LOADED_LORAS", 3)
    with pytest.raises(ValueError, match="3 LoRAs are loaded.*unload one first"):
        load(library, pipeline, lora_dir, MEDIUM)


def test_sources_stay_inside_the_lora_folder_and_are_safetensors(lora_dir, tmp_path, monkeypatch):
    outside = tmp_path / "outside.safetensors"
    shutil.copy(lora_dir / STYLE, outside)
    (lora_dir / "escape.safetensors").unlink(missing_ok=True)
    (lora_dir / "escape.safetensors").symlink_to(outside)
    torch.save({"lora": torch.ones(2)}, lora_dir / "evil.bin")
    torch.save({"lora": torch.ones(2)}, lora_dir / "renamed.safetensors")
    refusals = {
        "../outside.safetensors": "goes up with '..'",
        str(outside): "is an absolute path",
        "escape.safetensors": "leads outside the LoRA folder",
        "evil.bin": "pickled files can run code when loaded; convert it to .safetensors",
        "model.ckpt": "pickled files can run code when loaded",
        "notes.txt": "not a .safetensors file",
        "renamed.safetensors": "looks like a PyTorch pickle renamed to .safetensors",
        "missing.safetensors": "There is no 'missing.safetensors' in the LoRA folder",
    }
    for name, message in refusals.items():
        with pytest.raises(ValueError) as error:
            resolve_lora_source(file=name, lora_dir=lora_dir)
        assert message in str(error.value), (name, str(error.value))
    assert "escape.safetensors" not in list_lora_files(lora_dir) and STYLE in list_lora_files(lora_dir)
    with pytest.raises(ValueError, match="pickled files can run code"):
        resolve_lora_source(upload=lora_dir / "evil.bin")
    with pytest.raises(ValueError, match="looks like a PyTorch pickle"):
        resolve_lora_source(upload=lora_dir / "renamed.safetensors")
    assert resolve_lora_source(upload=outside).kind == "upload"  # an upload may live anywhere
    with pytest.raises(ValueError, match="Choose one LoRA source"):
        resolve_lora_source(file=STYLE, repo="a/b", lora_dir=lora_dir)
    monkeypatch.setattr(settings, "MAX_LORA_BYTES", 1000)
    with pytest.raises(ValueError, match="over the 0 MB limit for a LoRA"):
        resolve_lora_source(file=STYLE, lora_dir=lora_dir)


def test_the_hub_offline_gives_one_sentence(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    offline = "is not in the local Hugging Face cache and the Hub cannot be reached"
    repo = "Shakker-Labs/SD3.5-LoRA-Linear-Red-Light"
    for weight_name in ("SD35-lora-Linear-Red-Light.safetensors", None):
        with pytest.raises(ValueError, match=offline):
            resolve_lora_source(repo=repo, weight_name=weight_name, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="not a valid Hub repo id"):
        resolve_lora_source(repo="not a repo!", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="pickled files can run code"):
        resolve_lora_source(repo=repo, weight_name="lora.bin", cache_dir=tmp_path)


def test_the_real_registry_lists_checked_sd35_loras():
    entries = load_registry()
    assert len(entries) >= 3
    for entry in entries.values():
        assert entry.repo and entry.weight_name.endswith(".safetensors") and entry.trigger_words
        assert entry.source == f"https://huggingface.co/{entry.repo}" and entry.licence
        assert set(entry.bases) <= {"sd35-large", "sd35-large-turbo", "sd35-medium"}


def test_a_registry_entry_loads_with_its_trigger_words(pipeline, library, tiny_root, tmp_path):
    registry = load_registry(tiny_registry_path(tiny_root))
    source = resolve_lora_source(registry_name="tiny_large_style", registry=registry)
    loaded = library.load(pipeline, source)
    assert (loaded.name, loaded.trigger_words, loaded.kind) == ("tiny_large_style", ("tinystyle",), "registry")
    library.apply(pipeline, [(loaded.name, 1.0)])
    assert prompt_with_triggers("a cat", library.active()) == ("a cat, tinystyle", ["tinystyle"])
    with pytest.raises(ValueError, match="There is no LoRA 'nope' in the registry; it has: tiny_large_style"):
        resolve_lora_source(registry_name="nope", registry=registry)
    # An entry made for another model still loads when its shape fits, with a warning saying so.
    document = json.loads(tiny_registry_path(tiny_root).read_text())
    document["loras"][2]["bases"] = ["sd35-large-turbo"]
    shutil.copy(tiny_lora_dir(tiny_root) / KOHYA, tmp_path / KOHYA)
    turbo_only = tmp_path / "loras.json"
    turbo_only.write_text(json.dumps(document))
    kohya = library.load(
        pipeline, resolve_lora_source(registry_name="tiny_large_kohya", registry=load_registry(turbo_only))
    )
    assert kohya.warnings == (
        "registry:tiny_large_kohya was made for Stable Diffusion 3.5 Large Turbo; on Stable Diffusion 3.5 Large it "
        "may look different.",
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda entry: entry.pop("licence"), "has no 'licence'"),
        (lambda entry: entry.update(bases=["sdxl"]), "'bases' must list catalog keys"),
        (lambda entry: entry.update(repo="a/b", weight_name="x.safetensors"), "needs exactly one of 'repo'"),
        (lambda entry: entry.update(triger_words=[]), "unknown field 'triger_words'"),
        (lambda entry: entry.update(name="Tiny Style"), "must be lower case letters"),
        (lambda entry: entry.update(default_scale="strong"), "'default_scale' must be a number"),
    ],
)
def test_registry_mistakes_are_named(tiny_root, tmp_path, change, message):
    document = json.loads(tiny_registry_path(tiny_root).read_text())
    change(document["loras"][0])
    path = tmp_path / "loras.json"
    path.write_text(json.dumps(document))
    with pytest.raises(ValueError, match=message):
        load_registry(path)


def _entry(name: str, default_scale: float = 1.0, triggers: tuple[str, ...] = ()) -> LoadedLora:
    return LoadedLora(
        name=name,
        source=f"loras/{name}.safetensors",
        kind="file",
        style="diffusers",
        trigger_words=triggers,
        default_scale=default_scale,
        modules_changed=1,
        sha256="0" * 64,
        a1111_hash="0" * 12,
        base="test",
        file_bytes=1,
    )


def test_parse_lora_selection():
    loaded = [_entry("style", 0.7), _entry("detail")]
    assert parse_lora_selection("", loaded=loaded) == []
    assert parse_lora_selection("style", loaded=loaded) == [("style", 0.7)]
    assert parse_lora_selection("style:0.5, detail:-1", 2.0, loaded=loaded) == [("style", 1.0), ("detail", -2.0)]
    assert parse_lora_selection("<lora:Style:0.25>", loaded=loaded) == [("style", 0.25)]
    refusals = {
        ("other:1", 1.0): "No LoRA named 'other' is loaded; loaded: style, detail.",
        ("style:abc", 1.0): "the weight of style must be a number",
        ("style:nan", 1.0): "the weight of style must be a number",
        ("style:2, detail", 2.0): "times lora_scale must be between -3 and 3, not 4",
        ("style, style:0.2", 1.0): "named twice",
        ("style", float("inf")): "lora_scale must be a number",
    }
    for (text, scale), message in refusals.items():
        with pytest.raises(ValueError) as error:
            parse_lora_selection(text, scale, loaded=loaded)
        assert message in str(error.value), text
    many = [_entry(f"l{index}") for index in range(settings.MAX_ACTIVE_LORAS + 1)]
    with pytest.raises(ValueError, match=f"use at most {settings.MAX_ACTIVE_LORAS} at once"):
        parse_lora_selection(",".join(entry.name for entry in many), loaded=many)
    with pytest.raises(ValueError, match="No LoRA is loaded"):
        parse_lora_selection("style", loaded=[])


def test_prompt_with_triggers_adds_only_missing_words():
    style = _entry("style", triggers=("Linear red light", "neon"))
    other = _entry("other", triggers=("NEON", "ink"))
    assert prompt_with_triggers("a cat under linear RED light", [style, other]) == (
        "a cat under linear RED light, neon, ink",
        ["neon", "ink"],
    )
    assert prompt_with_triggers("neonlights", [style]) == (
        "neonlights, Linear red light, neon",
        ["Linear red light", "neon"],
    )
    assert prompt_with_triggers("a cat", [(style, 0.0)]) == ("a cat", [])


def test_hashes_follow_a1111_and_civitai(pipeline, library, lora_dir):
    loaded = load(library, pipeline, lora_dir, STYLE)
    data = (lora_dir / STYLE).read_bytes()
    (header_length,) = struct.unpack("<Q", data[:8])
    assert loaded.sha256 == hashlib.sha256(data).hexdigest()
    assert loaded.a1111_hash == hashlib.sha256(data[8 + header_length :]).hexdigest()[:12]
    library.apply(pipeline, [(loaded.name, 0.5)])
    rows = library.list()
    assert len(rows) == 1 and len(rows[0]) == len(LIST_HEADERS)
    assert rows[0][:2] == [loaded.name, 0.5] and rows[0][4] == 16
    assert loaded.png_entry(0.5) == {
        "name": loaded.name,
        "weight": 0.5,
        "hash": loaded.a1111_hash,
        "sha256": loaded.sha256,
        "source": loaded.source,
    }


def test_real_sized_models_are_named_in_mismatch_messages():
    from pipelines.architectures import build_on_meta

    large, medium = build_on_meta("sd35-large", "transformer"), build_on_meta("sd35-medium", "transformer")

    def lora(width: int, module: str = "transformer_blocks.0.attn.to_q"):
        return convert_to_diffusers(
            {
                f"transformer.{module}.lora_A.weight": torch.ones(2, width),
                f"transformer.{module}.lora_B.weight": torch.ones(width, 2),
            }
        )

    with pytest.raises(ValueError) as error:
        check_lora_fits(large, lora(1536), model_title="Stable Diffusion 3.5 Large", label="This LoRA")
    assert str(error.value) == (
        "This LoRA was made for a 1536-wide, 24-block MMDiT (SD3.5 Medium); the loaded model is Stable Diffusion 3.5 "
        "Large (2432 wide, 38 blocks). Choose SD3.5 Medium, or a LoRA made for Stable Diffusion 3.5 Large."
    )
    with pytest.raises(ValueError, match=r"made for a 2432-wide, 38-block MMDiT \(SD3.5 Large / Large Turbo\)"):
        check_lora_fits(medium, lora(2432), model_title="Stable Diffusion 3.5 Medium")
    with pytest.raises(ValueError, match="dual-attention \\(attn2\\) layers in block 3.*with no dual attention"):
        check_lora_fits(large, lora(2432, "transformer_blocks.3.attn2.to_q"), model_title="Stable Diffusion 3.5 Large")
    check_lora_fits(medium, lora(1536, "transformer_blocks.23.attn.to_k"), model_title="SD3.5 Medium")  # it fits


def test_only_sd3_models_take_loras():
    with pytest.raises(ValueError, match="'blip-caption' is not one"):
        LoraLibrary("blip-caption")


# ----------------------------------------------------------------------------- ownership (pipelines.ownership)


def upload_variant(lora_dir, tmp_path, index: int):
    """An upload source: the tiny style LoRA with its factors scaled, so each index is a different file."""
    tensors = {key: value * (1 + index / 10) for key, value in load_file(str(lora_dir / STYLE)).items()}
    path = tmp_path / f"upload-{index}.safetensors"
    save_file(tensors, str(path))
    return resolve_lora_source(upload=path)


def test_an_upload_is_its_visitors_alone_and_shared_loras_are_everyones(pipeline, library, lora_dir, tmp_path):
    shared = load(library, pipeline, lora_dir, KOHYA, visitor="bob")  # a folder file: shared, whoever loaded it
    alices = library.load(pipeline, upload_variant(lora_dir, tmp_path, 1), visitor="alice")
    assert (shared.owner, alices.owner) == (None, "alice")
    assert library.names("alice") == [shared.name, alices.name] and library.names("bob") == [shared.name]
    assert [row[0] for row in library.list("bob")] == [shared.name] and len(library.list()) == 2
    for use in (
        lambda: library.parse_selection(alices.name, visitor="bob"),
        lambda: library.get(alices.name, "bob"),
        lambda: library.apply(pipeline, [(alices.name, 1.0)], visitor="bob"),
        lambda: library.unload(pipeline, alices.name, visitor="bob"),
    ):
        with pytest.raises(ValueError, match=f"No LoRA named '{alices.name}' is loaded; loaded: {shared.name}"):
            use()
    # The same file uploaded by bob is bob's own entry, not a handle on alice's; its name is the one bob
    # asked for (alice's use of it is not revealed), its adapter another.
    bobs = library.load(pipeline, upload_variant(lora_dir, tmp_path, 1), visitor="bob")
    assert bobs.name == alices.name and bobs.owner == "bob" and bobs.sha256 == alices.sha256
    assert bobs.adapter != alices.adapter and library.names("bob") == [shared.name, bobs.name]
    assert library.get(bobs.name, "bob") is bobs and library.get(alices.name, "alice") is alices
    library.apply(pipeline, [(alices.name, 1.0)], visitor="alice")
    assert library.selection == [(alices.adapter, 1.0)]


def test_unloading_everything_takes_only_what_the_visitor_may_unload(pipeline, library, lora_dir, tmp_path):
    shared = load(library, pipeline, lora_dir, KOHYA)
    alices = library.load(pipeline, upload_variant(lora_dir, tmp_path, 1), visitor="alice")
    bobs = library.load(pipeline, upload_variant(lora_dir, tmp_path, 2), visitor="bob")
    library.apply(pipeline, [(shared.name, 1.0), (alices.name, 0.5)], visitor="alice")
    # Public mode: shared LoRAs are read-only for visitors, by name or in "unload all".
    with pytest.raises(ValueError, match="shared by every visitor of this public instance; only the operator"):
        library.unload(pipeline, shared.name, visitor="bob", shared=False)
    assert library.unload(pipeline, visitor="bob", shared=False) == [bobs.name]
    assert library.names() == [shared.name, alices.name]
    # Locally a visitor may unload shared LoRAs too, but never another visitor's upload.
    assert library.unload(pipeline, visitor="carol") == [shared.name]
    assert library.names() == [alices.name] and library.selection == [(alices.name, 0.5)]
    assert count_adapter_modules(pipeline.transformer, shared.name) == 0


def test_uploads_are_capped_per_visitor_and_the_least_recently_used_makes_room(
    pipeline, library, lora_dir, tmp_path, monkeypatch, base_image
):
    monkeypatch.setattr(settings, "MAX_UPLOADS_PER_SESSION", 2)
    monkeypatch.setattr(settings, "MAX_LOADED_LORAS", 4)
    shared = load(library, pipeline, lora_dir, KOHYA)
    a1 = library.load(pipeline, upload_variant(lora_dir, tmp_path, 1), visitor="alice")
    a2 = library.load(pipeline, upload_variant(lora_dir, tmp_path, 2), visitor="alice")
    with pytest.raises(ValueError, match=r"You have 2 uploaded LoRAs loaded on .*unload one of them first"):
        library.load(pipeline, upload_variant(lora_dir, tmp_path, 3), visitor="alice")
    b1 = library.load(pipeline, upload_variant(lora_dir, tmp_path, 4), visitor="bob")  # the 4th slot
    library.apply(pipeline, [(a1.name, 1.0)], visitor="alice")  # a1 used last: a2 is now the oldest upload
    c1 = library.load(pipeline, upload_variant(lora_dir, tmp_path, 5), visitor="carol")
    assert library.names() == [shared.name, a1.name, b1.name, c1.name]
    assert count_adapter_modules(pipeline.transformer, a2.name) == 0  # really detached from the model
    with pytest.raises(ValueError, match=f"No LoRA named '{a2.name}' is loaded"):
        library.parse_selection(a2.name, visitor="alice")
    # Slots full of shared LoRAs are never emptied for an upload.
    library.unload(pipeline)
    monkeypatch.setattr(settings, "MAX_LOADED_LORAS", 1)
    load(library, pipeline, lora_dir, KOHYA)
    with pytest.raises(ValueError, match="none is a visitor's own or a shared one idle long enough to make room"):
        library.load(pipeline, upload_variant(lora_dir, tmp_path, 6), visitor="alice")
    library.unload(pipeline)
    assert torch.equal(draw(pipeline), base_image)


def test_the_lora_folder_lists_trained_runs_in_subfolders_but_not_hidden_folders(tiny_root, tmp_path):
    folder = tmp_path / "loras"
    (folder / "ux-sks").mkdir(parents=True)
    (folder / ".runs" / "abc-sd3-ux-sks" / "checkpoint").mkdir(parents=True)
    shutil.copy(tiny_lora_dir(tiny_root) / STYLE, folder / STYLE)
    shutil.copy(tiny_lora_dir(tiny_root) / STYLE, folder / "ux-sks" / "pytorch_lora_weights.safetensors")
    shutil.copy(tiny_lora_dir(tiny_root) / STYLE, folder / ".runs" / "abc-sd3-ux-sks" / "checkpoint" / "x.safetensors")
    listed = list_lora_files(folder)
    assert listed == [STYLE, "ux-sks/pytorch_lora_weights.safetensors"]
    for name in listed:  # everything listed loads by that name
        assert resolve_lora_source(file=name, lora_dir=folder).path.is_file()
