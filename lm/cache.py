"""What runs measure once per machine (the matmul peak, the faster attention, what compiling costs and
saves, whether Inductor can build here), kept in CACHE_DIR as small JSON files of entries by key.

A cache may only make a run faster: an entry that can't be read, or holds the wrong kind of value, is
measured again; a file that can't be written is a warning and the run goes on. Writers take a lock
around their read-modify-write, so runs that measure at once keep each other's entries.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

from lm.output import write_json


def recalled(cache_dir: Path | str | None, filename: str, key: str) -> dict:
    """The numbers cache_dir/filename keeps under `key`, or {} (no file, unreadable, not an entry).
    Values that are not finite numbers are dropped: the caller measures what it misses."""
    entry = read_entries(Path(cache_dir) / filename if cache_dir is not None else None).get(key)
    if not isinstance(entry, dict):
        return {}
    return {k: v for k, v in entry.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def measured(cache_dir: Path | str | None, filename: str, key: str, measure, needs: tuple[str, ...]) -> dict:
    """measure()'s dict of numbers, kept under `key` in cache_dir/filename and read from there next time,
    when the kept entry has every field of `needs` (None: nothing kept)."""
    known = recalled(cache_dir, filename, key)
    if all(name in known for name in needs):
        return known
    result = measure()
    remember(cache_dir, filename, key, result)
    return result


def remember(cache_dir: Path | str | None, filename: str, key: str, entry: dict) -> None:
    """Add `entry`, and when it was measured, to what cache_dir/filename keeps under `key` (None: keep nothing).
    A cache that can't be written costs a warning: the next run measures again."""
    if cache_dir is None:
        return
    path = Path(cache_dir) / filename
    try:
        with locked(path):
            known = read_entries(path)  # read under the lock: another run may have added its entry meanwhile
            old = known.get(key) if isinstance(known.get(key), dict) else {}
            known[key] = {**old, **entry, "measured": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            write_json(path, known)
    except OSError as e:
        print(f"warning: could not keep a measurement in {path} ({e.strerror or e}); the next run measures "
              "again", file=sys.stderr)


def read_entries(path: Path | None) -> dict:
    """A cache file's entries, or {} when there are none or the file is unreadable."""
    try:
        data = json.loads(path.read_text()) if path is not None else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@contextlib.contextmanager
def locked(path: Path):
    """Hold an exclusive lock on `path`'s lock file (.NAME.lock beside it) for the block (none where the
    platform has no flock)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: last writer wins
        yield
        return
    fd = os.open(path.parent / f".{path.name}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock
