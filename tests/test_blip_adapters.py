"""BLIP LoRA adapters on the tiny BLIP: load, switch, refuse, export, and the API."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from gradio_client import handle_file
from PIL import Image

from pipelines import settings
from pipelines.blip import caption_folder
from pipelines.blip.adapter_files import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE
from pipelines.blip.adapters import BlipAdapterSet
from pipelines.blip.attention import cross_attention_maps
from pipelines.blip.batch_caption import MANIFEST_FILE, caption_files, captions_csv, dataset_zip
from pipelines.blip.captioner import CaptionRequest
from pipelines.blip.feature_cache import model_identity
from pipelines.blip.matching import ImageTextMatcher, MatchRequest
from pipelines.blip.tiny_adapter import TINY_DEMO_ADAPTER
from pipelines.loaders import load_blip_captioner
from pipelines.runtime import choose_runtime

EXAMPLES = Path(__file__).resolve().parent.parent / "assets" / "examples"
PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg"]
GREEDY = CaptionRequest(strategy="greedy")


def fresh_captioner(tiny_root):
    """A captioner of its own: adapters attached here never reach the session's shared tiny_captioner."""
    return load_blip_captioner(str(tiny_root / "blip-caption"), choose_runtime("cpu"))


def fresh_model(tiny_root):
    from transformers import BlipForConditionalGeneration

    return BlipForConditionalGeneration.from_pretrained(str(tiny_root / "blip-caption"), attn_implementation="eager")


def save_random_adapter(model, out_dir: Path, *, target_modules=None, seed: int = 0, scale: float = 4.0) -> Path:
    """Wrap ``model`` (a BlipForConditionalGeneration, or its text_decoder) with peft and save random LoRA weights.

    This is how people make BLIP LoRAs (get_peft_model + save_pretrained), so the
    files are exactly what peft writes. ``model`` is changed in place.
    """
    from peft import LoraConfig, get_peft_model

    targets = target_modules or ["query", "key", "value", "dense"]
    wrapped = get_peft_model(model, LoraConfig(r=4, lora_alpha=4, target_modules=targets, lora_dropout=0.0))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in wrapped.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * (scale / parameter.shape[1]) ** 0.5)
    wrapped.save_pretrained(out_dir)
    return Path(out_dir)


def texts(results) -> list[str]:
    return [result.captions[0].text for result in results]


def scored(results) -> list[tuple[str, float]]:
    return [(caption.text, caption.score) for result in results for caption in result.captions]


@pytest.fixture(scope="module")
def images():
    return [Image.open(EXAMPLES / name).convert("RGB") for name in PHOTOS]


@pytest.fixture(scope="module")
def adapter_dir(tiny_root, tmp_path_factory):
    """An adapters folder: the tiny demo (built on first use), a second random adapter, a decoder-only one."""
    folder = tmp_path_factory.mktemp("adapters")
    save_random_adapter(fresh_model(tiny_root), folder / "second", seed=7)
    save_random_adapter(fresh_model(tiny_root).text_decoder, folder / "decoder-only", target_modules=["query", "value"], seed=3)  # fmt: skip
    return folder


@pytest.fixture(scope="module")
def loaded(tiny_root, adapter_dir, images):
    """A captioner with the base captions taken first, then tiny-demo and second loaded through one set."""
    captioner = fresh_captioner(tiny_root)
    base = captioner.caption_batch(images)
    base_greedy = captioner.caption_batch(images, GREEDY)
    adapters = BlipAdapterSet(adapter_dir, tiny_blip_source=tiny_root / "blip-caption")
    demo = adapters.load(captioner, TINY_DEMO_ADAPTER)
    second = adapters.load(captioner, "second")
    return captioner, adapters, base, base_greedy, demo, second


def test_an_adapter_changes_captions_and_the_base_comes_back_exactly(loaded, images):
    captioner, _, base, base_greedy, demo, _ = loaded
    assert demo.name == TINY_DEMO_ADAPTER and demo.rank == 4 and demo.kind == "folder"
    assert demo.lora_layers == 16  # 2 layers x (self + cross) x (query, key, value, output dense)
    with_adapter = captioner.caption_batch(images, adapter=TINY_DEMO_ADAPTER)
    assert all(result.adapter == TINY_DEMO_ADAPTER for result in with_adapter)
    changed = [a != b for a, b in zip(texts(with_adapter), texts(base), strict=True)]
    assert sum(changed) >= 3, (texts(with_adapter), texts(base))
    again = captioner.caption_batch(images)
    assert scored(again) == scored(base)  # texts and scores, bit for bit
    assert all(result.adapter is None for result in again)
    assert scored(captioner.caption_batch(images, GREEDY)) == scored(base_greedy)


def test_two_adapters_switch_per_request(loaded, images):
    captioner, adapters, base, _, _, second = loaded
    assert captioner.adapter_names() == sorted([TINY_DEMO_ADAPTER, "second"]) == sorted(adapters.names())
    first = captioner.caption_batch(images, adapter=TINY_DEMO_ADAPTER)
    other = captioner.caption_batch(images, adapter=second.name)
    assert texts(first) != texts(other) and texts(other) != texts(base)
    assert scored(captioner.caption_batch(images, adapter=TINY_DEMO_ADAPTER)) == scored(first)
    assert scored(captioner.caption_batch(images)) == scored(base)


def test_loading_the_same_folder_again_returns_the_loaded_adapter(loaded):
    captioner, adapters, _, _, demo, _ = loaded
    assert adapters.load(captioner, TINY_DEMO_ADAPTER) == demo
    assert captioner.adapter_names().count(TINY_DEMO_ADAPTER) == 1


def test_matching_and_attention_see_the_base_model_even_inside_an_adapter(loaded, tiny_root, images):
    captioner, *_ = loaded
    reference = fresh_captioner(tiny_root)  # never had an adapter
    request = MatchRequest(texts="a cat on a couch\na rocket launch\na cup of coffee")

    def match_scores(which):
        result = ImageTextMatcher(which).match(images[:2], request)
        return [(score.mean_logprob, score.total_logprob) for row in result.scores for score in row]

    expected = match_scores(reference)
    assert match_scores(captioner) == expected
    with captioner.using_adapter(TINY_DEMO_ADAPTER):  # even nested inside an adapter's block
        assert match_scores(captioner) == expected
        maps = cross_attention_maps(captioner, images[1], "a cat on a couch").maps
    np.testing.assert_array_equal(maps, cross_attention_maps(reference, images[1], "a cat on a couch").maps)

    # The same decoder pass with the adapter active does differ: the check above can fail.
    ids = torch.tensor([[captioner.bos_token_id, *captioner.text_ids("a cat on a couch")]])
    embeds = captioner.encode_images([images[1]])
    with torch.inference_mode(), captioner.using_adapter(TINY_DEMO_ADAPTER):
        adapted = captioner.model.text_decoder(input_ids=ids, encoder_hidden_states=embeds).logits
    with torch.inference_mode():
        plain = reference.model.text_decoder(input_ids=ids, encoder_hidden_states=embeds).logits
    assert (adapted - plain).abs().max() > 0.1


def test_cached_image_features_serve_every_adapter(loaded, images):
    captioner, *_ = loaded
    identity = model_identity(captioner.model, captioner.source)
    assert identity == (type(captioner.model).__name__, captioner.source, id(captioner.model), "torch.float32", "cpu")
    captioner.caption(images[0])  # stores the features (or finds them)
    hits, misses = captioner.feature_cache.hits, captioner.feature_cache.misses
    captioner.caption(images[0], adapter=TINY_DEMO_ADAPTER)
    captioner.caption(images[0], adapter="second")
    assert (captioner.feature_cache.hits, captioner.feature_cache.misses) == (hits + 2, misses)


def test_an_unknown_adapter_name_is_one_sentence(loaded, images):
    captioner, *_ = loaded
    with pytest.raises(ValueError, match="No BLIP adapter named 'nope' is loaded .*second"):
        captioner.caption(images[0], adapter="nope")


def test_a_decoder_only_adapter_loads_too(tiny_root, adapter_dir, images):
    captioner = fresh_captioner(tiny_root)
    base = texts(captioner.caption_batch(images))
    info = BlipAdapterSet(adapter_dir).load(captioner, "decoder-only")
    assert info.lora_layers == 8  # query and value, self and cross, 2 layers
    assert texts(captioner.caption_batch(images, adapter=info.name)) != base
    assert texts(captioner.caption_batch(images)) == base


