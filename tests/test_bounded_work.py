"""Bounded work (issue 15): /evaluate's images per call, attention exports' tokens and bytes, Hub files'
sizes before any download, the operator's token kept for the operator's repos, and --tiny offline.

The Hub is replaced by fakes here (no network): each fake records what was asked and with which token,
and a download after a refusal fails the test.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from pipelines import settings
from pipelines.blip import attention
from pipelines.blip.attention import (
    AttentionRequest,
    check_export_size,
    explain_attention,
    export_maps,
    export_size_bytes,
)
from pipelines.roundtrip import loop as roundtrip

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "assets" / "examples" / "coffee.png"
MB = 1024 * 1024


# ----------------------------------------------------------------------------- /evaluate


def test_an_evaluation_past_the_image_cap_is_refused_before_anything_is_drawn(tiny_manager, tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(roundtrip, "prompt_round_trip", lambda *args, **kwargs: drawn.append(args))
    prompts = roundtrip.load_prompts()  # the 30 built-in prompts
    out = tmp_path / "eval.json"
    with pytest.raises(ValueError, match=r"3 model\(s\) x 10 seed\(s\) x 30 prompts is 900 images; .* at most 60\."):
        roundtrip.run_evaluation(
            tiny_manager,
            None,
            prompts,
            models=["large", "large-turbo", "medium"],
            seeds=list(range(10)),
            out_path=out,
            max_images=60,
        )
    assert drawn == [] and not out.exists()
    assert roundtrip.check_evaluation_size(["large", "medium"], [0], prompts, 60) == 60  # the cap itself is allowed


def test_the_default_cap_and_results_folder(monkeypatch):
    assert settings.MAX_EVALUATION_IMAGES == 60
    environment = {key: value for key, value in os.environ.items() if key != "STUDIO_RESULTS_DIR"}
    code = "from pipelines import settings; print(settings.EVALUATION_RESULTS_DIR)"
    printed = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=environment, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert not Path(printed).resolve().is_relative_to(ROOT), printed  # never bench/results in the repository


@pytest.mark.api
def test_evaluate_api_refuses_900_images_at_once_and_writes_nothing(tiny_client):
    from gradio_client.exceptions import AppError

    before = sorted(settings.BENCH_RESULTS_DIR.glob("*"))
    started = time.monotonic()
    with pytest.raises(AppError, match="is 900 images; one evaluation run draws at most 60"):
        tiny_client.predict(
            models=["large", "large-turbo", "medium"], seeds=",".join(map(str, range(10))), api_name="/evaluate"
        )
    assert time.monotonic() - started < 15
    assert sorted(settings.BENCH_RESULTS_DIR.glob("*")) == before


# ----------------------------------------------------------------------------- attention exports


@pytest.fixture(scope="module")
def cup():
    return Image.open(EXAMPLE).convert("RGB")


def test_export_sizes_are_upper_bounds_known_before_writing(tiny_captioner, cup, tmp_path):
    result, exported = explain_attention(tiny_captioner, cup, AttentionRequest(caption="a cup of hot coffee"), None)
    shape = result.maps.maps.shape
    npy, json_file = export_maps(result.maps, tmp_path / "n", "npy"), export_maps(result.maps, tmp_path / "j", "json")
    assert exported is None
    assert export_size_bytes(shape, "npy") - 128 <= npy.stat().st_size <= export_size_bytes(shape, "npy")
    assert json_file.stat().st_size <= export_size_bytes(shape, "json")


def test_real_blip_exports_are_capped():
    base = (12, 12, 500, 577)  # BLIP base's decoder: layers, heads; a 500-token caption; 1 + 24² keys
    assert export_size_bytes(base, "npy") == pytest.approx(166.2e6, rel=0.01)  # the 167 MB of the review
    with pytest.raises(ValueError, match=r"would take 158.5 MB as .npy, over the 64 MB export limit; shorten"):
        check_export_size(base, "npy")
    longest = (12, 12, settings.MAX_ATTENTION_TOKENS, 577)  # what the token cap lets through still exports
    assert check_export_size(longest, "npy") < 26 * MB and check_export_size(longest, "json") < 64 * MB


def test_too_many_word_pieces_are_refused_before_the_decoder_runs(tiny_captioner, cup, monkeypatch, tmp_path):
    passes = []
    monkeypatch.setattr(attention, "cross_attention_maps", lambda *args: passes.append(args))
    monkeypatch.setattr(settings, "MAX_ATTENTION_TOKENS", 3)
    with pytest.raises(ValueError, match="The caption is 5 word pieces long; attention maps are made for at most 3"):
        explain_attention(tiny_captioner, cup, AttentionRequest(caption="a cup of hot coffee"), tmp_path / "out")
    assert passes == [] and not (tmp_path / "out").exists()


def test_an_export_over_the_byte_cap_is_refused_before_anything_is_written(tiny_captioner, cup, monkeypatch, tmp_path):
    passes = []
    real = attention.cross_attention_maps
    monkeypatch.setattr(attention, "cross_attention_maps", lambda *args: passes.append(1) or real(*args))
    monkeypatch.setattr(settings, "MAX_ATTENTION_EXPORT_BYTES", 1000)
    request = AttentionRequest(caption="a cup of hot coffee", export_format="json")
    with pytest.raises(ValueError, match=r"as .json, over the 0 MB export limit; shorten the caption or export .npy"):
        explain_attention(tiny_captioner, cup, request, tmp_path / "out")
    assert passes == [] and not (tmp_path / "out").exists()
    result, exported = explain_attention(tiny_captioner, cup, request, None)  # the pictures alone are fine
    assert exported is None and len(result.words) == 5
    with pytest.raises(ValueError, match="export limit"):
        export_maps(result.maps, tmp_path / "direct", "npy")
    assert not (tmp_path / "direct").exists()


# ----------------------------------------------------------------------------- Hub downloads


class FakeHub:
    """Stands in for HfApi, hf_hub_download and snapshot_download; records every call and its token."""

    def __init__(self, sizes: dict[str, int], folder: Path) -> None:
        self.sizes, self.folder, self.calls = sizes, folder, []

    def install(self, monkeypatch) -> FakeHub:
        import huggingface_hub
        from huggingface_hub import constants

        hub = self

        class Api:
            def get_paths_info(self, repo_id, paths, *, token=None, **kwargs):
                hub.calls.append(("get_paths_info", repo_id, token))
                return [SimpleNamespace(path=path, size=hub.sizes[path]) for path in paths if path in hub.sizes]

            def model_info(self, repo_id, *, files_metadata=False, token=None, **kwargs):
                hub.calls.append(("model_info", repo_id, token))
                assert files_metadata, "sizes need files_metadata=True"
                siblings = [SimpleNamespace(rfilename=name, size=size) for name, size in hub.sizes.items()]
                return SimpleNamespace(siblings=siblings)

        def hf_hub_download(repo_id, filename, *, local_files_only=False, token=None, **kwargs):
            if local_files_only:
                from huggingface_hub.errors import LocalEntryNotFoundError

                raise LocalEntryNotFoundError("not cached")
            hub.calls.append(("download", repo_id, token))
            return str(hub.folder / filename)

        def snapshot_download(repo_id, *, token=None, **kwargs):
            hub.calls.append(("download", repo_id, token))
            return str(hub.folder)

        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(huggingface_hub, "HfApi", Api)
        monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
        monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
        monkeypatch.setenv("HF_TOKEN", "hf_operator_secret")
        return self

    def downloads(self) -> list:
        return [call for call in self.calls if call[0] == "download"]


@pytest.mark.parametrize("weight_name", ["big.safetensors", None], ids=["named-file", "single-file"])
def test_a_visitors_lora_over_the_limit_is_refused_before_download_without_the_token(
    weight_name, monkeypatch, tmp_path
):
    from pipelines.lora.sources import resolve_lora_source

    hub = FakeHub({"big.safetensors": 30 * MB}, tmp_path).install(monkeypatch)
    monkeypatch.setattr(settings, "MAX_LORA_BYTES", 1 * MB)
    with pytest.raises(ValueError, match=r"someone/big/big.safetensors is 30 MB, over the 1 MB limit for a LoRA"):
        resolve_lora_source(repo="someone/big", weight_name=weight_name, cache_dir=tmp_path)
    assert hub.downloads() == [] and hub.calls and all(token is False for _, _, token in hub.calls)


def test_a_visitors_lora_within_the_limit_is_downloaded_without_the_token(monkeypatch, tmp_path):
    from pipelines.lora.sources import _resolve_hub

    hub = FakeHub({"style.safetensors": 2 * MB}, tmp_path).install(monkeypatch)
    path, name = _resolve_hub("someone/style", "style.safetensors", tmp_path)
    assert path == tmp_path / "style.safetensors" and name == "style.safetensors"
    assert hub.downloads() == [("download", "someone/style", False)]
    assert all(token is False for _, _, token in hub.calls)
    from huggingface_hub.utils import build_hf_headers

    assert "authorization" not in {key.lower() for key in build_hf_headers(token=False)}  # HF_TOKEN is set


def test_the_registrys_repos_are_size_checked_and_fetched_without_the_token(monkeypatch, tmp_path):
    from pipelines.lora.sources import RegistryEntry, resolve_lora_source

    hub = FakeHub({"red.safetensors": 30 * MB}, tmp_path).install(monkeypatch)
    monkeypatch.setattr(settings, "MAX_LORA_BYTES", 1 * MB)
    entry = RegistryEntry(
        "red", "curated/red", None, "red.safetensors", (), 1.0, ("sd35-large",), "https://x", "MIT", tmp_path
    )
    with pytest.raises(ValueError, match="over the 1 MB limit"):
        resolve_lora_source(registry_name="red", registry={"red": entry}, cache_dir=tmp_path)
    assert hub.calls == [("get_paths_info", "curated/red", False)]  # HF_TOKEN is for the catalog's models only


def test_a_hub_adapter_over_the_limit_is_refused_before_download_without_the_token(monkeypatch, tmp_path):
    from pipelines.blip.adapter_sources import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, download_adapter

    hub = FakeHub({ADAPTER_CONFIG_FILE: 600, ADAPTER_WEIGHTS_FILE: 30 * MB}, tmp_path).install(monkeypatch)
    monkeypatch.setattr(settings, "MAX_BLIP_ADAPTER_BYTES", 1 * MB)
    with pytest.raises(ValueError, match=r"someone/adapter/adapter_model.safetensors is 30.0 MB, over the 1 MB"):
        download_adapter("someone/adapter")
    assert hub.calls == [("get_paths_info", "someone/adapter", False)]
    (tmp_path / ADAPTER_CONFIG_FILE).write_text("{}")
    (tmp_path / ADAPTER_WEIGHTS_FILE).write_bytes(b"weights")
    monkeypatch.setattr(settings, "MAX_BLIP_ADAPTER_BYTES", 64 * MB)
    assert download_adapter("someone/adapter") == tmp_path
    assert hub.downloads() == [("download", "someone/adapter", False)]


def test_a_hub_file_of_unknown_size_is_not_downloaded(monkeypatch, tmp_path):
    from pipelines.blip.adapter_sources import ADAPTER_WEIGHTS_FILE, download_adapter

    hub = FakeHub({ADAPTER_WEIGHTS_FILE: None}, tmp_path).install(monkeypatch)
    with pytest.raises(ValueError, match="did not report the size"):
        download_adapter("someone/adapter")
    assert hub.downloads() == []


# ----------------------------------------------------------------------------- --tiny is offline


def test_tiny_mode_turns_the_hub_off(tiny_root, monkeypatch):
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import OfflineModeIsEnabled

    from pipelines import startup

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    studio = startup.studio_from_args(startup.parse_args(["--tiny", "--tiny-dir", str(tiny_root), "--no-train"]))
    assert studio.tiny and os.environ["HF_HUB_OFFLINE"] == "1" and constants.HF_HUB_OFFLINE is True
    with pytest.raises(OfflineModeIsEnabled):
        HfApi().model_info("stabilityai/stable-diffusion-3.5-large")  # refused before any connection
