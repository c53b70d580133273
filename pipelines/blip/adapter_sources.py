"""Where BLIP adapters come from: a Hub snapshot of just the adapter's two files, or an upload (files or a zip).

An adapter is ``adapter_config.json`` + ``adapter_model.safetensors``. Pickled
weights are refused by name; zips are unpacked with the Batch tab's rules
(no ``..`` or absolute members, size and compression-ratio limits).
``pipelines.blip.adapter_files`` reads and checks what comes out of here.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import zipfile
from collections.abc import Iterable
from pathlib import Path

from pipelines import settings
from pipelines.blip.adapter_files import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, PICKLE_SENTENCE, PICKLE_SUFFIXES

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def download_adapter(repo_id: str, adapter_dir: str | Path | None = None) -> Path:
    """The Hub snapshot folder of ``repo_id``'s adapter_config.json and adapter_model.safetensors (nothing else).

    ``repo_id`` is whatever a visitor typed: it is fetched without the operator's HF_TOKEN
    (``token=False``), and both files' sizes are read from the Hub's file listing and checked
    against the adapter limits before anything is downloaded. Offline, only the cache is read.
    Offline, gated, missing, oversized and other failures each become one sentence, which names
    ``adapter_dir`` as given (the Studio gives the folder's name, never its server path).
    """
    from huggingface_hub import HfApi, constants, errors, snapshot_download

    local_hint = f"copy the adapter folder into {adapter_dir} and load it by name" if adapter_dir else "load a folder"
    wanted = [ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE]
    try:
        if not constants.HF_HUB_OFFLINE:  # offline, snapshot_download reads the cache and nothing is fetched
            _check_hub_sizes(repo_id, HfApi().get_paths_info(repo_id, wanted, token=False))
        folder = Path(snapshot_download(repo_id, allow_patterns=wanted, token=False))
    except errors.GatedRepoError:
        raise ValueError(
            f"The Hub repository {repo_id} is gated, and only public repositories can be named here: {local_hint}."
        ) from None
    except errors.RepositoryNotFoundError:
        raise ValueError(
            f"No public Hub repository {repo_id} was found; check the id (private repositories cannot be named), "
            f"or {local_hint}."
        ) from None
    except errors.RevisionNotFoundError:
        raise ValueError(f"The Hub repository {repo_id} has no such revision; check the id, or {local_hint}.") from None
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled):
        raise ValueError(
            f"The adapter {repo_id} is not in the local Hugging Face cache and cannot be downloaded (no network, or "
            f"HF_HUB_OFFLINE is set): download it once with network access, or {local_hint}."
        ) from None
    except errors.HFValidationError:
        raise ValueError(f"{repo_id!r} is not a valid Hub id; write owner/name, or {local_hint}.") from None
    except (OSError, RuntimeError) as error:  # network failures of every kind
        raise ValueError(
            f"The adapter {repo_id} could not be downloaded ({type(error).__name__}); check the network, or "
            f"{local_hint}."
        ) from None
    if not (folder / ADAPTER_CONFIG_FILE).is_file():
        raise ValueError(
            f"The Hub repository {repo_id} has no {ADAPTER_CONFIG_FILE} at its top level, so it is not a PEFT adapter "
            "(if the adapter is in a subfolder, download it and load the folder)."
        )
    if not (folder / ADAPTER_WEIGHTS_FILE).is_file():
        raise ValueError(f"The Hub repository {repo_id} has no {ADAPTER_WEIGHTS_FILE}; {PICKLE_SENTENCE}.")
    return folder


def _check_hub_sizes(repo_id: str, listed) -> None:
    """ValueError when a listed adapter file is over its limit or its size is unknown; missing files pass.

    (A missing file gets its own sentence once the snapshot shows what the repo holds.)
    """
    limits = {
        ADAPTER_CONFIG_FILE: settings.MAX_BLIP_ADAPTER_CONFIG_BYTES,
        ADAPTER_WEIGHTS_FILE: settings.MAX_BLIP_ADAPTER_BYTES,
    }
    for item in listed:
        limit = limits.get(getattr(item, "path", None))
        if limit is None:
            continue  # a folder of that name, or a file nobody asked for
        size = getattr(item, "size", None)
        if size is None:
            raise ValueError(
                f"The Hub did not report the size of {repo_id}/{item.path}, so it was not downloaded; try again later."
            )
        if size > limit:
            raise ValueError(
                f"{repo_id}/{item.path} is {size / 2**20:,.1f} MB, over the {limit / 2**20:,.0f} MB limit for a BLIP "
                "adapter's file; it was not downloaded."
            )


def unpack_adapter_upload(paths: Iterable[str | Path], work_dir: Path) -> tuple[Path, str]:
    """(folder, suggested name) for uploaded adapter files: the two files, or a .zip of the adapter folder.

    Nothing from a zip is written under its own name: the two files are copied
    to fixed names in a fresh folder, so a member path cannot escape it
    (zip-slip). Sizes are checked against their declared and real lengths, and a
    member that compresses more than ``MAX_ZIP_RATIO`` times is refused (a bomb).
    """
    paths = [Path(path) for path in paths]
    if not paths:
        raise ValueError("Upload adapter_config.json and adapter_model.safetensors, or a .zip of the adapter folder.")
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    target = Path(tempfile.mkdtemp(prefix="upload-", dir=work_dir))
    zips = [path for path in paths if path.suffix.lower() == ".zip"]
    if zips:
        if len(paths) > 1:
            raise ValueError("Upload one .zip of an adapter folder, or the two adapter files, not both.")
        return target, _unpack_adapter_zip(zips[0], target)
    config = [path for path in paths if path.suffix.lower() == ".json"]
    weights = [path for path in paths if path.suffix.lower() == ".safetensors"]
    for path in paths:
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise ValueError(f"{path.name} is refused: {PICKLE_SENTENCE}.")
        if path not in config and path not in weights:
            raise ValueError(
                f"{path.name} is not part of a LoRA adapter; upload adapter_config.json and "
                "adapter_model.safetensors, or a .zip of the adapter folder."
            )
    if len(config) != 1 or len(weights) != 1:
        raise ValueError(
            f"Upload exactly one {ADAPTER_CONFIG_FILE} and one {ADAPTER_WEIGHTS_FILE} "
            f"({len(config)} .json and {len(weights)} .safetensors files came)."
        )
    for source, name, limit in (
        (config[0], ADAPTER_CONFIG_FILE, settings.MAX_BLIP_ADAPTER_CONFIG_BYTES),
        (weights[0], ADAPTER_WEIGHTS_FILE, settings.MAX_BLIP_ADAPTER_BYTES),
    ):
        if source.stat().st_size > limit:
            raise ValueError(f"{source.name} is over {limit // 2**20} MB, too large for a BLIP adapter's {name}.")
        shutil.copyfile(source, target / name)
    return target, "upload"


def _unpack_adapter_zip(archive_path: Path, target: Path) -> str:
    try:
        archive = zipfile.ZipFile(archive_path)
    except (zipfile.BadZipFile, OSError):
        raise ValueError(f"{archive_path.name} is not a readable zip file; re-create it.") from None
    with archive:
        members = [member for member in archive.infolist() if not member.is_dir()]
        by_name: dict[str, list[zipfile.ZipInfo]] = {}
        for member in members:
            by_name.setdefault(Path(member.filename.replace("\\", "/")).name, []).append(member)
        configs, weights = by_name.get(ADAPTER_CONFIG_FILE, []), by_name.get(ADAPTER_WEIGHTS_FILE, [])
        if not weights and any(Path(member.filename).suffix.lower() in PICKLE_SUFFIXES for member in members):
            raise ValueError(f"{archive_path.name} holds pickled weights; {PICKLE_SENTENCE}.")
        if len(configs) != 1 or len(weights) != 1:
            raise ValueError(
                f"{archive_path.name} must hold one adapter folder ({ADAPTER_CONFIG_FILE} + {ADAPTER_WEIGHTS_FILE}); "
                f"it holds {len(configs)} config(s) and {len(weights)} weights file(s)."
            )
        folder = Path(configs[0].filename.replace("\\", "/")).parent
        if Path(weights[0].filename.replace("\\", "/")).parent != folder:
            raise ValueError(
                f"{archive_path.name} keeps the config and the weights in different folders; zip one folder."
            )
        for member, name, limit in (
            (configs[0], ADAPTER_CONFIG_FILE, settings.MAX_BLIP_ADAPTER_CONFIG_BYTES),
            (weights[0], ADAPTER_WEIGHTS_FILE, settings.MAX_BLIP_ADAPTER_BYTES),
        ):
            if member.file_size > limit:
                raise ValueError(f"{archive_path.name}: {name} unpacks to over {limit // 2**20} MB; refused.")
            if member.compress_size and member.file_size / member.compress_size > settings.MAX_ZIP_RATIO:
                raise ValueError(
                    f"{archive_path.name}: {name} expands {member.file_size // member.compress_size}x; "
                    "refused as a zip bomb."
                )
            _copy_member(archive, member, target / name, archive_path.name)
    stem = folder.name if folder.name else archive_path.stem
    return stem


def _copy_member(archive: zipfile.ZipFile, member: zipfile.ZipInfo, target: Path, label: str) -> None:
    """Unpack ``member`` to ``target`` in chunks, never past its declared size (a lying header writes no more)."""
    remaining = member.file_size
    try:
        with archive.open(member) as source, open(target, "wb") as sink:
            while remaining > 0:
                chunk = source.read(min(1024 * 1024, remaining))
                if not chunk:
                    break
                sink.write(chunk)
                remaining -= len(chunk)
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        # The error's type only: an OSError's text names the server path it was writing to.
        raise ValueError(
            f"{label}: {member.filename} could not be unpacked ({type(error).__name__}); re-create the zip."
        ) from None