def test_adapters_come_back_after_blip_is_loaded_again(loaded, tiny_root, images):
    captioner, adapters, *_ = loaded
    reloaded = adapters.attached(fresh_captioner(tiny_root))
    assert reloaded.adapter_names() == captioner.adapter_names()
    assert scored(reloaded.caption_batch(images, adapter="second")) == scored(
        captioner.caption_batch(images, adapter="second")
    )


def test_remove_takes_an_adapter_out(tiny_root, adapter_dir, images):
    captioner = fresh_captioner(tiny_root)
    adapters = BlipAdapterSet(adapter_dir)
    base = scored(captioner.caption_batch(images))
    adapters.load(captioner, "second")
    adapters.remove(captioner, "second")
    assert adapters.names() == [] and captioner.adapter_names() == []
    assert scored(captioner.caption_batch(images)) == base
    with pytest.raises(ValueError, match="none is loaded yet"):
        captioner.caption(images[0], adapter="second")


# ----------------------------------------------------------------------------- uploads


def zip_folder(folder: Path, archive: Path, inner: str = "my-lora") -> Path:
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zipped:
        for path in folder.iterdir():
            zipped.write(path, f"{inner}/{path.name}")
    return archive


def test_uploads_as_two_files_or_a_zip(tiny_root, adapter_dir, images, tmp_path):
    captioner = fresh_captioner(tiny_root)
    adapters = BlipAdapterSet(adapter_dir, work_dir=tmp_path / "work")
    folder = adapter_dir / "second"
    from_files = adapters.load(captioner, uploads=[folder / ADAPTER_CONFIG_FILE, folder / ADAPTER_WEIGHTS_FILE])
    from_zip = adapters.load(captioner, uploads=[zip_folder(folder, tmp_path / "lora.zip")])
    assert (from_files.name, from_files.kind, from_zip.name) == ("upload", "upload", "my-lora")
    assert texts(captioner.caption_batch(images, adapter="upload")) == texts(
        captioner.caption_batch(images, adapter="my-lora")
    )


def two_files(adapter_dir: Path, name: str = "second") -> list[Path]:
    return [adapter_dir / name / ADAPTER_CONFIG_FILE, adapter_dir / name / ADAPTER_WEIGHTS_FILE]


def test_an_uploaded_adapter_is_its_visitors_alone(tiny_root, adapter_dir, images, tmp_path):
    captioner = fresh_captioner(tiny_root)
    adapters = BlipAdapterSet(adapter_dir, work_dir=tmp_path / "work")
    shared = adapters.load(captioner, "decoder-only", visitor="bob")  # a folder adapter: shared
    mine = adapters.load(captioner, uploads=two_files(adapter_dir), visitor="alice")
    assert (shared.owner, mine.owner) == (None, "alice")
    assert adapters.names("alice") == ["decoder-only", "upload"] and adapters.names("bob") == ["decoder-only"]
    assert [entry["name"] for entry in adapters.describe("bob")["loaded"]] == ["decoder-only"]
    assert adapters.describe("alice")["loaded"][1]["shared"] is False
    assert adapters.use("upload", "alice") == "upload" and adapters.use("", "bob") is None
    with pytest.raises(ValueError, match=r"No BLIP adapter named 'upload' is loaded \(the loaded ones are: decoder"):
        adapters.use("upload", "bob")
    with pytest.raises(ValueError, match="No BLIP adapter named 'upload' is loaded"):
        adapters.remove(captioner, "upload", visitor="bob")
    with pytest.raises(ValueError, match="shared by every visitor of this public instance"):
        adapters.remove(captioner, "decoder-only", visitor="alice", shared=False)
    adapters.remove(captioner, "upload", visitor="alice", shared=False)
    assert not mine.folder.exists()  # the unpacked upload goes with it
    assert captioner.adapter_names() == ["decoder-only"]


def test_an_uploaded_adapter_unpacks_with_its_visitors_files_under_the_work_root(tiny_root, adapter_dir, tmp_path):
    """Not in the system temp folder, unowned: in the visitor's session folder, so it goes when their files go
    (page closed, swept by age) and with the work root of a killed process at the next start."""
    import tempfile

    from pipelines import workspace

    before = {path.name for path in Path(tempfile.gettempdir()).glob("studio-blip-adapters-*")}
    captioner = fresh_captioner(tiny_root)
    adapters = BlipAdapterSet(adapter_dir)  # no work_dir: the app's way
    kept = adapters.load(captioner, uploads=two_files(adapter_dir), name="kept", visitor="alice-uploads")
    removed = adapters.load(captioner, uploads=two_files(adapter_dir), name="removed", visitor="alice-uploads")
    session = workspace.session_folder("alice-uploads")
    assert kept.folder.is_relative_to(session) and removed.folder.is_relative_to(session)
    assert session.is_relative_to(workspace.work_root())
    assert {path.name for path in Path(tempfile.gettempdir()).glob("studio-blip-adapters-*")} == before
    adapters.remove(captioner, "removed", visitor="alice-uploads", shared=False)
    assert not removed.folder.exists() and kept.folder.is_dir()
    workspace.forget_session("alice-uploads")  # the page closed
    assert not kept.folder.exists()


