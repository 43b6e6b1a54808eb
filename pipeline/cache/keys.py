"""Sample keys: source paths made into tar member names that survive WebDataset's "key = path up
to the first dot" rule and cannot leave the archive when users extract it (re-exported by
``pipeline.cache.schema``)."""

from __future__ import annotations


def sample_key(relpath: str) -> str:
    """Relative image path -> tar sample key: extension dropped, '%' and '.' escaped (reversible)."""
    stem = relpath.rsplit(".", 1)[0] if "." in relpath.rsplit("/", 1)[-1] else relpath
    return stem.replace("%", "%25").replace(".", "%2E")


def unsafe_key_reason(key: str) -> str | None:
    """Why ``key`` must not name members of our shards (None when it may). Shards are tars users may
    extract with ``tar``: a key is a relative path that stays inside the archive, in printable UTF-8."""
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        return "not valid UTF-8"
    if key.startswith("/"):
        return "absolute path"
    if any(part in ("", ".", "..") for part in key.split("/")):
        return "has an empty, '.' or '..' path component"
    if "\\" in key or any(ord(c) < 32 or ord(c) == 127 for c in key):
        return "has a backslash or control character"
    return None


def member_name(key: str, ext: str) -> str:
    return f"{key}.{ext}"
