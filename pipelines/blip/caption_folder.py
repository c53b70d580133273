"""Caption a folder of images for training: sidecar .txt files and/or metadata.jsonl.

    python -m pipelines.blip.caption_folder DIR [--recursive] [--out OUT] [--trigger sks]
    python -m pipelines.blip.caption_folder DIR --adapter my-lora      # captions from a BLIP LoRA adapter
    accelerate launch --num_processes 2 -m pipelines.blip.caption_folder DIR     # several GPUs/processes

Images that already have a caption are skipped unless ``--overwrite``, so an
interrupted run resumes where it stopped. Sampled captions (``--strategy
sampling``) depend only on the image and ``--seed``, never on the batch size,
the number of processes or a resume. Two images with one stem (``photo.jpg``,
``photo.png``) get no sidecar, since both would read ``photo.txt``: the run says
so by name, captions everything else and still writes both to metadata.jsonl. Under ``accelerate launch`` the files
are split between processes; each writes its own part and the main process
merges the parts into one sorted metadata.jsonl.

``captioning.json`` in the output folder records the model and the adapter
(``--adapter``: a folder path, a folder name in the adapters folder, or a Hub
id). A resumed run must use the same adapter, so one folder never mixes
captions of two adapters; ``--overwrite`` captions everything again.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

from pipelines import settings
from pipelines.blip.batch_caption import (
    METADATA_FILE,
    FailedImage,
    caption_files,
    find_images,
    metadata_line,
    read_metadata,
    relative_name,
    sidecar_clashes,
    sidecar_path,
    write_metadata,
    write_sidecar,
)
from pipelines.blip.captioner import CaptionRequest
from pipelines.blip.precision import PRECISION_CHOICES, with_blip_precision
from pipelines.errors import exit_from_command

FORMATS = ("sidecar", "jsonl")
PARTS_DIR = ".caption-parts"  # per-process metadata parts, merged and removed at the end
MANIFEST_FILE = "captioning.json"  # the model and adapter the folder's captions come from


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.blip.caption_folder", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("folder", type=Path, help="folder of images")
    parser.add_argument("--recursive", action="store_true", help="also caption images in subfolders")
    parser.add_argument("--out", type=Path, default=None, help="write captions here instead of next to the images")
    parser.add_argument(
        "--format", default="sidecar,jsonl", help="comma-separated: sidecar (<stem>.txt), jsonl (metadata.jsonl)"
    )
    parser.add_argument("--overwrite", action="store_true", help="caption again images that already have one")
    parser.add_argument("--limit", type=int, default=None, help="caption at most this many new images this run")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=f"images per forward pass (default {settings.DEFAULT_BATCH_SIZE}; "
        f"{settings.GPU_CAPTION_BATCH_SIZE} on a CUDA GPU)",
    )
    parser.add_argument("--workers", type=int, default=settings.BATCH_LOADER_WORKERS, help="image loader processes")
    parser.add_argument("--trigger", default="", help="text put before every caption, e.g. a LoRA trigger word")
    parser.add_argument("--suffix", default="", help="text put after every caption")
    parser.add_argument("--tiny", action="store_true", help="use the tiny offline BLIP (for trying things out)")
    parser.add_argument("--tiny-dir", type=Path, default=None)
    parser.add_argument("--model", default=None, help="a local BLIP folder or repo id instead of the default")
    parser.add_argument(
        "--adapter",
        default=None,
        metavar="PATH_OR_ID",
        help="caption with a BLIP LoRA adapter: a folder, a folder name in the adapters folder, or a Hub id",
    )
    parser.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N (default: accelerate's choice)")
    parser.add_argument(
        "--precision",
        default=settings.DEFAULT_BLIP_PRECISION,
        choices=PRECISION_CHOICES,
        help="BLIP on the CPU, as app.py's --precision: auto (default) picks the fastest variant within "
        f"{settings.MAX_BLIP_LOGIT_DEVIATION * 100:.0f}%% logit deviation; fp32 is exact. GPUs keep bf16/fp16.",
    )
    decoding = parser.add_argument_group("decoding (as in the Caption tab)")
    for field in dataclasses.fields(CaptionRequest):
        if field.name == "num_captions":
            continue  # one caption per image
        default = field.default
        flag = "--" + field.name.replace("_", "-")
        if isinstance(default, bool):
            decoding.add_argument(flag, type=_parse_bool, default=default, metavar="true|false")
        else:
            decoding.add_argument(flag, type=type(default), default=default)
    args = parser.parse_args(argv)
    args.formats = [item.strip() for item in args.format.split(",") if item.strip()]
    unknown = set(args.formats) - set(FORMATS)
    if unknown or not args.formats:
        parser.error(f"--format takes a comma-separated subset of {', '.join(FORMATS)}, not {args.format!r}")
    return args


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")


def already_captioned(
    out_dir: Path, names: list[str], formats: list[str], without_sidecar: set[str] = frozenset()
) -> set[str]:
    """Names that have a caption from an earlier (possibly interrupted) run in every requested format.

    ``without_sidecar`` names images that get no sidecar (they would share one): another
    image's ``<stem>.txt`` never counts as theirs.
    """
    done_in_jsonl = set(read_metadata(out_dir / METADATA_FILE))
    for part in sorted((out_dir / PARTS_DIR).glob("*.jsonl")):
        done_in_jsonl |= set(read_metadata(part))
    done = set(names)
    if "sidecar" in formats:
        done &= {name for name in names if name not in without_sidecar and sidecar_path(name, out_dir).is_file()} | (
            without_sidecar if "jsonl" in formats else set()
        )
    if "jsonl" in formats:
        done &= done_in_jsonl
    return done


def merge_metadata(out_dir: Path, keep: set[str]) -> int:
    """Fold every process's part into metadata.jsonl (sorted, one entry per file); return its size.

    Entries for files that no longer exist are dropped; a part's entry replaces an older one.
    """
    entries = read_metadata(out_dir / METADATA_FILE)
    parts = sorted((out_dir / PARTS_DIR).glob("*.jsonl"))
    for part in parts:
        entries.update(read_metadata(part))
    entries = {name: text for name, text in entries.items() if name in keep}
    write_metadata(entries, out_dir / METADATA_FILE)
    for part in parts:
        part.unlink()
    if (out_dir / PARTS_DIR).is_dir() and not any((out_dir / PARTS_DIR).iterdir()):
        (out_dir / PARTS_DIR).rmdir()
    return len(entries)


def read_manifest(out_dir: Path) -> dict | None:
    """The captioning.json of an earlier run in ``out_dir``, or None."""
    path = out_dir / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{path} is not valid JSON; delete it (it only records the model and adapter).") from None
    return manifest if isinstance(manifest, dict) else None


def check_same_adapter(out_dir: Path, adapter_source: str | None, done: set[str]) -> None:
    """ValueError when captions already in ``out_dir`` came from another adapter (or the base model)."""
    earlier = read_manifest(out_dir)
    if not done or earlier is None or earlier.get("adapter_source") == adapter_source:
        return
    before = earlier.get("adapter_source") or "the base model"
    now = adapter_source or "the base model"
    raise ValueError(
        f"{len(done)} images in {out_dir} were captioned with {before}, this run uses {now}; resume with the same "
        "--adapter, or add --overwrite to caption every image again."
    )


def write_manifest(out_dir: Path, captioner, adapter, request: CaptionRequest) -> None:
    """captioning.json: the model, the adapter (name and source) and the decoding settings."""
    manifest = {
        "model": captioner.source,
        # --precision: bf16 captions may differ from fp32's; None when the runtime's dtype was kept (a GPU)
        "precision": captioner.precision,
        "adapter": adapter.name if adapter is not None else None,
        "adapter_source": adapter.source if adapter is not None else None,
        "request": dataclasses.asdict(request),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def load_adapter(captioner, source: str):
    """Load ``--adapter`` (a path, a name in the adapters folder, or a Hub id) onto ``captioner``."""
    from pipelines.blip.adapters import BlipAdapterSet, default_adapter_dir

    return BlipAdapterSet(default_adapter_dir()).load(captioner, source, trusted_paths=True)


def load_captioner(args: argparse.Namespace, device: str):
    from pipelines.manager import ModelManager
    from pipelines.runtime import choose_runtime

    tiny_root = None
    if args.tiny:
        from pipelines.tiny import ensure_tiny_models

        tiny_root = ensure_tiny_models(args.tiny_dir)
    overrides = {"blip-caption": args.model} if args.model else None
    runtime = with_blip_precision(choose_runtime(device), args.precision, tiny=args.tiny)
    manager = ModelManager(runtime, tiny_root=tiny_root, source_overrides=overrides)
    return manager.get("blip-caption")


def run(args: argparse.Namespace) -> int:
    """Caption the folder; return the process exit code (1 if any image failed)."""
    from accelerate import PartialState
    from tqdm.auto import tqdm

    state = PartialState(cpu=args.device == "cpu")
    root = args.folder.resolve()
    out_dir = (args.out or args.folder).resolve()
    request = CaptionRequest(
        **{
            field.name: getattr(args, field.name)
            for field in dataclasses.fields(CaptionRequest)
            if field.name != "num_captions"
        }
    ).validated()

    # 1. Decide what is left to do (every process computes the same list).
    files = find_images(root, recursive=args.recursive)
    names = [relative_name(path, root) for path in files]
    # Two images with one stem (photo.jpg, photo.png) would share photo.txt, and a kohya-style
    # trainer would read one caption for both: such images get no sidecar (metadata.jsonl keeps both).
    clashes = sidecar_clashes(names) if "sidecar" in args.formats else {}
    without_sidecar = {name for group in clashes.values() for name in group}
    done = set() if args.overwrite else already_captioned(out_dir, names, args.formats, without_sidecar)
    skipped = without_sidecar if "jsonl" not in args.formats else set()  # nothing could be written for them
    pending = [path for path, name in zip(files, names, strict=True) if name not in done and name not in skipped]
    if args.limit is not None:
        pending = pending[: max(args.limit, 0)]

    # 2. The model and adapter; a resumed folder must keep the adapter its captions came from.
    device = args.device or str(state.device)
    captioner = load_captioner(args, device)
    adapter = load_adapter(captioner, args.adapter) if args.adapter else None
    check_same_adapter(out_dir, adapter.source if adapter is not None else None, done)
    state.wait_for_everyone()  # every process has read the old manifest before it is replaced
    if state.is_main_process and (pending or read_manifest(out_dir) is None):
        write_manifest(out_dir, captioner, adapter, request)

    # 3. Caption this process's share, writing as it goes so an interruption keeps everything done.
    part_path = out_dir / PARTS_DIR / f"part-{state.process_index:05d}.jsonl"
    if "jsonl" in args.formats:
        part_path.parent.mkdir(parents=True, exist_ok=True)
    captioned, failures = 0, []
    started = time.perf_counter()
    with state.split_between_processes(pending) as my_files:
        progress = tqdm(total=len(my_files), unit="img", disable=not state.is_local_main_process, desc="captioning")
        batches = caption_files(
            captioner,
            my_files,
            root,
            request,
            batch_size=args.batch_size or default_batch_size(device),
            num_workers=args.workers,
            trigger=args.trigger,
            suffix=args.suffix,
            adapter=adapter.name if adapter is not None else None,
        )
        with open(part_path, "a", encoding="utf-8") if "jsonl" in args.formats else nullcontext() as part:
            for batch in batches:
                for item in batch:
                    if isinstance(item, FailedImage):
                        failures.append(item)
                        continue
                    if "sidecar" in args.formats and item.file_name not in without_sidecar:
                        write_sidecar(item, out_dir)
                    if part is not None:
                        part.write(metadata_line(item) + "\n")
                    captioned += 1
                if part is not None:
                    part.flush()
                progress.update(len(batch))
        progress.close()

    # 4. Merge the parts on the main process once every process is done.
    per_process = _gather_objects(state, [(captioned, failures)])
    state.wait_for_everyone()
    if state.is_main_process:
        total_captioned = sum(count for count, _ in per_process)
        all_failures = [failure for _, failed in per_process for failure in failed]
        summary = (
            f"{total_captioned} captioned, {len(done)} already had captions, {len(all_failures)} failed "
            f"({len(files)} images found) in {time.perf_counter() - started:.1f} s"
        )
        if adapter is not None:
            summary += f"; adapter {adapter.name} ({adapter.source})"
        if "jsonl" in args.formats:
            entries = merge_metadata(out_dir, keep=set(names))
            summary += f"; {out_dir / METADATA_FILE} holds {entries} captions"
        print(summary)
        for failure in sorted(all_failures, key=lambda item: item.file_name):
            print(f"  failed: {failure.file_name}: {failure.reason}", file=sys.stderr)
        for sidecar, group in sorted(clashes.items()):
            print(f"  no sidecar: {clash_sentence(sidecar, group, 'jsonl' in args.formats)}", file=sys.stderr)
    state.wait_for_everyone()
    return 1 if clashes or any(failed for _, failed in per_process) else 0


def clash_sentence(sidecar: str, images: list[str], in_jsonl: bool) -> str:
    """Why images that would share ``sidecar`` got none, and how to fix it."""
    later = Path(images[-1])
    example = (later.parent / f"{later.stem}_2{later.suffix}").as_posix()
    kept = f"; {METADATA_FILE} holds their captions" if in_jsonl else ""
    return (
        f"{' and '.join(images)} would share {sidecar}, so a trainer would read one caption for both; "
        f"rename one of them (e.g. {images[-1]} -> {example}) and run again{kept}."
    )


def _gather_objects(state, items: list) -> list:
    if state.num_processes == 1:
        return list(items)
    from accelerate.utils import gather_object

    return gather_object(list(items))


def default_batch_size(device: str) -> int:
    """Images per forward pass when --batch-size is not given: large batches keep a GPU busy."""
    return settings.GPU_CAPTION_BATCH_SIZE if str(device).startswith("cuda") else settings.DEFAULT_BATCH_SIZE


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    # A bad folder or setting, or a model that cannot be loaded: one sentence and status 2.
    exit_from_command(
        lambda: run(args), kept_on_interrupt="captions written so far are kept; run the same command again to resume"
    )


if __name__ == "__main__":
    main()