def test_adapter_uploads_are_capped_per_visitor_and_the_least_recently_used_makes_room(
    tiny_root, adapter_dir, images, tmp_path, monkeypatch
):
    monkeypatch.setattr(settings, "MAX_UPLOADS_PER_SESSION", 1)
    monkeypatch.setattr(settings, "MAX_BLIP_ADAPTERS", 3)
    captioner = fresh_captioner(tiny_root)
    adapters = BlipAdapterSet(adapter_dir, work_dir=tmp_path / "work")
    adapters.load(captioner, "second")  # shared: never evicted
    alices = adapters.load(captioner, uploads=two_files(adapter_dir), name="alices", visitor="alice")
    with pytest.raises(ValueError, match=r"You have 1 uploaded BLIP adapters loaded \(alices\)"):
        adapters.load(captioner, uploads=two_files(adapter_dir), visitor="alice")
    assert len(list((tmp_path / "work").iterdir())) == 1  # the refused upload was never unpacked
    bobs = adapters.load(captioner, uploads=two_files(adapter_dir), name="bobs", visitor="bob")
    adapters.use("alices", "alice")  # alice captioned just now: bob's upload is the oldest
    adapters.load(captioner, uploads=two_files(adapter_dir), name="carols", visitor="carol")
    assert adapters.names() == ["second", "alices", "carols"] and not bobs.folder.exists()
    assert sorted(captioner.adapter_names()) == ["alices", "carols", "second"]
    with pytest.raises(ValueError, match="No BLIP adapter named 'bobs' is loaded"):
        adapters.use("bobs", "bob")
    assert alices.folder.exists()


# ----------------------------------------------------------------------------- refusals


def make_broken(kind: str, tiny_root: Path, adapter_dir: Path, base: Path) -> Path:
    """An adapters-folder entry (or an upload) that must be refused."""
    folder = base / kind
    if kind == "pickled":
        folder.mkdir()
        shutil.copy(adapter_dir / "second" / ADAPTER_CONFIG_FILE, folder)
        (folder / "adapter_model.bin").write_bytes(b"\x80\x04 pickle")
    elif kind == "vision":
        save_random_adapter(fresh_model(tiny_root), folder, target_modules=["qkv", "query"])
    elif kind == "wider":
        # A BLIP whose image features are wider (as BLIP large's 1024 against base's 768).
        from transformers import BlipForConditionalGeneration

        config = fresh_model(tiny_root).config
        config.vision_config.hidden_size = 48
        config.text_config.encoder_hidden_size = 48
        save_random_adapter(BlipForConditionalGeneration(config), folder, target_modules=["key", "value"])
    elif kind in ("rank", "zero", "ia3"):
        shutil.copytree(adapter_dir / "second", folder)
        config = json.loads((folder / ADAPTER_CONFIG_FILE).read_text())
        if kind == "rank":
            config["r"] = 8
        if kind == "ia3":
            config["peft_type"] = "IA3"
        (folder / ADAPTER_CONFIG_FILE).write_text(json.dumps(config))
        if kind == "zero":
            from safetensors.torch import load_file, save_file

            weights = load_file(folder / ADAPTER_WEIGHTS_FILE)
            save_file({key: torch.zeros_like(value) for key, value in weights.items()}, folder / ADAPTER_WEIGHTS_FILE)
    elif kind == "kohya":
        from safetensors.torch import save_file

        shutil.copytree(adapter_dir / "second", folder)
        save_file({"lora_unet_text_decoder_query.lora_down.weight": torch.ones(4, 32)}, folder / ADAPTER_WEIGHTS_FILE)
    return folder


