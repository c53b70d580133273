"""Vision-encoder features kept per image, so tabs that look at the same image encode it once.

The ViT is most of what BLIP spends on an image (about 1 s of the CPU's 1.6 s
for a greedy caption). Caption, Match and Attention often see the same upload
one after the other; keying its features by the processed pixels' content and
the model lets each of them reuse what the previous one computed.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable

import torch

from pipelines import settings


def model_identity(model: torch.nn.Module, source: str) -> tuple:
    """What makes one loaded model's features differ from another's: class, source, weights, dtype, device."""
    return (type(model).__name__, source, id(model), str(model.dtype), str(model.device))


def pixel_digest(pixels: torch.Tensor) -> str:
    """sha256 of one image's preprocessed pixels, with their shape and dtype.

    The processed tensor, not the upload, is hashed: two files that decode to
    the same pixels share features, and a processor change can never serve
    features of differently prepared pixels.
    """
    tensor = pixels.detach().to("cpu").contiguous()
    digest = hashlib.sha256(f"{tuple(tensor.shape)}|{tensor.dtype}|".encode())
    digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # raw bytes; works for bf16 too
    return digest.hexdigest()


class ImageFeatureCache:
    """A thread-safe LRU map from (model identity, pixel digest) to vision features.

    ``hits`` and ``misses`` count lookups, so tests and the System tab can see
    that the cache works without relying on timing.
    """

    def __init__(self, max_entries: int = settings.IMAGE_FEATURE_CACHE_ENTRIES) -> None:
        if max_entries < 0:
            raise ValueError(f"max_entries must be 0 (no cache) or more, not {max_entries}.")
        self.max_entries = max_entries
        self._entries: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> torch.Tensor | None:
        """The features stored under ``key`` (now the most recently used), or None."""
        with self._lock:
            features = self._entries.get(key)
            if features is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return features

    def put(self, key: Hashable, features: torch.Tensor) -> None:
        """Store ``features`` (never modified afterwards) and drop the least recently used past the cap."""
        if self.max_entries == 0:
            return
        with self._lock:
            self._entries[key] = features
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def features(
        self, identity: Hashable, pixel_values: torch.Tensor, encode: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """``encode(pixel_values)``, computing only the images not stored yet and storing those.

        ``pixel_values`` is (batch, 3, H, W); ``encode`` maps such a batch to
        (batch, tokens, hidden). The result may share memory with the cache:
        read it, never modify it in place.
        """
        keys = [(identity, pixel_digest(pixels)) for pixels in pixel_values]
        found = [self.get(key) for key in keys]
        missing = [index for index, features in enumerate(found) if features is None]
        if missing:
            with torch.inference_mode():  # a stored tensor must never hold an autograd graph
                computed = encode(pixel_values[missing])
            for row, index in enumerate(missing):
                # A copy of the row, so one stored image never keeps its whole batch alive.
                found[index] = computed if len(missing) == 1 else computed[row : row + 1].clone()
                self.put(keys[index], found[index])
        return torch.cat(found) if len(found) > 1 else found[0]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
