"""Score prompt adherence of the SD3.5 models with BLIP, over a prompt list, into a resumable JSON file.

    python -m pipelines.roundtrip.evaluate --models large,medium --seeds 0,1 --out bench/results/roundtrip-eval.json
    python -m pipelines.roundtrip.evaluate --tiny --steps 2 --side 64        # the whole loop, offline, in seconds

The same evaluation as the Round trip tab. Rows already in ``--out`` are
skipped, so an interrupted run resumes. The Scoreboard reads the file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipelines.roundtrip.loop import evaluation_table, load_prompts, run_evaluation


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.roundtrip.evaluate", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--models", default="large,large-turbo,medium")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument(
        "--prompts", nargs="*", type=Path, default=None, help="prompt files (default: assets/prompts/*.txt)"
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/roundtrip-eval.json"))
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: each model's preset)")
    parser.add_argument("--side", type=int, default=None, help="image side in px (default: the model's default)")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--tiny-dir", type=Path, default=None)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)

    from pipelines.blip.matching import ImageTextMatcher
    from pipelines.errors import ModelLoadError
    from pipelines.manager import ModelManager
    from pipelines.runtime import choose_runtime, machine_description

    try:
        tiny_root = None
        if args.tiny:
            from pipelines.tiny import ensure_tiny_models

            tiny_root = ensure_tiny_models(args.tiny_dir)
        manager = ModelManager(choose_runtime(args.device), tiny_root=tiny_root)
        matcher = ImageTextMatcher(manager.get("blip-caption"))
        seeds = [int(seed) for seed in args.seeds.split(",") if seed.strip()]
        payload = run_evaluation(
            manager,
            matcher,
            load_prompts(args.prompts),
            models=[model.strip() for model in args.models.split(",") if model.strip()],
            seeds=seeds,
            out_path=args.out,
            steps=args.steps,
            side=args.side,
            machine=machine_description(),
            model_size="tiny" if args.tiny else "real weights",
            on_progress=lambda done, total: print(f"\r{done}/{total}", end="", file=sys.stderr, flush=True),
        )
    except (ValueError, ModelLoadError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print(file=sys.stderr)
    print(f"{'model':<18} {'category':<16} {'mean':>8} {'std':>7} {'n':>4}")
    for model, category, mean, std, count in evaluation_table(payload):
        print(f"{model:<18} {category:<16} {mean:>8.3f} {std:>7.3f} {count:>4}")
    print(f"{len(payload['rows'])} rows in {args.out}")


if __name__ == "__main__":
    main()
