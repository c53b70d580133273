"""UI pieces every tab uses: a safe image input and the error boundary."""

from __future__ import annotations

import functools
import gc
import inspect
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import gradio as gr
import torch

from pipelines import ownership, settings
from pipelines.errors import ModelLoadError
from pipelines.sd3.jobs import GenerationRequest

logger = logging.getLogger(__name__)


class UploadedImage(gr.Image):
    """An image input that hands the upload's file path to our code undecoded.

    ``gr.Image`` decodes every upload with PIL before the event function runs,
    so a corrupt or hostile file fails inside Gradio and an API client only sees
    "The upstream Gradio app has raised an exception". Passing the path lets
    ``pipelines.images.load_image`` check size, format and integrity first and
    answer with a sentence the user can act on.
    """

    def get_block_name(self) -> str:
        return "image"  # render with the stock Image front end

    def get_config(self, cls=None):
        return super().get_config(cls or gr.Image)  # the front end's props are Image's

    def preprocess(self, payload):
        if payload is None:
            return None
        if payload.url and payload.url.startswith("data:"):
            import base64

            return base64.b64decode(payload.url.split(",", 1)[-1])
        return payload.path


def user_errors(function: Callable) -> Callable:
    """Turn the pipelines' errors into ``gr.Error`` sentences; log anything unexpected.

    ValueError and ModelLoadError already carry a sentence for the user. An
    out-of-memory error frees cached memory and suggests a fix. Anything else is
    logged with its traceback and reported without internals, so the app keeps
    serving and the user keeps what they already produced.
    """

    # The user's error is raised after the except block, not inside it: only then are the failed
    # call's frames, and the GPU tensors they hold, released, so emptying the CUDA cache frees them.
    if inspect.isgeneratorfunction(function):

        @functools.wraps(function)
        def streaming_wrapper(*args, **kwargs):
            try:
                yield from function(*args, **kwargs)
                return
            except Exception as error:
                user_error = _as_user_error(function, error)
            _after_error(user_error)
            raise user_error

        return streaming_wrapper

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except Exception as error:
            user_error = _as_user_error(function, error)
        _after_error(user_error)
        raise user_error

    return wrapper


OUT_OF_MEMORY_MESSAGE = (
    "The GPU ran out of memory and its cache was emptied; try again with a smaller size, fewer images or a "
    "smaller batch, a memory-saving mode (quantization or offload), or unload other models in the System tab."
)


class _OutOfMemoryError(gr.Error):
    """The user's error for a torch out-of-memory error; the CUDA cache is emptied once it is raised."""


def _after_error(user_error: gr.Error) -> None:
    if isinstance(user_error, _OutOfMemoryError):
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _as_user_error(function: Callable, error: Exception) -> gr.Error:
    user_error = _user_error(function, error)
    # A toast that fades after 10 s leaves a bare "Error" badge behind: the sentence stays until closed.
    user_error.duration = None
    return user_error


def _user_error(function: Callable, error: Exception) -> gr.Error:
    if isinstance(error, gr.Error):
        return error
    if isinstance(error, (ValueError, ModelLoadError)):
        return gr.Error(str(error), print_exception=False)
    if isinstance(error, torch.OutOfMemoryError):
        logger.warning(
            "out of GPU memory in %s: %s", function.__name__, str(error).splitlines()[0] if str(error) else ""
        )
        return _OutOfMemoryError(OUT_OF_MEMORY_MESSAGE, print_exception=False)
    logger.error("unexpected error in %s", function.__name__, exc_info=error)
    return gr.Error(
        f"Something went wrong ({type(error).__name__}); the server log has details. Try again, or with other settings.",
        print_exception=False,
    )


