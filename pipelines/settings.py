"""Limits and defaults, in one place.

The UI's sliders and the pipelines' own checks both import these, so a limit
is never stated twice. Operators of a public instance can tighten the
server-side limits with environment variables; values are clamped so an
environment variable can lower a limit but never lift it past what is safe.
"""

from __future__ import annotations

import os
from enum import StrEnum
from pathlib import Path
from typing import NamedTuple


def _env_int(name: str, default: int, ceiling: int) -> int:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = int(raw)
    except ValueError as error:
        raise ValueError(f"{name}={raw!r} is not a whole number; unset it or give e.g. {name}={default}.") from error
    return max(1, min(value, ceiling))


class NumberRange(NamedTuple):
    """A limit that both the UI's control and the pipeline's validation read."""

    low: float
    high: float
    step: float  # the slider's step; an int step means the value is a whole number
    low_open: bool = False  # ``low`` itself is refused (e.g. temperature 0)

    @property
    def slider_minimum(self) -> float:
        """Where the slider starts: ``low``, or one step above it when ``low`` itself is refused."""
        return self.low + self.step if self.low_open else self.low


# --- uploads (pipelines/images) -----------------------------------------------------
# Bytes accepted for one uploaded image. Larger files are refused before decoding.
MAX_UPLOAD_BYTES = _env_int("STUDIO_MAX_UPLOAD_MB", 50, ceiling=200) * 1024 * 1024
# Pixels (width x height) that may be decoded at all. Pillow's bomb warning
# (~89 MP, which we treat as an error) caps it; 64 MP by default because a decoded 64 MP RGB image
# already takes 190 MB.
MAX_DECODE_PIXELS = _env_int("STUDIO_MAX_DECODE_MEGAPIXELS", 64, ceiling=89) * 1_000_000
# Memory one image's decode may take: width x height x the bytes its mode and the conversion to RGB
# hold (pipelines.images.decode_bytes_needed), from the header. A 64 MP 8-bit RGB or RGBA image fits;
# a small compressed float32 TIFF can claim 40 bytes a pixel (2.5 GB at 64 MP), and is refused.
MAX_DECODE_BYTES = _env_int("STUDIO_MAX_DECODE_MB", 1024, ceiling=4096) * 1024 * 1024
# Longest side kept after decoding. BLIP looks at 384 px and SD3.5 at most ~1.4k,
# so anything larger is downscaled (aspect kept) right after decoding.
MAX_IMAGE_SIDE = 2048
# Animated files: only the first frame is used; a file claiming more frames than
# this is still accepted, because only frame 0 is ever decoded.


# --- metadata in uploads (pipelines/png_chunks, pipelines/sd3/png_info) --------------
# Read from the file's chunks without decoding a pixel. Chunks walked in one PNG: a 50 MB
# upload in libpng's 8 kB IDAT chunks has about 6,400; 65,536 headers are walked in ~0.1 s.
PNG_MAX_CHUNKS = 65_536
# One text chunk (tEXt, zTXt, iTXt), unpacked. ComfyUI's prompt/workflow JSON runs to a few
# hundred kB; a bigger chunk is skipped unread, and a zTXt stops inflating at this size.
PNG_MAX_TEXT_CHUNK_BYTES = 2 * 1024 * 1024
# All the text chunks of one file together, unpacked: a file past it is refused.
PNG_MAX_TEXT_BYTES = 8 * 1024 * 1024
# The A1111 ``parameters`` text that is parsed (from a PNG chunk or an EXIF UserComment). A1111's own
# runs to a few kB (a long prompt, ~20 settings, LoRA hashes); 64 kB leaves room for any real one.
MAX_PARAMETERS_CHARS = 65_536
# A settings text written as JSON (SwarmUI, Fooocus, InvokeAI, NovelAI, a ComfyUI graph) that is parsed:
# a ComfyUI workflow runs to a few hundred kB, so the per-chunk limit leaves room for any real one.
MAX_SETTINGS_JSON_CHARS = PNG_MAX_TEXT_CHUNK_BYTES


# --- BLIP captioning (pipelines/blip/captioner) -------------------------------------
class CaptionStrategy(StrEnum):
    """How BLIP decodes: the one list that requests, controls and every check read."""

    GREEDY = "greedy"
    BEAM = "beam"
    DIVERSE_BEAM = "diverse_beam"
    SAMPLING = "sampling"


CAPTION_STRATEGIES = tuple(CaptionStrategy)
BEAM_STRATEGIES = frozenset({CaptionStrategy.BEAM, CaptionStrategy.DIVERSE_BEAM})  # decoded by diverse_beam
DEFAULT_CAPTION_STRATEGY = CaptionStrategy.BEAM
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
MAX_LENGTH_PENALTY = 5.0  # beam scores divide by length**penalty; past +-5 one length always wins
MAX_DIVERSITY_PENALTY = 10.0  # subtracted from log-probs per repeat; at 10 a repeat is never chosen
MAX_TOP_K = 1000  # past a thousand candidates top-k no longer cuts anything sampling would pick
# Each CaptionRequest number field's range: CaptionRequest.validated() checks these and
# components/decoding builds its sliders from them, so the two can never disagree.
CAPTION_RANGES = {
    "num_captions": NumberRange(1, MAX_CAPTIONS_PER_IMAGE, 1),
    "num_beams": NumberRange(1, MAX_NUM_BEAMS, 1),
    "length_penalty": NumberRange(-MAX_LENGTH_PENALTY, MAX_LENGTH_PENALTY, 0.1),
    "num_beam_groups": NumberRange(2, MAX_NUM_BEAMS, 1),  # diverse beam search needs two groups at least
    "diversity_penalty": NumberRange(0.0, MAX_DIVERSITY_PENALTY, 0.1),
    "top_k": NumberRange(0, MAX_TOP_K, 1),  # 0 = off
    "top_p": NumberRange(0.0, 1.0, 0.05, low_open=True),  # 1 = off
    "temperature": NumberRange(0.0, MAX_TEMPERATURE, 0.05, low_open=True),
    "seed": NumberRange(-1, MAX_SEED, 1),  # -1 = a random seed, reported back
    "min_new_tokens": NumberRange(0, MAX_NEW_TOKENS, 1),  # and at most max_new_tokens
    "max_new_tokens": NumberRange(1, MAX_NEW_TOKENS, 1),
    "repetition_penalty": NumberRange(0.0, MAX_REPETITION_PENALTY, 0.05, low_open=True),
    "no_repeat_ngram_size": NumberRange(0, MAX_NO_REPEAT_NGRAM, 1),  # 0 = off
}
# The Caption and Batch tabs (and /caption, /caption_batch) sample with a random seed unless one is given,
# so pressing Caption twice gives new captions; the seed used is returned. CaptionRequest itself keeps 0.
UI_CAPTION_SEED = -1
CPU_VISION_CHUNK = 1  # images per ViT pass on the CPU (see BlipCaptioner._run_vision_encoder)
# --precision (pipelines/blip/precision): on the CPU, auto picks the fastest BLIP variant whose
# measured relative L2 deviation of the first decode step's logits from fp32 stays at most this.
# 2% admits whole-model bf16 (1.6% measured) and keeps dynamic int8 (5.5-6.1%, per-channel weights
# 3.9-4.7%) opt-in; see the table in pipelines/blip/precision.py.
DEFAULT_BLIP_PRECISION = "auto"
MAX_BLIP_LOGIT_DEVIATION = 0.02

# --- image-feature cache (pipelines/blip/feature_cache) -----------------------------
# Vision-encoder outputs kept per loaded model, so Caption, Match and Attention on the
# same image run the ViT once. BLIP base keeps 577 x 768 floats per image: 1.8 MB in
# fp32, so the default costs at most ~57 MB per model.
IMAGE_FEATURE_CACHE_ENTRIES = _env_int("STUDIO_FEATURE_CACHE_ENTRIES", 32, ceiling=256)

# --- image-text matching (pipelines/blip/matching) ----------------------------------
MAX_MATCH_TEXTS = 20  # candidate texts per request; all are scored in one decoder pass
MAX_MATCH_TEXT_CHARS = 300  # per candidate; BLIP was trained on captions of a few dozen words
MAX_MATCH_IMAGES = 8  # the main image plus up to 7 more, to rank images for a text
MATCH_RANKINGS = ("mean", "total", "itm", "itc")  # itm/itc need the retrieval model
DEFAULT_MATCH_RANKING = "mean"  # mean log-prob per token: long and short texts compare fairly
# Candidates used when a request gives none: one per example photo, so the examples rank at once.
DEFAULT_MATCH_TEXTS = "a photo of a cat\na cup of coffee on a table\na rocket launch\nan astronaut in a space suit"

# --- cross-attention heatmaps (pipelines/blip/attention) ----------------------------
MAX_ATTENTION_CAPTION_CHARS = 500
ATTENTION_OVERLAY_SIDE = 384  # longest side of each overlay (BLIP itself looks at 384 px)
DEFAULT_ATTENTION_OPACITY = 0.6  # how strongly the hottest spots are coloured over the image
ATTENTION_EXPORT_FORMATS = ("npy", "json")
# Word pieces one request computes maps for: any caption BLIP can write. The raw maps grow with them
# (BLIP base: 12 layers x 12 heads x 577 keys, 0.33 MB of float32 per token; a 500-token caption
# would export 167 MB as .npy and 0.9 GB as JSON).
MAX_ATTENTION_TOKENS = MAX_NEW_TOKENS
# Bytes one raw-maps export may take, estimated from the shape before anything is written.
# 75 tokens on BLIP base: 25 MB as .npy, at most 63 MB as JSON (10 bytes per number).
MAX_ATTENTION_EXPORT_BYTES = _env_int("STUDIO_MAX_ATTENTION_EXPORT_MB", 64, ceiling=512) * 1024 * 1024
ATTENTION_SHEET_COLUMNS = 6  # words per row in the laid-out sheet
ATTENTION_SHEET_CELL = 192  # side of each overlay in the sheet, in pixels