@pytest.mark.parametrize(
    ("kind", "words"),
    [
        ("pickled", "pickles, which can run code"),
        ("vision", "changes the vision encoder"),
        ("wider", "expects 48 input .* has 32 .* image features 32"),
        ("rank", "rank 4 .* gives that layer rank 8"),
        ("zero", "changes nothing"),
        ("ia3", "only LoRA adapters"),
        ("kohya", "not a peft LoRA matrix"),
    ],
)
def test_bad_adapters_are_refused_and_leave_the_model_as_it_was(tiny_root, adapter_dir, images, tmp_path, kind, words):
    captioner = fresh_captioner(tiny_root)
    base = scored(captioner.caption_batch(images[:2]))
    broken = make_broken(kind, tiny_root, adapter_dir, tmp_path)
    with pytest.raises(ValueError, match=words):
        BlipAdapterSet(tmp_path).load(captioner, broken.name)
    assert captioner.adapter_names() == []
    assert scored(captioner.caption_batch(images[:2])) == base


@pytest.mark.parametrize(
    ("source", "words"),
    [
        ("../second", "may not contain '..'"),
        ("/etc", "not a path"),
        ("~/adapters/x", "not a path"),
        ("escape", "leads outside .* symbolic link"),
        ("no-such-folder", "no adapter folder 'no-such-folder'"),
        ("someone/blip-caption-lora", "not in the local Hugging Face cache .* HF_HUB_OFFLINE"),
    ],
)
def test_sources_outside_the_folder_and_offline_hub_ids_are_refused(tiny_root, adapter_dir, tmp_path, source, words):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    folder = tmp_path / "adapters"
    folder.mkdir()
    (folder / "escape").symlink_to(adapter_dir / "second", target_is_directory=True)
    with pytest.raises(ValueError, match=words):
        BlipAdapterSet(folder).load(fresh_captioner(tiny_root), source)


def test_bad_uploads_are_refused(tiny_root, adapter_dir, tmp_path):
    captioner = fresh_captioner(tiny_root)
    adapters = BlipAdapterSet(adapter_dir, work_dir=tmp_path / "work")
    pickled = tmp_path / "adapter_model.bin"
    pickled.write_bytes(b"\x80\x04")
    with pytest.raises(ValueError, match="pickles"):
        adapters.load(captioner, uploads=[adapter_dir / "second" / ADAPTER_CONFIG_FILE, pickled])
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zipped:
        zipped.write(adapter_dir / "second" / ADAPTER_CONFIG_FILE, f"a/{ADAPTER_CONFIG_FILE}")
        zipped.writestr(f"a/{ADAPTER_WEIGHTS_FILE}", b"\0" * 5_000_000)
    with pytest.raises(ValueError, match="zip bomb"):
        adapters.load(captioner, uploads=[bomb])
    two = zip_folder(adapter_dir / "second", tmp_path / "two.zip")
    with zipfile.ZipFile(two, "a") as zipped:
        zipped.write(adapter_dir / "second" / ADAPTER_CONFIG_FILE, f"other/{ADAPTER_CONFIG_FILE}")
    with pytest.raises(ValueError, match="2 config"):
        adapters.load(captioner, uploads=[two])
    assert captioner.adapter_names() == []


# ----------------------------------------------------------------------------- exports


def test_batch_exports_record_the_adapter(loaded, tmp_path):
    captioner, *_ = loaded
    root = tmp_path / "photos"
    root.mkdir()
    for name in PHOTOS[:3]:
        shutil.copy(EXAMPLES / name, root / name)
    files = sorted(root.iterdir())
    results = [item for batch in caption_files(captioner, files, root, GREEDY, num_workers=0, adapter="second") for item in batch]  # fmt: skip
    base = [item for batch in caption_files(captioner, files, root, GREEDY, num_workers=0) for item in batch]
    assert [item.adapter for item in results] == ["second"] * 3 and [item.adapter for item in base] == [None] * 3
    assert [item.text for item in results] != [item.text for item in base]
    rows = list(csv.DictReader(io.StringIO(captions_csv(results + base[:1]))))
    assert [row["adapter"] for row in rows] == ["second", "", "second", "second"]
    archive = dataset_zip(results, tmp_path / "out.zip", manifest={"adapter": "second"})
    with zipfile.ZipFile(archive.path) as zipped:
        assert json.loads(zipped.read(MANIFEST_FILE)) == {"adapter": "second"}