class LastErrors:
    """The sentence of each session's last failed event, for a status line beside the button that failed.

    ``watch`` wraps an event function (after ``named_endpoint``) and keeps the sentence of the
    ``gr.Error`` it raises, by session; the event's ``.failure`` listener shows it with ``take``.
    Only sentences the server wrote are kept, and at most ``limit`` sessions (the oldest go first).
    """

    limit = 1000  # sessions with an error not shown yet; each holds one sentence

    def __init__(self) -> None:
        self._sentences: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def record(self, request, sentence: str) -> None:
        session = getattr(request, "session_hash", None) or "api"
        with self._lock:
            self._sentences[session] = sentence
            self._sentences.move_to_end(session)
            while len(self._sentences) > self.limit:
                self._sentences.popitem(last=False)

    def take(self, request: gr.Request) -> str:
        """The session's last error as a status line ("" if none), forgotten once taken."""
        session = getattr(request, "session_hash", None) or "api"
        with self._lock:
            sentence = self._sentences.pop(session, "")
        # The sentence can name what the visitor sent (a file, a LoRA name): shown as text, never as Markdown.
        return f"⚠️ {markdown_text(sentence)}" if sentence else ""

    def watch(self, function: Callable) -> Callable:
        """``function`` (a Gradio event function with a ``gr.Request`` parameter) that records its errors."""

        def request_in(args, kwargs):
            return next((value for value in [*args, *kwargs.values()] if isinstance(value, gr.Request)), None)

        if inspect.isgeneratorfunction(function):

            @functools.wraps(function)
            def streaming_watched(*args, **kwargs):
                try:
                    yield from function(*args, **kwargs)
                except gr.Error as error:
                    self.record(request_in(args, kwargs), error.message)
                    raise

            return streaming_watched

        @functools.wraps(function)
        def watched(*args, **kwargs):
            try:
                return function(*args, **kwargs)
            except gr.Error as error:
                self.record(request_in(args, kwargs), error.message)
                raise

        return watched

    def show_on(self, event, status: gr.components.Component) -> None:
        """After ``event``: its error sentence in ``status`` if it failed, ``status`` cleared if it succeeded."""
        # No progress timer on the status line: it would flash "0.0s" where the sentence goes.
        quiet = {"queue": False, "api_visibility": "private", "show_progress": "hidden"}
        event.failure(self.take, inputs=None, outputs=status, **quiet)
        event.success(lambda: "", inputs=None, outputs=status, **quiet)


def on_gpu(duration: Callable[..., int]) -> Callable[[Callable], Callable]:
    """``spaces.GPU(duration=...)`` on Hugging Face ZeroGPU Spaces; nothing elsewhere.

    ``duration`` receives the event function's arguments and returns seconds.
    """
    try:
        import spaces  # only installed on Spaces
    except ImportError:
        return lambda function: function
    return lambda function: spaces.GPU(duration=duration)(function)


def named_endpoint(function: Callable, parameters: list[inspect.Parameter]) -> Callable:
    """Wrap ``function(**kwargs)`` as a Gradio event function whose API parameters are ``parameters``.

    Gradio passes component values positionally and names API parameters after
    the function's signature; this lets one keyword function serve any list of
    inputs (e.g. every CaptionRequest field) while API clients see real names
    and defaults: ``client.predict(image, num_beams=5, api_name="/caption")``.
    Parameters annotated ``gr.Request`` or defaulting to ``gr.Progress()`` are
    filled in by Gradio, as usual. Errors go through ``user_errors``.
    """
    names = [parameter.name for parameter in parameters]

    if inspect.isgeneratorfunction(function) or inspect.isgeneratorfunction(getattr(function, "__wrapped__", None)):

        def endpoint(*values):
            yield from function(**dict(zip(names, values, strict=True)))

    else:

        def endpoint(*values):
            return function(**dict(zip(names, values, strict=True)))

    endpoint.__name__ = function.__name__
    endpoint.__doc__ = function.__doc__
    endpoint.__signature__ = inspect.Signature(parameters)
    endpoint.__annotations__ = {
        parameter.name: parameter.annotation
        for parameter in parameters
        if parameter.annotation is not inspect.Parameter.empty
    }
    return user_errors(endpoint)


def parameter(name: str, default=inspect.Parameter.empty, annotation=inspect.Parameter.empty) -> inspect.Parameter:
    """A positional-or-keyword parameter for ``named_endpoint``."""
    return inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default, annotation=annotation)


class ValidatedSlider(gr.Slider):
    """A slider whose value reaches the pipelines' validation exactly as it was sent.

    Gradio's own bounds check answers an API client with a bare "exception"
    (no sentence), and cannot know model-dependent ranges; the pipelines check
    every number anyway and say what the range is.
    """

    @classmethod
    def over(cls, limits: settings.NumberRange, value, label: str, **kwargs) -> ValidatedSlider:
        """A slider over the validation range ``limits`` (settings), so the two cannot drift apart."""
        return cls(limits.slider_minimum, limits.high, value=value, step=limits.step, label=label, **kwargs)

    def get_block_name(self) -> str:
        return "slider"

    def get_config(self, cls=None):
        return super().get_config(cls or gr.Slider)

    def preprocess(self, payload):
        return payload


class ValidatedNumber(gr.Number):
    """A number box whose value reaches the pipelines' validation as sent (see ValidatedSlider)."""

    def get_block_name(self) -> str:
        return "number"

    def get_config(self, cls=None):
        return super().get_config(cls or gr.Number)

    def preprocess(self, payload):
        return payload


