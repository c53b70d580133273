"""Where SD3.5 LoRA files come from, checked before anything is loaded: the LoRA folder, uploads, the Hub, the registry.

``resolve_lora_source`` turns what a user named into a ``LoraSource``: a
``.safetensors`` file inside the LoRA folder (no absolute paths, ``..`` or
escaping symlinks), an upload, a Hub file, or an entry of the curated registry
(``assets/loras.json``, checked by ``load_registry``). Pickled formats are
refused by name and by content; every file is size-checked. ``pipelines.lora.library``
loads what comes out of here.

A Hub repo a visitor names is a stranger's: it must be public (asked anonymously, never
with HF_TOKEN, never read from the operator's Hugging Face cache), its file's header must
be a LoRA (and fit the model, when the caller says which) before a byte of weights is
downloaded, and the download goes to a folder of its own under the work root, charged to
the client (``pipelines.hub_access.VisitorDownloads``) and deleted once loaded.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from pipelines import settings
from pipelines.catalog import CATALOG
from pipelines.hub_access import VisitorDownload, VisitorDownloads, visitor_downloads
from pipelines.lora.formats import (
    PICKLED_SENTENCE,
    PICKLED_SUFFIXES,
    SafetensorsHeader,
    inspect_lora_keys,
    read_safetensors_header,
)

logger = logging.getLogger(__name__)

REGISTRY_FIELDS = {
    "name",
    "repo",
    "file",
    "weight_name",
    "trigger_words",
    "default_scale",
    "bases",
    "source",
    "licence",
    "description",
}

# ----------------------------------------------------------------------------- names and sources


def sanitize_lora_name(text: str) -> str:
    """An adapter name from any text: lower case ``[a-z0-9_]``, at most ``MAX_LORA_NAME_CHARS``."""
    name = re.sub(r"[^a-z0-9]+", "_", str(text).lower()).strip("_")[: settings.MAX_LORA_NAME_CHARS].strip("_")
    if not name:
        return "lora"
    return name if name[0].isalpha() else f"lora_{name}"[: settings.MAX_LORA_NAME_CHARS]


@dataclass(frozen=True)
class LoraSource:
    """A LoRA file found and checked, with what its origin says about it."""

    path: Path  # a local .safetensors file (for the Hub: the file in the local cache)
    kind: str  # file | upload | hub | registry
    description: str  # what the user sees: "loras/x.safetensors", "hub:owner/repo/file", "registry:name"
    name: str  # the adapter name it gets unless the caller picks one
    trigger_words: tuple[str, ...] = ()
    default_scale: float = settings.DEFAULT_LORA_SCALE
    bases: tuple[str, ...] = ()  # catalog keys it was made for (registry entries); () = unknown
    licence: str = ""
    url: str = ""
    # A visitor's Hub file: its folder and the bytes charged to its client (the library deletes the
    # folder once the weights are in memory, and gives the charge back when the LoRA goes).
    download: VisitorDownload | None = field(default=None, compare=False, repr=False)


def _check_suffix(name: str, label: str) -> None:
    suffix = PurePosixPath(name).suffix.lower()
    if suffix in PICKLED_SUFFIXES:
        raise ValueError(f"{label} is a {suffix} file: {PICKLED_SENTENCE}.")
    if suffix != ".safetensors":
        raise ValueError(f"{label} is not a .safetensors file; LoRAs are loaded from .safetensors files only.")


def _check_file(path: Path, label: str) -> None:
    """Size limit and a valid safetensors header (a renamed pickle fails on its first 8 bytes)."""
    size = path.stat().st_size
    if size > settings.MAX_LORA_BYTES:
        raise ValueError(
            f"{label} is {size / 2**20:,.0f} MB, over the {settings.MAX_LORA_BYTES / 2**20:,.0f} MB limit for a LoRA "
            "(STUDIO_MAX_LORA_MB); a rank-128 LoRA for Large is about 900 MB."
        )
    read_safetensors_header(path, label=label)


def list_lora_files(lora_dir: str | Path = settings.DEFAULT_LORA_DIR) -> list[str]:
    """The .safetensors files under ``lora_dir`` (relative names, sorted) that ``resolve_lora_source(file=...)`` accepts.

    Subfolders count (a Train run writes ``<run name>/pytorch_lora_weights.safetensors``); hidden ones
    (``.runs/`` with the runs' logs and datasets, checkpoints' caches) do not.
    """
    root = Path(lora_dir).expanduser()
    if not root.is_dir():
        return []
    resolved_root = root.resolve()
    names = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]  # not walked at all
        for file in files:
            path = Path(folder) / file
            if path.suffix.lower() != ".safetensors" or not path.is_file():
                continue
            if not path.resolve().is_relative_to(resolved_root):
                continue  # a symlink out of the folder: resolve_lora_source would refuse it
            names.append(path.relative_to(root).as_posix())
    return sorted(names)


def _resolve_in_folder(name: str, folder: Path, what: str) -> Path:
    """``name`` inside ``folder``, refusing absolute paths, ``..``, and symlinks that lead out."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"Give the name of a .safetensors file in the {what}.")
    if "\x00" in name or "\\" in name:
        raise ValueError(f"{name!r} is not a valid file name; use / between folders.")
    # The sentences name the folder by what it is, never by its path on the server, and never list it.
    relative = PurePosixPath(name.strip())
    if relative.is_absolute() or name.strip().startswith("~"):
        raise ValueError(f"{name!r} is an absolute path; give a name inside the {what}, or upload the file instead.")
    if ".." in relative.parts:
        raise ValueError(f"{name!r} goes up with '..'; give a name inside the {what}.")
    _check_suffix(name, repr(name))
    root = folder.expanduser().resolve()
    candidate = (root / relative).resolve()
    if not candidate.is_relative_to(root):
        raise ValueError(f"{name!r} leads outside the {what} through a symlink; put the file itself in the folder.")
    if not candidate.is_file():
        raise ValueError(
            f"There is no {name!r} in the {what}; choose one of the files the LoRA panel lists, or upload it."
        )
    return candidate