# --- batch captioning (pipelines/blip/batch_caption, caption_folder) ----------------
DEFAULT_BATCH_SIZE = 8  # images per forward pass; 8 keeps BLIP base under 2 GB of activations
MAX_BATCH_SIZE = 64
BATCH_LOADER_WORKERS = 2  # DataLoader processes decoding images ahead of the model
# On a GPU, BLIP base at batch 32 with beam 3 holds ~3 GB of activations in bf16: large batches keep
# the GPU busy (pipelines/blip/gpu.py); caption_folder and the GPU bench use it there.
GPU_CAPTION_BATCH_SIZE = 32
MAX_BATCH_FILES = 2000  # images per Batch-tab run (the command line has no limit)
MAX_EDITED_CAPTION_CHARS = 2000  # one caption typed into the Batch tab's table (T5 reads about 512 tokens)
MAX_ZIP_UNCOMPRESSED_BYTES = 2 * 1024**3  # a zip that would unpack past this is refused (zip bombs)
MAX_ZIP_RATIO = 200  # a member that compresses more than this is a bomb, not a photo
# Bytes of Batch-tab zips kept in Gradio's cache (each until CACHE_SECONDS expire it), per client
# (components.common.client_identity) and for everyone: one full-size run (MAX_ZIP_UNCOMPRESSED_BYTES,
# images stored as uploaded) fits a client's share; past it the next batch or export is refused.
MAX_BATCH_KEPT_BYTES_PER_CLIENT = _env_int("STUDIO_MAX_BATCH_KEPT_MB_PER_CLIENT", 2560, ceiling=8192) * 1024**2
MAX_BATCH_KEPT_BYTES = _env_int("STUDIO_MAX_BATCH_KEPT_MB", 10240, ceiling=65536) * 1024**2
# Formats the Batch zip keeps byte for byte (already compressed); BMP, TIFF and GIF become PNG there.
BATCH_ZIP_KEPT_FORMATS = ("PNG", "JPEG", "WEBP")

# --- SD3.5 generation (pipelines/sd3/, components/generate) -------------------------
# Per-model presets (steps, guidance, size range) live in pipelines/catalog.py.
MAX_STEPS = 100
MAX_GUIDANCE = 20.0
MAX_IMAGES_PER_REQUEST = 4
DEFAULT_T5_TOKENS = 256  # diffusers' default max_sequence_length
MIN_T5_TOKENS = 77
MAX_T5_TOKENS = 512  # T5-XXL's trained context
MAX_PROMPT_CHARS = 4000  # ~1,000 T5 tokens: enough to see a truncation warning, not a flood
DEFAULT_PREVIEW_EVERY = 4  # steps between live previews (latent projection; 0 = off)
MAX_PREVIEW_EVERY = 10  # the Generate tab's slider and /generate's check: rarer previews are barely previews
VAE_TILING_ABOVE_PIXELS = 1536 * 1024  # larger images decode in tiles (the VAE is the peak there)
MAX_HISTORY_IMAGES = 48  # images kept in a browser session's history gallery
# Where a local Studio saves every SD3.5 image (beside app.py, as A1111's outputs/); --tiny's noise apart.
DEFAULT_OUTPUTS_DIR = "outputs"
DEFAULT_TINY_OUTPUTS_DIR = "outputs-tiny"
HISTORY_PAGE_SIZE = 24  # records per page of the saved history (pipelines/history): a 4x6 gallery
HISTORY_PAGE_SIZE_MAX = 100  # the most one /history call returns, whatever a client asks
# zlib level of the PNGs the Studio writes. Measured on this project's CPU: a 1024x1024 image takes 137 ms
# at PIL's default (6) and 65 ms at 1, for a file 12% larger; 137 ms would be 40% of a 0.35 s Turbo draw.
PNG_COMPRESS_LEVEL = 1

