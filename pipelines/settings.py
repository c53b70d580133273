"""Limits and defaults, in one place.

The UI's sliders and the pipelines' own checks both import these, so a limit
is never stated twice. Operators of a public instance can tighten the
server-side limits with environment variables; values are clamped so an
environment variable can lower a limit but never lift it past what is safe.
"""

from __future__ import annotations

import os
from pathlib import Path


def _env_int(name: str, default: int, ceiling: int) -> int:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = int(raw)
    except ValueError as error:
        raise ValueError(f"{name}={raw!r} is not a whole number; unset it or give e.g. {name}={default}.") from error
    return max(1, min(value, ceiling))


# --- uploads (pipelines/images) ---------------------------------------------------
# Bytes accepted for one uploaded image. Larger files are refused before decoding.
MAX_UPLOAD_BYTES = _env_int("STUDIO_MAX_UPLOAD_MB", 50, ceiling=200) * 1024 * 1024
# Pixels (width x height) that may be decoded at all. Pillow's bomb warning
# (~89 MP, which we treat as an error) caps it; 64 MP by default because a decoded 64 MP RGB image
# already takes 190 MB.
MAX_DECODE_PIXELS = _env_int("STUDIO_MAX_DECODE_MEGAPIXELS", 64, ceiling=89) * 1_000_000
# Longest side kept after decoding. BLIP looks at 384 px and SD3.5 at most ~1.4k,
# so anything larger is downscaled (aspect kept) right after decoding.
MAX_IMAGE_SIDE = 2048
# Animated files: only the first frame is used; a file claiming more frames than
# this is still accepted, because only frame 0 is ever decoded.

# --- BLIP captioning (pipelines/blip) -----------------------------------------------
CAPTION_STRATEGIES = ("greedy", "beam", "diverse_beam", "sampling")
DEFAULT_CAPTION_STRATEGY = "beam"
DEFAULT_CAPTION_PREFIX = ""  # the BLIP paper prompts with "a picture of"; empty = unconditional
MAX_CAPTION_PREFIX_CHARS = 300
MAX_CAPTIONS_PER_IMAGE = 10
DEFAULT_NUM_BEAMS = 3  # the BLIP paper's setting
MAX_NUM_BEAMS = 10
DEFAULT_LENGTH_PENALTY = 1.0
DEFAULT_NUM_BEAM_GROUPS = 3
DEFAULT_DIVERSITY_PENALTY = 1.0
DEFAULT_TOP_K = 50
DEFAULT_TOP_P = 0.9
DEFAULT_TEMPERATURE = 1.0
MAX_TEMPERATURE = 5.0
DEFAULT_MIN_NEW_TOKENS = 5  # the BLIP paper's min length
DEFAULT_MAX_NEW_TOKENS = 20  # the BLIP paper's max length
MAX_NEW_TOKENS = 75
DEFAULT_REPETITION_PENALTY = 1.0
MAX_REPETITION_PENALTY = 3.0
DEFAULT_NO_REPEAT_NGRAM = 0  # 0 = off
MAX_NO_REPEAT_NGRAM = 5
MAX_SEED = 2**32 - 1
CPU_VISION_CHUNK = 1  # images per ViT pass on the CPU (see BlipCaptioner._run_vision_encoder)

# --- image-feature cache (pipelines/feature_cache) ----------------------------------
# Vision-encoder outputs kept per loaded model, so Caption, Match and Attention on the
# same image run the ViT once. BLIP base keeps 577 x 768 floats per image: 1.8 MB in
# fp32, so the default costs at most ~57 MB per model.
IMAGE_FEATURE_CACHE_ENTRIES = _env_int("STUDIO_FEATURE_CACHE_ENTRIES", 32, ceiling=256)

# --- image-text matching (pipelines/matching) ---------------------------------------
MAX_MATCH_TEXTS = 20  # candidate texts per request; all are scored in one decoder pass
MAX_MATCH_TEXT_CHARS = 300  # per candidate; BLIP was trained on captions of a few dozen words
MAX_MATCH_IMAGES = 8  # the main image plus up to 7 more, to rank images for a text
MATCH_RANKINGS = ("mean", "total", "itm", "itc")  # itm/itc need the retrieval model
DEFAULT_MATCH_RANKING = "mean"  # mean log-prob per token: long and short texts compare fairly
# Candidates used when a request gives none: one per example photo, so the examples rank at once.
DEFAULT_MATCH_TEXTS = "a photo of a cat\na cup of coffee on a table\na rocket launch\nan astronaut in a space suit"