def _hub_error_sentence(repo: str, weight_name: str, error: BaseException, public_only: bool = False) -> str | None:
    from huggingface_hub import errors as hub_errors

    target = f"{repo}/{weight_name}" if weight_name else repo
    if isinstance(error, hub_errors.GatedRepoError):
        if public_only:
            return f"{repo} is gated, and only public repos can be named here; download the file and upload it."
        return (
            f"{repo} is gated: accept its terms at https://huggingface.co/{repo} and set HF_TOKEN to a token of "
            "that account, or download the file and put it in the LoRA folder."
        )
    if isinstance(error, hub_errors.RepositoryNotFoundError):
        if public_only:
            return (
                f"There is no public LoRA repo {repo!r} on the Hub; check the repo id (private repos cannot be named)."
            )
        return f"There is no LoRA repo {repo!r} on the Hub (or it is private: set HF_TOKEN); check the repo id."
    if isinstance(error, (hub_errors.LocalEntryNotFoundError, hub_errors.OfflineModeIsEnabled)):
        return (
            f"{target} is not in the local Hugging Face cache and the Hub cannot be reached (no network, or "
            "HF_HUB_OFFLINE is set): download it once with network access, or put the .safetensors file in the LoRA folder."
        )
    if isinstance(error, (hub_errors.EntryNotFoundError, hub_errors.RemoteEntryNotFoundError)):
        return f"{repo} has no file {weight_name!r}; check the file name in the repo's Files tab."
    if isinstance(error, hub_errors.HFValidationError):
        return f"{repo!r} is not a valid Hub repo id; write it as owner/name."
    if isinstance(error, OSError | hub_errors.HfHubHTTPError):
        return f"The Hub could not be reached for {target} ({type(error).__name__}); try again, or put the file in the LoRA folder."
    return None