def blank_to_none(value):
    """None for an empty input (None or blank text), else the value unchanged.

    Text boxes whose empty state means "the preset" send ""; a 0 stays a 0,
    so it reaches validation as the number it is.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return value


class StopRequests:
    """One Stop flag per browser session (API clients share the session "api").

    The long-running event clears its session's flag when it starts and polls
    it; the Stop button's unqueued event sets it. One user's Stop never ends
    another user's run.
    """

    def __init__(self) -> None:
        self._flags: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def flag(self, request) -> threading.Event:
        session = getattr(request, "session_hash", None) or "api"
        with self._lock:
            return self._flags.setdefault(session, threading.Event())

    def start(self, request) -> threading.Event:
        """The flag for a run that is starting, cleared."""
        flag = self.flag(request)
        flag.clear()
        return flag

    def stop(self, request) -> None:
        self.flag(request).set()


EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "assets" / "examples"


def example_photos(image: gr.components.Component) -> gr.Examples:
    """The sample photographs (with their licences in assets/examples) as examples for ``image``."""
    return gr.Examples(
        examples=sorted(str(path) for path in EXAMPLES_DIR.iterdir() if path.suffix in (".png", ".jpg")),
        inputs=image,
        label="Example photos (public domain / CC0, see assets/examples/LICENSES.md)",
    )


def download_folder(prefix: str) -> Path:
    """A fresh folder inside Gradio's file cache for files handed back to the visitor.

    Gradio serves a returned file from its cache; a file written there already is
    served as it is, without a copy, and goes with the rest of the cache
    (``delete_cache``), so no work folder of the app keeps a second copy.
    """
    import tempfile

    from gradio.utils import get_upload_folder

    cache = Path(get_upload_folder())
    cache.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=cache))


def launch_alone(build_tab: Callable, title: str) -> None:
    """Run one tab by itself on the tiny models (each tab module's ``__main__``)."""
    from pipelines.startup import build_studio

    with gr.Blocks(title=title) as demo:
        build_tab(build_studio(["--tiny"]))
    demo.queue().launch()


def visitor_id(request: gr.Request | None) -> str:
    """Who is asking: Gradio's session hash, one per browser page and one per ``gradio_client.Client``.

    Whatever a visitor creates (a training run, an uploaded LoRA or adapter, generated images) is
    owned by this id; others get "no such ..." for it. A call without a request (Python, tests)
    is the local owner.
    """
    session = getattr(request, "session_hash", None) if request is not None else None
    return str(session) if session else "local"


def client_identity(request: gr.Request | None) -> str:
    """Who counts as one client for quotas (pending jobs, bytes kept); "local" without a request.

    On a Space: the signed-in Hugging Face user, else the address its proxy forwards; elsewhere the
    socket's peer address (pipelines.ownership.client_key). Never the session hash: a client picks
    that itself, so a new one per call would escape every quota. Ownership is ``visitor_id``'s.
    """
    if request is None:
        return "local"
    headers = getattr(request, "headers", None) or {}
    client = getattr(request, "client", None)
    return ownership.client_key(
        peer=getattr(client, "host", None),
        forwarded_for=headers.get("x-forwarded-for"),
        user_name=getattr(request, "username", None),
        trusted_hops=settings.trusted_proxy_hops(),
    )


def generation_request(
    prompt, model, *, negative_prompt="", seed=-1, steps=None, guidance=None, width=None, height=None,
    max_sequence_length=settings.DEFAULT_T5_TOKENS, skip_layer_guidance=None, num_images=1, memory_mode=None,
    lora="", lora_scale=None, lora_fuse=False, preview_every=0,
) -> GenerationRequest:  # fmt: skip
    """The generation service's request from form or API values: a blank number means the model's preset,
    a missing seed a random one; everything else is checked by the service."""
    return GenerationRequest(
        prompt=prompt or "",
        model=model,
        negative_prompt=negative_prompt or "",
        seed=-1 if seed is None else seed,
        steps=blank_to_none(steps),
        guidance=blank_to_none(guidance),
        width=blank_to_none(width),
        height=blank_to_none(height),
        max_sequence_length=max_sequence_length,
        skip_layer_guidance=skip_layer_guidance,
        num_images=num_images,
        memory_mode=memory_mode,
        lora=lora or "",
        lora_scale=blank_to_none(lora_scale),
        lora_fuse=bool(lora_fuse),
        preview_every=preview_every,
    )


def t5_tokens_slider() -> ValidatedSlider:
    """The T5 prompt-length slider that Generate and the Round trip share (validation uses the same range)."""
    return ValidatedSlider(
        settings.MIN_T5_TOKENS,
        settings.MAX_T5_TOKENS,
        value=settings.DEFAULT_T5_TOKENS,
        step=1,
        label="T5 tokens (max_sequence_length)",
    )


_MARKDOWN_ESCAPES = str.maketrans({char: "\\" + char for char in "\\`*_{}[]()<>#+-.!|~&:\"'="})


def markdown_text(text) -> str:
    """``text`` (a visitor's words: a prompt, caption, trigger word or LoRA name) to put inside Markdown
    literally: Markdown and HTML punctuation is backslash-escaped and line breaks become spaces, so it
    never turns into a link, an image, HTML, a heading or emphasis on anyone's page."""
    return " ".join(str(text).splitlines()).translate(_MARKDOWN_ESCAPES)
