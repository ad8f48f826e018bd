"""LD_PRELOAD merging: configured first, each entry once, ld.so's separators and tokens."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from vgpu_launch.trace import preload

lib = st.text(alphabet="abcxyz/._-$", min_size=1, max_size=12).map(str.encode)


def test_split_accepts_colons_and_spaces() -> None:
    """LD_PRELOAD splits on colons and spaces, as ld.so reads it."""
    assert preload.split(b"/a.so /b.so::/c.so  ") == [b"/a.so", b"/b.so", b"/c.so"]
    assert preload.split(None) == []
    assert preload.split(b"") == []


def test_merge_puts_configured_first_and_keeps_the_rest_once() -> None:
    """Merging puts the configured libraries first and keeps the rest, once each."""
    assert preload.merge([b"/shim.so"], [b"/other.so /shim.so"]) == b"/shim.so:/other.so"
    assert preload.merge([b"/shim.so"], []) == b"/shim.so"
    assert preload.merge([b"/a.so", b"/b.so"], [b"/b.so", b"/c.so:/a.so"]) == b"/a.so:/b.so:/c.so"


def test_merge_keeps_tokens_unexpanded() -> None:
    """Merging keeps $LIB and other tokens as they are."""
    assert preload.merge([b"/opt/$LIB/shim.so"], [None]) == b"/opt/$LIB/shim.so"


@given(st.lists(lib, min_size=1, max_size=4), st.lists(st.lists(lib, max_size=5), max_size=3))
def test_merge_properties(configured: list[bytes], existing: list[list[bytes]]) -> None:
    """For any inputs, merging keeps every entry once, configured first."""
    values = [b":".join(e) for e in existing]
    merged = preload.split(preload.merge(configured, values))
    # every entry exactly once
    assert len(merged) == len(set(merged))
    # configured libraries first, in order
    want = list(dict.fromkeys(configured))
    assert merged[: len(want)] == want
    # nothing lost, nothing invented
    assert set(merged) == set(configured) | {e for v in values for e in preload.split(v)}
    assert preload.contains_all(configured, b":".join(merged))


def test_expand_like_ld_so() -> None:
    """Tokens expand as ld.so expands them; $ORIGIN cannot be."""
    path = "/opt/vgpu/$LIB/${PLATFORM}/libvgpu.so"
    assert (
        preload.expand(path, lib="lib/x86_64-linux-gnu", platform="x86_64")
        == "/opt/vgpu/lib/x86_64-linux-gnu/x86_64/libvgpu.so"
    )
    assert preload.expand("$ORIGIN/x.so", lib="lib", platform="i686") is None
    assert preload.expand("$ORIGIN/x.so", lib="lib", platform="i686", origin="/bin") == "/bin/x.so"
    assert preload.has_tokens("/a/$LIB/b.so") and not preload.has_tokens("/a/LIB/b.so")