def _resolve_hub(
    repo: str, weight_name: str | None, cache_dir: str | Path | None, token: bool | None = False
) -> tuple[Path, str]:
    """Download (or find in the cache) one .safetensors file of a Hub repo; (path, weight_name).

    The file's size comes from the Hub's file listing first; a file over ``settings.MAX_LORA_BYTES``
    is refused before a byte of it is downloaded. ``token``: False (a repo a visitor names: the
    operator's HF_TOKEN is never sent), None (the registry's own repos: HF_TOKEN if set).
    """
    from huggingface_hub import HfApi, constants, hf_hub_download

    repo = (repo or "").strip()
    weight_name = (weight_name or "").strip()
    try:
        _check_repo_file(repo, weight_name)
        if weight_name:
            # 1. Already downloaded: no network needed.
            try:
                path = hf_hub_download(repo, weight_name, cache_dir=cache_dir, local_files_only=True, token=token)
                return Path(path), weight_name
            except Exception as error:
                if constants.HF_HUB_OFFLINE:
                    raise
                logger.debug("%s/%s not cached (%s)", repo, weight_name, error)
            # 2. Its size, before downloading anything.
            listed = HfApi().get_paths_info(repo, [weight_name], token=token)
            sizes = {item.path: getattr(item, "size", None) for item in listed}
            if weight_name not in sizes:
                raise ValueError(f"{repo} has no file {weight_name!r}; check the file name in the repo's Files tab.")
            size = sizes[weight_name]
        else:
            # 1. The repo's single .safetensors file, with its size.
            siblings = HfApi().model_info(repo, files_metadata=True, token=token).siblings or []
            candidates = [item for item in siblings if item.rfilename.lower().endswith(".safetensors")]
            if not candidates:
                raise ValueError(f"{repo} holds no .safetensors file; LoRAs are loaded from .safetensors files only.")
            if len(candidates) > 1:
                names = ", ".join(item.rfilename for item in candidates[:6])
                raise ValueError(f"{repo} holds several .safetensors files ({names}); give weight_name to pick one.")
            weight_name, size = candidates[0].rfilename, candidates[0].size
        check_hub_file_size(f"{repo}/{weight_name}", size, settings.MAX_LORA_BYTES, "a LoRA (STUDIO_MAX_LORA_MB)")
        # 3. Download.
        return Path(hf_hub_download(repo, weight_name, cache_dir=cache_dir, token=token)), weight_name
    except ValueError as error:
        sentence = _hub_error_sentence(repo, weight_name, error, public_only=token is False)
        if sentence is None:
            raise
        raise ValueError(sentence) from error
    except Exception as error:
        sentence = _hub_error_sentence(repo, weight_name, error, public_only=token is False)
        if sentence is None:
            raise ValueError(f"{repo}: the LoRA could not be fetched ({type(error).__name__}: {error}).") from error
        raise ValueError(sentence) from error


def _check_repo_file(repo: str, weight_name: str) -> None:
    """ValueError unless ``repo`` is a valid repo id and ``weight_name`` (if given) a .safetensors file
    name inside it: no absolute path, no ``..``. Checked before the Hub is asked anything."""
    from huggingface_hub.utils import validate_repo_id

    validate_repo_id(repo)
    if weight_name:
        _check_suffix(weight_name, repr(weight_name))
        if PurePosixPath(weight_name).is_absolute() or ".." in PurePosixPath(weight_name).parts:
            raise ValueError(f"{weight_name!r} must be a file name inside the repo {repo}.")


def check_hub_file_size(label: str, size: int | None, limit: int, what: str) -> None:
    """ValueError unless the Hub reported ``size`` and it is within ``limit``: checked before any download."""
    if size is None:
        raise ValueError(f"The Hub did not report the size of {label}, so it was not downloaded; try again later.")
    if size > limit:
        raise ValueError(f"{label} is {size / 2**20:,.0f} MB, over the {limit / 2**20:,.0f} MB limit for {what}.")


HeaderCheck = Callable[[SafetensorsHeader, str], None]  # (the header the Hub served, label) -> ValueError if unfit


def _public_file(repo: str, weight_name: str) -> tuple[str, str, int | None]:
    """(commit, weight_name, size) of a file of a *public* repo, asked anonymously (``token=False``).

    A private repo answers "not found" to an anonymous call; a gated one is refused too (its files
    need a token). Without ``weight_name``, the repo's single .safetensors file.
    """
    from huggingface_hub import HfApi

    info = HfApi().model_info(repo, files_metadata=True, token=False)
    if getattr(info, "private", False):
        raise ValueError(
            f"There is no public LoRA repo {repo!r} on the Hub; check the repo id (private repos cannot be named)."
        )
    if getattr(info, "gated", False):
        raise ValueError(f"{repo} is gated, and only public repos can be named here; download the file and upload it.")
    siblings = {item.rfilename: getattr(item, "size", None) for item in (info.siblings or [])}
    if weight_name:
        if weight_name not in siblings:
            raise ValueError(f"{repo} has no file {weight_name!r}; check the file name in the repo's Files tab.")
    else:
        candidates = [name for name in siblings if name.lower().endswith(".safetensors")]
        if not candidates:
            raise ValueError(f"{repo} holds no .safetensors file; LoRAs are loaded from .safetensors files only.")
        if len(candidates) > 1:
            raise ValueError(
                f"{repo} holds several .safetensors files ({', '.join(candidates[:6])}); give weight_name to pick one."
            )
        weight_name = candidates[0]
    return getattr(info, "sha", None) or "main", weight_name, siblings[weight_name]


