"""Recognising a Hub that cannot be reached (lrc.hub)."""

from __future__ import annotations

from lrc.hub import network_failure


def test_network_failures_are_recognised_through_their_causes():
    class LocalEntryNotFoundError(Exception):
        pass

    try:
        try:
            raise ConnectionRefusedError(111, "Connection refused")
        except OSError as inner:
            raise RuntimeError("download failed") from inner
    except RuntimeError as wrapped:
        assert network_failure(wrapped)
    assert network_failure(LocalEntryNotFoundError("not cached"))
    assert network_failure(TimeoutError("read timed out"))
    assert not network_failure(ValueError("bad shape"))
    assert not network_failure(FileNotFoundError(2, "No such file"))