# --- ControlNet (pipelines/sd3/control_maps, pipelines/sd3/controlnet, components/generate) ------
CONTROL_TYPES = ("canny", "depth", "blur")  # the three ControlNets Stability released for SD3.5 Large
DEFAULT_CONTROL_TYPE = "canny"
# controlnet_conditioning_scale: 1 is the strength the ControlNets were trained at (diffusers' default);
# 0 turns the ControlNet off; A1111's ControlNet weight goes to 2.
CONTROL_SCALE = NumberRange(0.0, 2.0, 0.05)
DEFAULT_CONTROL_SCALE = 1.0
# cv2.Canny hysteresis thresholds on the gradient magnitude of 8-bit pixels; 100/200 is the usual pair
# (diffusers' and A1111's ControlNet examples), both ranges are A1111's.
CANNY_THRESHOLD = NumberRange(1, 255, 1)
DEFAULT_CANNY_LOW = 100
DEFAULT_CANNY_HIGH = 200
# Gaussian blur for the blur ControlNet: Stability publishes no preprocessing value; 9 px is the sigma
# Forge's blur_gaussian preprocessor starts at.
CONTROL_BLUR_SIGMA = 9.0

# --- SD3.5 fast path (pipelines/sd3/fast, --fast, --step-cache) ---------------------
# auto: regional compilation + fused QKV + channels-last VAE on CUDA GPUs that Triton compiles for;
# eager elsewhere. off (--no-fast): the plain diffusers pipeline. on: forced, on the CPU too.
DEFAULT_FAST_PATH = "auto"
# First Block Cache (lossy, off by default): diffusers' suggested threshold, and the largest accepted
# (past ~0.3 most steps are skipped and images blur).
SUGGESTED_STEP_CACHE_THRESHOLD = 0.05
MAX_STEP_CACHE_THRESHOLD = 0.5
# Graphs Dynamo keeps for the MMDiT blocks' shared forward (its default is 8): one per block variant
# and LoRA adapter set; past it that code silently runs eager (pipelines/sd3/fast.raise_recompile_limit).
FAST_PATH_RECOMPILE_LIMIT = 64
# ZeroGPU: the GPU time asked for one ahead-of-time compilation of the MMDiT (Large takes minutes).
AOT_COMPILE_SECONDS = 1500

# --- image to image and inpainting (pipelines/sd3/image_to_image, components/image_to_image) ------
# Strength is the share of the denoising schedule redrawn: 1 starts from pure noise (the input only
# sets the size), and below 0.05 even 100 steps leave the image untouched but for rounding.
STRENGTH = NumberRange(0.05, 1.0, 0.05)
DEFAULT_STRENGTH = 0.75  # A1111's default denoising strength: new detail, same composition
DEFAULT_VARIATION_STRENGTH = 0.5  # variations keep the layout and colours, and redraw the detail
MASK_BLUR = NumberRange(0, 64, 1)  # pixels: how far the paste-back blends around the mask's edge
DEFAULT_MASK_BLUR = 4  # A1111's default: enough to hide the seam at SD3.5's sizes
# Brush layers of the image editor read into one mask. The Inpaint editor has layers off (it sends one);
# more are refused before any file is opened, since each is decoded at the image's size.
MAX_MASK_LAYERS = 4
# Edits the Inpaint editor's page has sent (its image, composite and layers, held until the Inpaint
# event reads them): per client, and their bytes for everyone. Past either, the oldest are dropped.
MAX_PENDING_EDITS_PER_CLIENT = 4
MAX_PENDING_EDITS = 256
MAX_PENDING_EDIT_BYTES = _env_int("STUDIO_MAX_PENDING_EDIT_MB", 512, ceiling=4096) * 1024 * 1024

# --- results (bench/, the Round trip tab, the Scoreboard) ---------------------------
# Benchmarks write bench/results (the repository's measured figures). The Round trip tab writes
# the evaluations that visitors run to STUDIO_RESULTS_DIR when set (e.g. a persistent volume on a
# Space), else to the user's cache folder: never into the repository, whose files the Scoreboard
# presents as the project's own measurements. The Scoreboard shows both.
BENCH_RESULTS_DIR = Path(__file__).resolve().parent.parent / "bench" / "results"
_CACHE_HOME = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
EVALUATION_RESULTS_DIR = Path(os.environ.get("STUDIO_RESULTS_DIR") or _CACHE_HOME / "blip-sd3-studio" / "evaluations")

# --- serving (app.py) ---------------------------------------------------------------
# Requests that may run at once per event, and requests that may wait. Past
# QUEUE_MAX_SIZE a request is refused with Gradio's "queue is full" message.
CONCURRENCY_LIMIT = _env_int("STUDIO_CONCURRENCY", 1, ceiling=8)
QUEUE_MAX_SIZE = _env_int("STUDIO_QUEUE_SIZE", 32, ceiling=512)
# Events that decode or parse an upload on the CPU and run no model (PNG Info) share this id and
# limit: queued like the rest, apart from the GPU's queue, so they never wait for a generation.
CPU_CONCURRENCY_ID = "cpu"
CPU_CONCURRENCY_LIMIT = _env_int("STUDIO_CPU_CONCURRENCY", 2, ceiling=8)
# Queued events one client (components.common.client_identity) may have waiting; its running one does not
# count. Past it the next is refused with a sentence, so one client cannot fill the queue (32 jobs of 4
# images x 100 steps made a caption wait 176 s). Waiting jobs also take turns by client (pipelines/quotas).
MAX_PENDING_PER_CLIENT = _env_int("STUDIO_MAX_PENDING_PER_CLIENT", 4, ceiling=64)