def _hub_header(repo: str, weight_name: str, commit: str, size: int, label: str) -> SafetensorsHeader:
    """The file's safetensors header, read with two ranged requests (``parse_safetensors_file_metadata``)."""
    from huggingface_hub import HfApi

    parsed = HfApi().parse_safetensors_file_metadata(repo, weight_name, revision=commit, token=False)
    shapes = {name: tuple(int(side) for side in info.shape) for name, info in parsed.tensors.items()}
    dtypes = {name: str(info.dtype) for name, info in parsed.tensors.items()}
    data_end = max((int(info.data_offsets[1]) for info in parsed.tensors.values()), default=0)
    if data_end > size:
        raise ValueError(
            f"{label} declares {data_end:,} bytes of tensors but is {size:,} bytes long; it is not loaded."
        )
    return SafetensorsHeader(shapes, dtypes, dict(parsed.metadata or {}), 0, size)


def _resolve_visitor_hub(
    repo: str,
    weight_name: str | None,
    *,
    client: str,
    downloads: VisitorDownloads,
    check_header: HeaderCheck | None = None,
) -> tuple[Path, str, VisitorDownload]:
    """Fetch one .safetensors LoRA of a public repo a visitor named; (path, weight_name, its download).

    In order, each step before any byte of weights is written: 1. the repo is public and holds the
    file (anonymous metadata call); 2. its size is within ``settings.MAX_LORA_BYTES``; 3. its header
    (ranged reads) is a LoRA, and ``check_header`` accepts it (e.g. it fits the model); 4. the bytes
    fit the client's and the instance's caps. 5. The download, at the checked commit, into a folder of
    its own; a failure deletes it and gives the bytes back.
    """
    repo = (repo or "").strip()
    weight_name = (weight_name or "").strip()
    try:
        _check_repo_file(repo, weight_name)
        # 1-2. Public, there, and small enough.
        commit, weight_name, size = _public_file(repo, weight_name)
        _check_suffix(weight_name, repr(weight_name))
        label = f"hub:{repo}/{weight_name}"
        check_hub_file_size(f"{repo}/{weight_name}", size, settings.MAX_LORA_BYTES, "a LoRA (STUDIO_MAX_LORA_MB)")
        # 3. A LoRA, for this model, by its header.
        header = _hub_header(repo, weight_name, commit, size, label)
        inspect_lora_keys(header.shapes, label=label)
        if check_header is not None:
            check_header(header, label)
    except Exception as error:
        raise _visitor_hub_error(repo, weight_name, error) from error
    # 4. The bytes, charged before they are written.
    download = downloads.reserve(client, size, label)
    try:
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(repo, weight_name, revision=commit, cache_dir=download.folder, token=False))
        if path.stat().st_size != size:
            raise ValueError(f"{label} is not the {size:,} bytes the Hub listed; it was not loaded.")
        return path, weight_name, download
    except Exception as error:
        download.release()
        raise _visitor_hub_error(repo, weight_name, error) from error


def _visitor_hub_error(repo: str, weight_name: str, error: BaseException) -> ValueError:
    if isinstance(error, ValueError) and not _is_hub_error(error):
        return error
    sentence = _hub_error_sentence(repo, weight_name, error, public_only=True)
    if sentence is None:
        sentence = f"{repo}: the LoRA could not be fetched ({type(error).__name__})."
    return ValueError(sentence)


def _is_hub_error(error: BaseException) -> bool:
    from huggingface_hub import errors as hub_errors

    return isinstance(
        error, (hub_errors.HfHubHTTPError, hub_errors.HFValidationError, hub_errors.LocalEntryNotFoundError)
    )