def test_caption_folder_records_the_adapter_and_resumes_only_with_it(tiny_root, adapter_dir, images, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in PHOTOS:
        shutil.copy(EXAMPLES / name, folder / name)

    def run(*extra):
        arguments = [str(folder), "--tiny", "--tiny-dir", str(tiny_root), "--device", "cpu", "--workers", "0"]
        return caption_folder.run(caption_folder.parse_args([*arguments, "--strategy", "greedy", *extra]))

    assert run("--adapter", str(adapter_dir / "second"), "--limit", "2") == 0
    manifest = json.loads((folder / caption_folder.MANIFEST_FILE).read_text())
    assert manifest["adapter"] == "second" and manifest["adapter_source"] == str((adapter_dir / "second").resolve())
    with pytest.raises(ValueError, match="captioned with .*second, this run uses the base model"):
        run()
    assert run("--adapter", str(adapter_dir / "second")) == 0
    assert "2 captioned, 2 already had captions" in capsys.readouterr().out
    written = {json.loads(line)["file_name"]: json.loads(line)["text"] for line in (folder / "metadata.jsonl").open()}
    captioner = fresh_captioner(tiny_root)
    BlipAdapterSet(adapter_dir).load(captioner, "second")
    expected = texts(captioner.caption_batch(images, GREEDY, adapter="second"))
    assert [written[name] for name in PHOTOS] == expected


# ----------------------------------------------------------------------------- the API


@pytest.mark.api
def test_api_lists_loads_and_captions_with_an_adapter(tiny_client):
    listing = tiny_client.predict(api_name="/blip_adapter_list")
    assert TINY_DEMO_ADAPTER in listing["available"] and listing["adapter_dir"].endswith("blip-adapters")
    photo = handle_file(str(EXAMPLES / "chelsea.png"))
    base_table, _, base_details = tiny_client.predict(photo, strategy="greedy", api_name="/caption")
    chosen, status, after = tiny_client.predict(TINY_DEMO_ADAPTER, api_name="/blip_adapter_load")
    assert chosen == TINY_DEMO_ADAPTER and "Loaded **tiny-demo**" in status
    assert TINY_DEMO_ADAPTER in [entry["name"] for entry in after["loaded"]]
    table, summary, details = tiny_client.predict(
        photo, strategy="greedy", adapter=TINY_DEMO_ADAPTER, api_name="/caption"
    )
    assert details["adapter"] == TINY_DEMO_ADAPTER and table["data"][0][4] == TINY_DEMO_ADAPTER
    assert "adapter tiny-demo" in summary
    assert table["data"][0][1] != base_table["data"][0][1]
    again, _, again_details = tiny_client.predict(photo, strategy="greedy", api_name="/caption")
    assert again["data"] == base_table["data"] and again["data"][0][4] == "base model"
    assert again_details["captions"] == base_details["captions"] and again_details["adapter"] is None


@pytest.mark.api
def test_api_refuses_paths_and_unknown_adapters_with_a_sentence(tiny_client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="may not contain '..'"):
        tiny_client.predict("../blip-caption", api_name="/blip_adapter_load")
    with pytest.raises(AppError, match="No BLIP adapter named 'missing'"):
        tiny_client.predict(handle_file(str(EXAMPLES / "chelsea.png")), adapter="missing", api_name="/caption")


@pytest.mark.api
def test_api_uploads_a_zip_and_batch_captions_with_it(tiny_client, adapter_dir, tmp_path):
    archive = zip_folder(adapter_dir / "second", tmp_path / "upload.zip", inner="zipped-lora")
    chosen, _, _ = tiny_client.predict("", [handle_file(str(archive))], api_name="/blip_adapter_load")
    assert chosen == "zipped-lora"
    uploads = [handle_file(str(EXAMPLES / name)) for name in ("chelsea.png", "coffee.png")]
    _, zipped_path, summary = tiny_client.predict(uploads, adapter="zipped-lora", api_name="/caption_batch")
    assert "with the adapter zipped-lora" in summary
    with zipfile.ZipFile(zipped_path) as zipped:
        rows = list(csv.DictReader(io.StringIO(zipped.read("captions.csv").decode())))
        manifest = json.loads(zipped.read(MANIFEST_FILE))
    assert [row["adapter"] for row in rows] == ["zipped-lora", "zipped-lora"]
    assert manifest["adapter"] == "zipped-lora" and manifest["adapter_source"] == "upload.zip"