# --- cross-attention heatmaps (pipelines/attention) ---------------------------------
MAX_ATTENTION_CAPTION_CHARS = 500
ATTENTION_OVERLAY_SIDE = 384  # longest side of each overlay (BLIP itself looks at 384 px)
DEFAULT_ATTENTION_OPACITY = 0.6  # how strongly the hottest spots are coloured over the image
ATTENTION_EXPORT_FORMATS = ("npy", "json")
ATTENTION_SHEET_COLUMNS = 6  # words per row in the laid-out sheet
ATTENTION_SHEET_CELL = 192  # side of each overlay in the sheet, in pixels

# --- batch captioning (pipelines/batch_caption, caption_folder) ----------------------
DEFAULT_BATCH_SIZE = 8  # images per forward pass; 8 keeps BLIP base under 2 GB of activations
MAX_BATCH_SIZE = 64
BATCH_LOADER_WORKERS = 2  # DataLoader processes decoding images ahead of the model
MAX_BATCH_FILES = 2000  # images per Batch-tab run (the command line has no limit)
MAX_ZIP_UNCOMPRESSED_BYTES = 2 * 1024**3  # a zip that would unpack past this is refused (zip bombs)
MAX_ZIP_RATIO = 200  # a member that compresses more than this is a bomb, not a photo

# --- SD3.5 generation (pipelines/sd3, components/generate) ---------------------------
# Per-model presets (steps, guidance, size range) live in pipelines/catalog.py.
MAX_STEPS = 100
MAX_GUIDANCE = 20.0
MAX_IMAGES_PER_REQUEST = 4
DEFAULT_T5_TOKENS = 256  # diffusers' default max_sequence_length
MIN_T5_TOKENS = 77
MAX_T5_TOKENS = 512  # T5-XXL's trained context
MAX_PROMPT_CHARS = 4000  # ~1,000 T5 tokens: enough to see a truncation warning, not a flood
DEFAULT_PREVIEW_EVERY = 4  # steps between live previews (latent projection; 0 = off)
VAE_TILING_ABOVE_PIXELS = 1536 * 1024  # larger images decode in tiles (the VAE is the peak there)
MAX_HISTORY_IMAGES = 48  # images kept in a browser session's history gallery

# --- results (bench/, the Round trip tab, the Scoreboard) ---------------------------
# Benchmarks write bench/results; the Round trip tab writes its evaluations to
# STUDIO_RESULTS_DIR when set (e.g. a persistent volume on a Space), else there too.
BENCH_RESULTS_DIR = Path(__file__).resolve().parent.parent / "bench" / "results"
EVALUATION_RESULTS_DIR = Path(os.environ.get("STUDIO_RESULTS_DIR") or BENCH_RESULTS_DIR)

# --- serving (app.py) ---------------------------------------------------------------
# Requests that may run at once per event, and requests that may wait. Past
# QUEUE_MAX_SIZE a request is refused with Gradio's "queue is full" message.
CONCURRENCY_LIMIT = _env_int("STUDIO_CONCURRENCY", 1, ceiling=8)
QUEUE_MAX_SIZE = _env_int("STUDIO_QUEUE_SIZE", 32, ceiling=512)

# --- memory planner (pipelines/memory, components/system) ----------------------------
PLAN_DEFAULT_SIDE = 1024  # SD3.5's native resolution: the planner's default size
PLAN_MIN_SIDE = 256  # smaller than any SD3.5 preset allows; the largest side comes from pos_embed_max_size
PLAN_MAX_BATCH = 64  # images per plan (SD3 batch or BLIP captioning batch)
PLAN_CAPTION_BATCHES = (1, 32)  # BLIP batches shown in the System tab's table
# GPU size assumed where the machine has none: a common consumer card (RTX 3090/4090).
PLAN_DEFAULT_GPU_GIB = 24
PLAN_MAX_GPU_GIB = 2048  # what the System tab accepts as a typed GPU size
# Room a plan keeps free for what its estimate leaves out: the CUDA context, cuBLAS
# workspaces, allocator fragmentation. Generous until a GPU benchmark measures it.
PLAN_MARGIN_BYTES = 2 * 1024**3