def resolve_lora_source(
    *,
    file: str | None = None,
    upload: str | Path | None = None,
    repo: str | None = None,
    weight_name: str | None = None,
    registry_name: str | None = None,
    lora_dir: str | Path = settings.DEFAULT_LORA_DIR,
    registry: Mapping[str, RegistryEntry] | None = None,
    cache_dir: str | Path | None = None,
    client: str = "local",
    downloads: VisitorDownloads | None = None,
    check_header: HeaderCheck | None = None,
) -> LoraSource:
    """Find and check one LoRA file; give exactly one of ``file``, ``upload``, ``repo`` or ``registry_name``.

    - ``file``: a name relative to ``lora_dir`` (absolute paths, ``..`` and symlinks that lead
      out of the folder are refused);
    - ``upload``: a path the caller vouches is an upload (e.g. Gradio's temp file);
    - ``repo`` (+ optional ``weight_name``): a public Hub repo (a stranger's: see the module's
      docstring); without ``weight_name`` its single .safetensors file. ``client``
      (``components.common.client_identity``) is charged for it in ``downloads`` (default: the
      process's ``visitor_downloads()``); ``check_header(header, label)`` may refuse the file from its
      header, before the download (``LoraLibrary.check_header``);
    - ``registry_name``: an entry of ``registry`` (default: ``load_registry()`` of assets/loras.json);
      its repos are the operator's choice, read through ``cache_dir`` (the Hugging Face cache).

    Every kind must be a .safetensors file within ``settings.MAX_LORA_BYTES`` whose header is
    valid; pickled formats are refused by name and by content. ValueError in one sentence otherwise.
    """
    given = {
        key: value
        for key, value in {"file": file, "upload": upload, "repo": repo, "registry_name": registry_name}.items()
        if value not in (None, "")
    }
    if len(given) != 1:
        raise ValueError(
            "Choose one LoRA source: a file in the LoRA folder, an upload, a Hub repo, or a registry entry."
        )
    lora_dir = Path(lora_dir)
    if file:
        path = _resolve_in_folder(str(file), lora_dir, "LoRA folder")
        label = f"{lora_dir.name}/{PurePosixPath(str(file).strip()).as_posix()}"
        _check_file(path, label)
        return LoraSource(path=path, kind="file", description=label, name=sanitize_lora_name(path.stem))
    if upload:
        path = Path(upload)
        _check_suffix(path.name, path.name)
        if not path.is_file():
            raise ValueError(f"The upload {path.name} is not there any more; upload it again.")
        _check_file(path, path.name)
        return LoraSource(
            path=path, kind="upload", description=f"upload:{path.name}", name=sanitize_lora_name(path.stem)
        )
    if repo:
        path, weight_name, download = _resolve_visitor_hub(
            str(repo),
            weight_name,
            client=client,
            downloads=visitor_downloads() if downloads is None else downloads,
            check_header=check_header,
        )
        label = f"hub:{str(repo).strip()}/{weight_name}"
        try:
            _check_file(path, label)
        except Exception:
            download.release()
            raise
        return LoraSource(
            path=path,
            kind="hub",
            description=label,
            name=sanitize_lora_name(str(repo).strip().rsplit("/", 1)[-1]),
            url=f"https://huggingface.co/{str(repo).strip()}",
            download=download,
        )
    entries = load_registry() if registry is None else registry
    entry = entries.get(str(registry_name).strip())
    if entry is None:
        known = ", ".join(entries) or "none"
        raise ValueError(f"There is no LoRA {registry_name!r} in the registry; it has: {known}.")
    if entry.repo:
        # Registry LoRAs are public: HF_TOKEN is sent only for the catalog's own (gated) models.
        path, _ = _resolve_hub(entry.repo, entry.weight_name, cache_dir, token=False)
    else:
        path = _resolve_in_folder(entry.file, entry.folder, "registry's folder")
    label = f"registry:{entry.name}"
    _check_file(path, label)
    return LoraSource(
        path=path,
        kind="registry",
        description=label,
        name=entry.name,
        trigger_words=entry.trigger_words,
        default_scale=entry.default_scale,
        bases=entry.bases,
        licence=entry.licence,
        url=entry.source,
    )