# --- the Hugging Face Hub (pipelines/hub_access) ------------------------------------------
# Before a model loads from the Hub, one request checks that the Hub answers; without it a machine
# with no route waits minutes while every file request is retried. A refused connection fails at
# once; the timeout bounds a network that drops packets silently.
HUB_PROBE_TIMEOUT_SECONDS = 3.0
HUB_PROBE_TTL_SECONDS = 60.0  # an answer is reused this long, so a burst of loads probes once
# huggingface_hub's own timeouts (HF_HUB_ETAG_TIMEOUT, HF_HUB_DOWNLOAD_TIMEOUT), set when the user has
# not: a metadata request is small; a download read waits longer for a slow link.
HUB_METADATA_TIMEOUT_SECONDS = 10
HUB_DOWNLOAD_TIMEOUT_SECONDS = 30

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

# --- background training runs (pipelines/training/runs, components/train) -----------
MAX_RUNNING_TRAININGS = _env_int("STUDIO_MAX_TRAININGS", 1, ceiling=4)  # runs at once; each wants the whole GPU
MAX_TRAINING_IMAGES = 5000  # images in one uploaded training dataset
MAX_SIDECAR_BYTES = 64 * 1024  # one .txt caption
MAX_METADATA_BYTES = 64 * 1024**2  # one metadata.jsonl
TRAINING_LOG_TAIL_LINES = 30  # log lines the Train tab shows
TRAINING_LOSS_SMOOTHING = 0.9  # the Train tab's smoothed loss: an EMA with this weight (TensorBoard's slider)
TRAINING_CANCEL_GRACE_SECONDS = 10  # after SIGTERM, before SIGKILL
TRAINING_EXIT_GRACE_SECONDS = 5  # on app exit (or a survivor found at start): after SIGTERM, before SIGKILL
TRAINING_RUN_ID_BYTES = 12  # random bytes in a run id (96 bits): not guessable, so not readable by others
# A /train_start waits this long for another visitor's dataset check (one runs at a time) before a sentence.
TRAINING_DATASET_CHECK_WAIT_SECONDS = 120

# --- SD3.5 LoRA training (pipelines/training/train_sd3_lora, sd3_data) --------------
SD3_TRAIN_DEFAULT_MODEL = "sd35-large"  # the Generate tab's default model, so a LoRA trained by default loads there
SD3_TRAIN_DEFAULT_RESOLUTION = 1024  # SD3.5's native side: buckets hold about this many pixels squared
SD3_TRAIN_MIN_RESOLUTION = 64  # the tiny models' smallest size; real SD3.5 wants 512 or more
SD3_TRAIN_MAX_RESOLUTION = 2048  # no SD3.5 checkpoint was trained past ~1440 px a side
# Aspect buckets as (width units, height units): the Generate tab's common ratios, both ways round.
SD3_TRAIN_BUCKET_RATIOS = ((1, 1), (4, 3), (3, 4), (3, 2), (2, 3), (16, 9), (9, 16))
SD3_TRAIN_DEFAULT_RANK = 16  # enough for a subject or a style; alpha defaults to the rank (scale 1)
SD3_TRAIN_MAX_RANK = 256
# Module groups LoRA can wrap; "attn" (the image stream's attention projections) is the default.
SD3_TRAIN_LORA_LAYER_GROUPS = {
    "attn": ("to_q", "to_k", "to_v", "to_out.0"),
    "context": ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"),  # the text stream's projections
    "ff": ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"),
}
SD3_TRAIN_DEFAULT_LORA_LAYERS = ("attn",)
SD3_TRAIN_DEFAULT_LEARNING_RATE = 1e-4  # diffusers' SD3 DreamBooth LoRA default
SD3_TRAIN_MAX_LEARNING_RATE = 1e-2
SD3_TRAIN_DEFAULT_STEPS = 1000  # optimiser updates; a DreamBooth subject needs ~500-1500
SD3_TRAIN_MAX_STEPS = 100_000
SD3_TRAIN_DEFAULT_WARMUP_STEPS = 0  # linear warmup, then the schedule below
SD3_TRAIN_LR_SCHEDULERS = ("constant", "cosine", "linear")  # diffusers' get_scheduler names
SD3_TRAIN_DEFAULT_LR_SCHEDULER = "constant"  # diffusers' SD3 DreamBooth LoRA default
SD3_TRAIN_DEFAULT_BATCH_SIZE = 1  # images per micro-batch per process (all from one aspect bucket)
SD3_TRAIN_MAX_BATCH_SIZE = 64
SD3_TRAIN_MAX_GRADIENT_ACCUMULATION = 128
SD3_TRAIN_MAX_GRAD_NORM = 1.0  # gradient clipping
SD3_TRAIN_ADAM_WEIGHT_DECAY = 1e-4  # diffusers' SD3 DreamBooth default
SD3_TRAIN_MIXED_PRECISION = ("auto", "no", "bf16", "fp16")  # auto: bf16 on CUDA (fp16 before Ampere), none on CPU
# Timestep sampling / loss weighting (SD3 paper, section 3.1). logit_normal(0, 1) is the paper's choice:
# timesteps drawn from a logit-normal density, unit loss weight. sigma_sqrt and cosmap draw uniformly
# and weight the loss instead; mode draws from the paper's heavy-tailed mode density; none is uniform.
SD3_TRAIN_WEIGHTING_SCHEMES = ("logit_normal", "mode", "cosmap", "sigma_sqrt", "none")
SD3_TRAIN_DEFAULT_WEIGHTING = "logit_normal"
SD3_TRAIN_LOGIT_MEAN = 0.0
SD3_TRAIN_LOGIT_STD = 1.0
SD3_TRAIN_MODE_SCALE = 1.29  # the paper's value for the mode density
SD3_TRAIN_T5_TOKENS = 77  # T5 tokens per caption: BLIP captions are short, and 77 keeps the cache small
SD3_TRAIN_ENCODE_BATCH = 8  # captions or images per encoder pass while precomputing
SD3_TRAIN_DEFAULT_CHECKPOINT_EVERY = 250  # steps between resumable checkpoints (0 = only the final adapter)
SD3_TRAIN_DEFAULT_VALIDATION_EVERY = 250  # steps between validation images (needs a validation prompt)
SD3_TRAIN_DEFAULT_LOG_EVERY = 10  # steps between log lines
SD3_TRAIN_MAX_PROMPT_CHARS = 1000  # trigger and validation prompt
SD3_TRAIN_EVAL_SIGMAS = (0.25, 0.5, 0.75)  # fixed noise levels of the held-out loss

# --- a public instance: shared GPU, hostile input (components/*, pipelines/sd3/) ----
# Every event that runs a model shares this concurrency id, so with STUDIO_CONCURRENCY=1 two
# models never run at once on the GPU by accident: a caption waits for a generation and vice versa.
GPU_CONCURRENCY_ID = "gpu"
# Suggested after an out-of-memory error when the planner cannot name a smaller mode for the request.
OOM_FALLBACK_MEMORY_MODE = "nf4-t5nf4-offload"
# What one visitor's SD3.5 job may cost on a public instance, in image-steps at the model's default size
# (steps x images x pixels / 1024², pipelines/quotas.job_cost; the tiny models' 128² under --tiny). 160 lets
# every model's preset run 4 images at 1024² (Medium's 40 steps is the most; Large's 28 costs 112, about
# 26 s on an H100 at the 11.6 s per 50 steps of DESIGN's anchor); 160 on Large is about 37 s. The most the
# other limits allow, 100 steps x 4 images at Medium's 2 MP, costs 800: minutes of GPU. Local runs: no bound.
MAX_PUBLIC_JOB_COST = _env_int("STUDIO_MAX_JOB_COST", 160, ceiling=800)
MAX_EVALUATION_SEEDS = 10  # seeds in one Round trip evaluation run; each seed draws every prompt once
# Images one Round trip evaluation run may draw (models x seeds x prompts), all inside the GPU slot:
# 60 is two models over the 30 built-in prompts: at the published 11.6 s per SD3.5 Large image
# (H100, 1024², 50 steps) about 12 minutes.
MAX_EVALUATION_IMAGES = _env_int("STUDIO_MAX_EVALUATION_IMAGES", 60, ceiling=1000)
# Pillow formats an upload may be decoded as. Pillow reads many more (EPS through Ghostscript, PSD,
# ICO, ...); each is code a stranger's file could reach, and no tab needs them.
UPLOAD_IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")

# --- BLIP LoRA adapters (pipelines/blip/adapters, the Caption and Batch tabs) -------
# Where adapter folders are found by name: STUDIO_BLIP_ADAPTER_DIR, else adapters/ beside
# the code. In --tiny mode without the variable, <tiny root>/blip-adapters (holding tiny-demo).
BLIP_ADAPTER_DIR_ENV = "STUDIO_BLIP_ADAPTER_DIR"
BLIP_ADAPTER_DIR = Path(os.environ.get(BLIP_ADAPTER_DIR_ENV) or Path(__file__).resolve().parent.parent / "adapters")
# One adapter's weights. A rank-64 LoRA on every attention layer of BLIP base is ~40 MB;
# BLIP large's text decoder is the same width, so 512 MB leaves room and stops a stray upload.
MAX_BLIP_ADAPTER_BYTES = _env_int("STUDIO_MAX_BLIP_ADAPTER_MB", 512, ceiling=2048) * 1024 * 1024
MAX_BLIP_ADAPTER_CONFIG_BYTES = 1024 * 1024  # adapter_config.json is a few kB
MAX_BLIP_ADAPTERS = 16  # loaded at once; each adds its LoRA layers to every decoder pass it is active in

