"""UI pieces every tab uses: a safe image input and the error boundary."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import gradio as gr
import torch

from pipelines.manager import ModelLoadError

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
    from typing import Callable, Literal, Sequence, Any, TYPE_CHECKING
    from gradio.blocks import Block
    if TYPE_CHECKING:
        from gradio.components import Timer
        from gradio.components.base import Component

def user_errors(function: Callable) -> Callable:
    """Turn the pipelines' errors into ``gr.Error`` sentences; log anything unexpected.

    ValueError and ModelLoadError already carry a sentence for the user. An
    out-of-memory error frees cached memory and suggests a fix. Anything else is
    logged with its traceback and reported without internals, so the app keeps
    serving and the user keeps what they already produced.
    """

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except gr.Error:
            raise
        except (ValueError, ModelLoadError) as error:
            raise gr.Error(str(error), print_exception=False) from None
        except torch.OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise gr.Error(
                "Out of memory: try fewer captions/images, a smaller size, or unload other models.",
                print_exception=False,
            ) from None
        except Exception as error:
            logger.exception("unexpected error in %s", function.__name__)
            raise gr.Error(
                f"Something went wrong ({type(error).__name__}); the server log has details. Try again, "
                "or with other settings.",
                print_exception=False,
            ) from None

    return wrapper