# ----------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class RegistryEntry:
    """One curated LoRA: where it lives, how to trigger it, what it suits."""

    name: str
    repo: str | None  # a Hub repo id, or None for a local file
    file: str | None  # a file relative to the registry's folder, or None for a Hub repo
    weight_name: str | None
    trigger_words: tuple[str, ...]
    default_scale: float
    bases: tuple[str, ...]  # catalog keys: sd35-large, sd35-large-turbo, sd35-medium
    source: str  # the page this entry was checked against
    licence: str
    folder: Path  # the registry's folder (``file`` is relative to it)
    description: str = ""


def load_registry(path: str | Path | None = None) -> dict[str, RegistryEntry]:
    """Read and check a LoRA registry (default: ``settings.LORA_REGISTRY_PATH``); name -> entry, in file order."""
    path = Path(settings.LORA_REGISTRY_PATH if path is None else path)
    label = path.name
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"The LoRA registry {path} does not exist.") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{label} is not valid JSON (line {error.lineno}: {error.msg}); fix the file.") from None
    if not isinstance(document, dict) or not isinstance(document.get("loras"), list):
        raise ValueError(f'{label} must be a JSON object with a "loras" list.')
    sd3_keys = [key for key, spec in CATALOG.items() if spec.kind == "sd3"]
    entries: dict[str, RegistryEntry] = {}
    for index, item in enumerate(document["loras"], start=1):
        where = f"{label}, entry {index}"
        if not isinstance(item, dict):
            raise ValueError(f"{where} must be a JSON object.")
        unknown = sorted(set(item) - REGISTRY_FIELDS)
        if unknown:
            raise ValueError(
                f"{where} has an unknown field {unknown[0]!r}; the fields are: {', '.join(sorted(REGISTRY_FIELDS))}."
            )
        for required in ("name", "trigger_words", "default_scale", "bases", "source", "licence"):
            if required not in item:
                raise ValueError(f"{where} has no {required!r}.")
        name = item["name"]
        if not isinstance(name, str) or sanitize_lora_name(name) != name:
            raise ValueError(
                f"{where}: name {name!r} must be lower case letters, digits and _ (e.g. {sanitize_lora_name(str(name))!r})."
            )
        if name in entries:
            raise ValueError(f"{where}: the name {name!r} is used twice.")
        repo, file, weight_name = item.get("repo"), item.get("file"), item.get("weight_name")
        if bool(repo) == bool(file):
            raise ValueError(f"{where} ({name}) needs exactly one of 'repo' (a Hub repo id) or 'file' (a local file).")
        if repo and not (isinstance(weight_name, str) and weight_name.lower().endswith(".safetensors")):
            raise ValueError(f"{where} ({name}) needs a 'weight_name' ending in .safetensors for its repo {repo}.")
        if file and not (isinstance(file, str) and file.lower().endswith(".safetensors")):
            raise ValueError(f"{where} ({name}): 'file' must be a .safetensors file name.")
        triggers = item["trigger_words"]
        if not isinstance(triggers, list) or not all(isinstance(word, str) and word.strip() for word in triggers):
            raise ValueError(f"{where} ({name}): 'trigger_words' must be a list of words or phrases (may be empty).")
        scale = item["default_scale"]
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
            raise ValueError(f"{where} ({name}): 'default_scale' must be a number.")
        if not -settings.MAX_LORA_WEIGHT <= scale <= settings.MAX_LORA_WEIGHT:
            raise ValueError(f"{where} ({name}): 'default_scale' must be within ±{settings.MAX_LORA_WEIGHT:g}.")
        bases = item["bases"]
        if not isinstance(bases, list) or not bases or not all(base in sd3_keys for base in bases):
            raise ValueError(f"{where} ({name}): 'bases' must list catalog keys among {', '.join(sd3_keys)}.")
        for text_field in ("source", "licence"):
            if not isinstance(item[text_field], str) or not item[text_field].strip():
                raise ValueError(f"{where} ({name}): '{text_field}' must be non-empty text.")
        entries[name] = RegistryEntry(
            name=name,
            repo=repo or None,
            file=file or None,
            weight_name=weight_name or None,
            trigger_words=tuple(word.strip() for word in triggers),
            default_scale=float(scale),
            bases=tuple(bases),
            source=item["source"].strip(),
            licence=item["licence"].strip(),
            folder=path.parent,
            description=str(item.get("description", "")),
        )
    return entries