# --- BLIP caption-LoRA training (pipelines/training/train_blip_lora) ----------------
# LoRA wraps these projections of the text decoder's self-attention ("self") and
# cross-attention ("cross"); "dense" is each attention block's output projection.
BLIP_TRAIN_TARGET_PROJECTIONS = ("query", "key", "value", "dense")
BLIP_TRAIN_ATTENTION_KINDS = ("self", "cross")
BLIP_TRAIN_DEFAULT_RANK = 16
BLIP_TRAIN_MAX_RANK = 256
BLIP_TRAIN_DEFAULT_LEARNING_RATE = 1e-4  # peft's LoRA examples for captioning models use 1e-4 to 5e-4
BLIP_TRAIN_MAX_LEARNING_RATE = 1e-1
BLIP_TRAIN_DEFAULT_EPOCHS = 5
BLIP_TRAIN_MAX_EPOCHS = 1000
BLIP_TRAIN_MAX_STEPS = 1_000_000
BLIP_TRAIN_DEFAULT_BATCH_SIZE = 8  # captions per micro-batch per process; image features are precomputed
BLIP_TRAIN_MAX_BATCH_SIZE = 256
BLIP_TRAIN_MAX_GRADIENT_ACCUMULATION = 128
BLIP_TRAIN_SCHEDULES = ("cosine", "constant")  # both after a linear warmup
BLIP_TRAIN_DEFAULT_WARMUP_STEPS = 0
BLIP_TRAIN_MAX_GRAD_NORM = 1.0
BLIP_TRAIN_WEIGHT_DECAY = 0.01
BLIP_TRAIN_MIXED_PRECISION = ("auto", "no", "bf16", "fp16")  # auto: bf16 on CUDA (fp16 before Ampere), fp32 on CPU
BLIP_TRAIN_DEFAULT_VALIDATION_SPLIT = 0.1
BLIP_TRAIN_SAMPLE_CAPTIONS = 3  # validation images captioned by the base model and the adapter at each validation
BLIP_TRAIN_DEFAULT_VALIDATION_EVERY = 100  # steps; and always at the end
BLIP_TRAIN_DEFAULT_CHECKPOINT_EVERY = 500  # steps between resumable checkpoints (0 = only the final adapter)
BLIP_TRAIN_DEFAULT_LOG_EVERY = 10
# Word pieces that BERT's uncased vocabulary cannot spell become [UNK]; above this share
# of all caption pieces the trainer warns before training (the adapter cannot learn them).
BLIP_TRAIN_UNKNOWN_TOKEN_WARNING = 0.05

# --- LoRA (pipelines/lora/library, pipelines/lora/formats) --------------------------
# Local LoRA files are read from this folder (app.py's --lora-dir); names resolve inside it only.
DEFAULT_LORA_DIR = "loras"
# Curated SD3.5 LoRAs (repo, weight file, trigger words, default scale, bases, source page, licence).
LORA_REGISTRY_PATH = Path(__file__).resolve().parent.parent / "assets" / "loras.json"
# Bytes accepted for one LoRA file. A rank-128 LoRA for Large is ~0.9 GB; 2 GiB leaves room for
# higher ranks without letting a full checkpoint (16 GB) in by mistake.
MAX_LORA_BYTES = _env_int("STUDIO_MAX_LORA_MB", 2048, ceiling=4096) * 1024 * 1024
# LoRAs mixed into one image; each adds a LoRA branch to every layer it touches (unless fused).
MAX_ACTIVE_LORAS = _env_int("STUDIO_MAX_ACTIVE_LORAS", 4, ceiling=8)
# LoRAs kept loaded per model; each keeps its converted weights in CPU memory for reloads.
MAX_LOADED_LORAS = _env_int("STUDIO_MAX_LOADED_LORAS", 8, ceiling=32)
# Largest weight (either sign) per LoRA, after lora_scale; past ~2 most LoRAs burn the image.
MAX_LORA_WEIGHT = 3.0
DEFAULT_LORA_SCALE = 1.0  # a LoRA's weight when neither the registry nor the request gives one
MAX_LORA_NAME_CHARS = 48  # adapter names are [a-z0-9_], derived from the file or registry name
# A shared LoRA (the operator's folder) nobody drew with for this long may make room for a visitor's
# when every slot is full, so a burst of loads cannot keep the slots forever; 30 minutes of quiet.
SHARED_LORA_IDLE_SECONDS = _env_int("STUDIO_SHARED_LORA_IDLE_SECONDS", 1800, ceiling=7 * 24 * 3600)
# Hub LoRAs a visitor names are downloaded into <work root>/VISITOR_HUB_DIR (never the operator's Hugging
# Face cache), one folder per download, deleted once loaded or refused. Bytes one client (and all clients
# together) may have charged for the Hub LoRAs they keep loaded: one maximum-size LoRA per client by
# default, four in all; past it they unload one of theirs (or wait for the LRU to evict one).
VISITOR_HUB_DIR = "hub-visitors"
MAX_HUB_BYTES_PER_CLIENT = _env_int("STUDIO_MAX_HUB_MB_PER_CLIENT", 2048, ceiling=4096) * 1024 * 1024
MAX_HUB_BYTES_TOTAL = _env_int("STUDIO_MAX_HUB_MB_TOTAL", 8192, ceiling=32768) * 1024 * 1024
TRAIN_TAB_DEFAULT_STEPS = 500  # a DreamBooth-style LoRA on 10-30 images converges in a few hundred steps
TRAIN_TAB_DEFAULT_RESOLUTION = 1024  # SD3.5's native size; lower (512, 768) trains faster
TRAIN_TAB_POLL_SECONDS = 2.0  # how often the Train tab reads a running run's log

