"""pipelines.ownership: who sees an upload, the per-visitor cap, and which upload makes room."""

from __future__ import annotations

import pytest

from pipelines import settings
from pipelines.ownership import SHARED, UploadSlots, client_key, may_see


def slots_with(*entries: tuple[str, str | None]) -> UploadSlots:
    slots = UploadSlots("LoRA", "on SD3.5 Large")
    for name, owner in entries:
        slots.add(name, owner)
    return slots


def test_shared_entries_are_everyones_uploads_their_owners_and_the_operator_sees_all():
    slots = slots_with(("style", SHARED), ("mine", "alice"), ("theirs", "bob"))
    assert slots.visible_names(["style", "mine", "theirs"], "alice") == ["style", "mine"]
    assert slots.visible_names(["style", "mine", "theirs"], "bob") == ["style", "theirs"]
    assert slots.visible_names(["style", "mine", "theirs"], None) == ["style", "mine", "theirs"]
    assert not slots.visible("missing", None)
    assert may_see(SHARED, "anyone") and may_see("alice", None) and not may_see("alice", "bob")
    assert slots.uploads_of("alice") == ["mine"] and slots.uploads_of("carol") == []
    assert not slots.is_upload("style") and slots.is_upload("theirs")


def test_a_visitor_at_the_cap_gets_a_sentence_naming_their_uploads():
    slots = slots_with(("a1", "alice"), ("a2", "alice"), ("b1", "bob"), ("shared", SHARED))
    with pytest.raises(ValueError, match=r"You have 2 uploaded LoRAs loaded on SD3.5 Large \(a1, a2\).*unload one"):
        slots.check_visitor_cap("alice", 2)
    slots.check_visitor_cap("bob", 2)  # one of their own: room for another
    slots.check_visitor_cap(None, 0)  # the operator has no cap


def test_the_least_recently_used_upload_makes_room_and_shared_entries_never_do():
    slots = slots_with(("shared", SHARED), ("a1", "alice"), ("b1", "bob"), ("c1", "carol"))
    assert slots.victim(capacity=5) is None  # room left: nobody goes
    assert slots.victim(capacity=4) == "a1"  # the oldest upload, whoever owns it
    slots.touch("a1")  # alice drew with it just now
    slots.touch("shared")  # using a shared one does not make it a candidate
    assert slots.victim(capacity=4) == "b1"
    assert slots.victim(capacity=4, keep=["b1"]) == "c1"  # what the current image uses stays if it can
    assert slots.victim(capacity=4, keep=["a1", "b1", "c1"]) == "b1"  # ...but room is made regardless
    slots.remove("b1")
    assert slots.victim(capacity=3) == "c1"


def test_slots_full_of_shared_entries_are_refused_with_a_sentence():
    slots = slots_with(("one", SHARED), ("two", SHARED))
    with pytest.raises(ValueError, match="All 2 LoRA slots hold shared LoRAs, which are never evicted"):
        slots.victim(capacity=2)


def test_a_client_is_its_signed_in_user_else_the_address_the_trusted_proxy_saw():
    # Local: the socket's peer; a forged header is never read.
    assert client_key("10.0.0.5", "6.6.6.6", None, trusted_hops=0) == "addr:10.0.0.5"
    # One trusted proxy: the last entry is what it saw; the entries left of it are the client's word.
    assert client_key("10.0.0.1", "6.6.6.6, 7.7.7.7, 203.0.113.9", None, trusted_hops=1) == "addr:203.0.113.9"
    assert client_key("10.0.0.1", "6.6.6.6, 203.0.113.9, 10.1.1.1", None, trusted_hops=2) == "addr:203.0.113.9"
    # Fewer entries than trusted hops: the request did not come through the proxies, so the peer counts.
    assert client_key("10.0.0.1", "203.0.113.9", None, trusted_hops=2) == "addr:10.0.0.1"
    # A signed-in user counts as one client whatever the address.
    assert client_key("10.0.0.1", "1.2.3.4", "alice", trusted_hops=1) == "user:alice"
    # A 1 MB header costs no more than its last entries, and the key stays short.
    huge = "9" * 1_000_000 + ", 198.51.100.7"
    assert client_key("10.0.0.1", huge, None, trusted_hops=1) == "addr:198.51.100.7"
    assert len(client_key("10.0.0.1", "x" * 10_000, None, trusted_hops=1)) <= 5 + 128


def test_the_trusted_proxy_hops_are_one_on_a_space_zero_elsewhere_and_bounded():
    assert settings.trusted_proxy_hops({}) == 0
    assert settings.trusted_proxy_hops({"SPACE_ID": "a/b"}) == 1
    assert settings.trusted_proxy_hops({"STUDIO_TRUSTED_PROXY_HOPS": "3"}) == 3
    assert settings.trusted_proxy_hops({"STUDIO_TRUSTED_PROXY_HOPS": "999"}) == 8
    assert settings.trusted_proxy_hops({"SPACE_ID": "a/b", "STUDIO_TRUSTED_PROXY_HOPS": "0"}) == 0


def test_a_shared_entry_idle_long_enough_makes_room_and_a_recent_one_does_not():
    now = [100.0]
    slots = UploadSlots("LoRA", clock=lambda: now[0])
    slots.add("old", SHARED)
    now[0] += 10
    slots.add("recent", SHARED)
    with pytest.raises(ValueError, match="All 2 LoRA slots hold shared LoRAs, all of them in use recently"):
        slots.victim(capacity=2, idle_seconds=60)
    now[0] += 55  # "old" idle 65 s, "recent" 55 s
    assert slots.victim(capacity=2, idle_seconds=60) == "old"
    with pytest.raises(ValueError, match="which are never evicted"):
        slots.victim(capacity=2)
    slots.touch("old")  # drawn with just now: no longer idle
    with pytest.raises(ValueError, match="in use recently"):
        slots.victim(capacity=2, idle_seconds=60)
