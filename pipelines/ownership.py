"""Who owns an uploaded LoRA or adapter, and which entry makes room when every slot is taken.

A public instance keeps one set of loaded LoRAs per SD3.5 model and one set of
BLIP adapters for every visitor. What the operator provides (their folders, their
own actions) is *shared*: everyone sees and uses it, nobody owns it. An *upload*
belongs to the visitor (``components.common.visitor_id``) who sent it: only they
see, use or unload it; on a public instance a LoRA a visitor names from the Hub
or the registry is theirs the same way (``pipelines.lora.library``). A visitor's
own entries are capped per visitor, and when all slots are full the least
recently used one (of anyone) is evicted to make room; a shared entry is evicted
only when nobody used it for ``idle_seconds`` (the caller's choice; never by default).

``UploadSlots`` keeps that book for one collection. It holds no lock: its owner
(``LoraLibrary``, ``BlipAdapterSet``) calls it under its own.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable

SHARED: str | None = None  # the owner of folder, registry and Hub entries
MAX_CLIENT_KEY_CHARS = 128  # a forwarded address or user name longer than this is cut, never trusted whole


def client_key(peer: str | None, forwarded_for: str | None, user_name: str | None, trusted_hops: int) -> str:
    """Who counts as one client for quotas: a signed-in user, else an address; never a session hash.

    ``peer`` is the socket's remote address; ``forwarded_for`` the X-Forwarded-For header;
    ``trusted_hops`` how many proxies in front of the app append to it (settings.trusted_proxy_hops).
    The address is the entry that many places from the right: the one the outermost trusted proxy
    saw. Entries further left are the client's own word and are never read. With fewer entries than
    hops (a request that did not come through the proxy), the peer address counts.
    Ownership of files and runs is a separate matter (``components.common.visitor_id``).
    """
    if user_name:
        return "user:" + str(user_name)[:MAX_CLIENT_KEY_CHARS]
    if trusted_hops > 0 and forwarded_for:
        # Split at most as far as needed from the right: a huge header costs no more than its last entries.
        entries = forwarded_for[-(trusted_hops * (MAX_CLIENT_KEY_CHARS + 2)) :].rsplit(",", trusted_hops)
        if len(entries) > trusted_hops:
            address = entries[-trusted_hops].strip()
            if address:
                return "addr:" + address[:MAX_CLIENT_KEY_CHARS]
    return "addr:" + str(peer or "unknown")[:MAX_CLIENT_KEY_CHARS]


def may_see(owner: str | None, visitor: str | None) -> bool:
    """Whether ``visitor`` may see and use an entry of ``owner``; ``visitor=None`` is the operator (sees all)."""
    return owner is SHARED or visitor is None or owner == visitor


class UploadSlots:
    """Owners and last use of the entries of one collection, by entry name.

    ``what`` names an entry in sentences ("LoRA", "BLIP adapter"); ``where`` says
    whose slots these are ("on SD3.5 Large", "") for the per-visitor cap.
    """

    def __init__(self, what: str, where: str = "", *, clock: Callable[[], float] = time.monotonic) -> None:
        self.what = what
        self.where = where
        self._owners: dict[str, str | None] = {}
        self._last_use: dict[str, int] = {}  # order of use (a counter: two uses never tie)
        self._used_at: dict[str, float] = {}  # when, by ``clock`` (seconds), for the idle test
        self._counter = itertools.count()
        self._clock = clock

    # -- the book

    def add(self, name: str, owner: str | None) -> None:
        self._owners[name] = owner
        self.touch(name)

    def remove(self, name: str) -> None:
        self._owners.pop(name, None)
        self._last_use.pop(name, None)
        self._used_at.pop(name, None)

    def clear(self) -> None:
        self._owners.clear()
        self._last_use.clear()
        self._used_at.clear()

    def touch(self, name: str) -> None:
        """Mark ``name`` as used now (loaded, chosen for an image or a caption)."""
        if name in self._owners:
            self._last_use[name] = next(self._counter)
            self._used_at[name] = self._clock()

    def idle_seconds(self, name: str) -> float:
        """Seconds since ``name`` was last used (0 for an unknown name)."""
        return max(0.0, self._clock() - self._used_at[name]) if name in self._used_at else 0.0

    def owner(self, name: str) -> str | None:
        return self._owners.get(name)

    def is_upload(self, name: str) -> bool:
        return self._owners.get(name) is not SHARED

    def visible(self, name: str, visitor: str | None) -> bool:
        return name in self._owners and may_see(self._owners[name], visitor)

    def visible_names(self, names: Iterable[str], visitor: str | None) -> list[str]:
        return [name for name in names if self.visible(name, visitor)]

    def uploads_of(self, visitor: str | None) -> list[str]:
        return [name for name, owner in self._owners.items() if owner is not SHARED and owner == visitor]

    # -- making room

    def check_visitor_cap(
        self, visitor: str | None, cap: int, *, shown: Callable[[str], str] = str, uploads_only: bool = True
    ) -> None:
        """ValueError when ``visitor`` already keeps ``cap`` entries of their own here (``visitor=None``: no cap).

        ``shown(name)`` is how the visitor knows an entry (its name as they gave it); ``uploads_only``
        False says "of your own" rather than "uploaded" (Hub and registry loads count too).
        """
        if visitor is None:
            return
        mine = self.uploads_of(visitor)
        if len(mine) >= cap:
            where = f" {self.where}" if self.where else ""
            whose = f"uploaded {self.what}s" if uploads_only else f"{self.what}s of your own"
            raise ValueError(
                f"You have {len(mine)} {whose} loaded{where} ({', '.join(map(shown, mine))}), the most one visitor "
                f"may keep (STUDIO_MAX_UPLOADS_PER_SESSION={cap}); unload one of them first."
            )

    def victim(self, capacity: int, keep: Iterable[str] = (), *, idle_seconds: float | None = None) -> str | None:
        """The entry to evict so one more fits in ``capacity`` slots; None when there is room.

        Candidates are the uploads (a visitor's own entries) and, with ``idle_seconds``, the shared
        entries nobody used for that long. The least recently used candidate goes first, preferring
        any outside ``keep`` (what the current image is drawn with). ValueError when there is none.
        """
        if len(self._owners) < capacity:
            return None
        candidates = [
            name
            for name in self._owners
            if self.is_upload(name) or (idle_seconds is not None and self.idle_seconds(name) >= idle_seconds)
        ]
        if not candidates:
            evicted = "which are never evicted" if idle_seconds is None else "all of them in use recently"
            raise ValueError(
                f"All {len(self._owners)} {self.what} slots hold shared {self.what}s, {evicted}; "
                "ask the operator to unload one, or try again later."
            )
        kept = set(keep)
        preferred = [name for name in candidates if name not in kept] or candidates
        return min(preferred, key=lambda name: self._last_use.get(name, -1))