# --- public instances (Spaces, share links) -----------------------------------------
# Gradio's cache of files handed to visitors: checked every CACHE_SECONDS, files older than that are
# deleted (Blocks(delete_cache=...)). Session folders under the work root (pipelines/workspace) unused
# for as long are swept too.
CACHE_SECONDS = _env_int("STUDIO_CACHE_SECONDS", 3600, ceiling=7 * 24 * 3600)
DELETE_CACHE = (CACHE_SECONDS, CACHE_SECONDS)
# Every Space sets SPACE_ID; public mode then starts on its own. STUDIO_PUBLIC=0 turns it off
# (a private Space), STUDIO_PUBLIC=1 or --public turns it on anywhere.
PUBLIC_ENV = "STUDIO_PUBLIC"
# In public mode visitors may start training runs only when the operator allows it.
PUBLIC_TRAINING_ENV = "STUDIO_PUBLIC_TRAINING"
# Uploaded SD3.5 LoRAs (per model) and uploaded BLIP adapters one visitor (session) may keep loaded.
# Past it the visitor unloads one of their own; when all slots (MAX_LOADED_LORAS, MAX_BLIP_ADAPTERS)
# are full, the least recently used upload of anyone makes room (pipelines/ownership).
MAX_UPLOADS_PER_SESSION = _env_int("STUDIO_MAX_UPLOADS_PER_SESSION", 4, ceiling=16)
# Who counts as one client for quotas (pending jobs, bytes kept): never the session hash, which the
# client picks. Behind a proxy (a Space) the address is read from X-Forwarded-For, this many entries
# from its right end: each trusted proxy appends the address it saw, and what stands left of them is the
# client's own word. 1 on a Space (its one front proxy), 0 elsewhere (the socket's peer address).
TRUSTED_PROXY_HOPS_ENV = "STUDIO_TRUSTED_PROXY_HOPS"


def trusted_proxy_hops(environ: dict[str, str] | None = None) -> int:
    """How many proxies in front of the app append to X-Forwarded-For ($STUDIO_TRUSTED_PROXY_HOPS)."""
    environ = os.environ if environ is None else environ
    raw = str(environ.get(TRUSTED_PROXY_HOPS_ENV, "")).strip()
    if raw.isdigit():
        return min(int(raw), 8)
    return 1 if environ.get("SPACE_ID") else 0


def public_mode(flag: bool = False, environ: dict[str, str] | None = None) -> bool:
    """Whether the Studio serves anonymous visitors: ``--public``, $STUDIO_PUBLIC, or a Space's $SPACE_ID."""
    environ = os.environ if environ is None else environ
    explicit = str(environ.get(PUBLIC_ENV, "")).strip().lower()
    if explicit in ("0", "false", "no", "off"):
        return bool(flag)  # the operator's own flag still wins over a "private" environment
    if flag or explicit in ("1", "true", "yes", "on"):
        return True
    return bool(environ.get("SPACE_ID"))


def public_training_allowed(environ: dict[str, str] | None = None) -> bool:
    """Whether visitors of a public instance may train ($STUDIO_PUBLIC_TRAINING=1)."""
    environ = os.environ if environ is None else environ
    return str(environ.get(PUBLIC_TRAINING_ENV, "")).strip().lower() in ("1", "true", "yes", "on")
