"""Atomic output directories for the converter and the exporter.

`atomic_directory(dst)` hands out a hidden temporary sibling `.NAME.tmp-PID-XXXXXXXX`, renames it to `dst` when the
block completes, and removes it on any error, on Ctrl-C (KeyboardInterrupt) and on SIGTERM (turned into SystemExit
for the duration of the block, so every clean-up runs). Before starting it removes what killed earlier runs left next
to `dst`: temporaries `.NAME.tmp-...` and displaced copies `.NAME.old-...` whose owning process is gone (the
orbax writer's own `.NAME.tmp-XXXXXXXX` carry no process id and are always stale by the time a new run starts).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import threading
import uuid
from collections.abc import Iterator

from indexcache_jax.checkpoint import check_destination

log = logging.getLogger("checkpoints_convert")


def _stale_name(name: str) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(name)}\.(?:tmp|old)-(?:(\d+)-)?[0-9a-f]{{8}}$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(dst: str | os.PathLike) -> list[str]:
    """Removes the temporaries of `dst`'s naming whose writer is gone; returns their paths."""
    parent, name = os.path.split(os.path.abspath(os.fspath(dst)))
    if not os.path.isdir(parent):
        return []
    pattern, removed = _stale_name(name), []
    for entry in sorted(os.listdir(parent)):
        m = pattern.match(entry)
        if m is None or (m.group(1) is not None and _alive(int(m.group(1)))):
            continue
        path = os.path.join(parent, entry)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
        log.info("removed %s, left by an interrupted run", path)
    return removed


def _raise_system_exit(signum, frame):
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """Within the block, SIGTERM raises SystemExit(143) in the main thread, so `finally` clean-ups run. Outside the
    main thread (where Python cannot install handlers) the block runs unchanged."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_system_exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def atomic_directory(dst: str | os.PathLike, *, overwrite: bool = False) -> Iterator[str]:
    """Yields an empty temporary directory that becomes `dst` when the block completes (see the module docstring).

    An existing `dst` needs `overwrite=True`; it is replaced only once the new content is complete.
    """
    dst = os.path.abspath(os.fspath(dst))
    check_destination(dst, overwrite)
    parent, name = os.path.split(dst)
    os.makedirs(parent, exist_ok=True)
    remove_stale_temporaries(dst)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = os.path.join(parent, f".{name}.tmp-{tag}")
    with sigterm_as_exit():
        os.mkdir(tmp)
        try:
            yield tmp
            old = None
            if os.path.lexists(dst):
                old = os.path.join(parent, f".{name}.old-{tag}")
                os.rename(dst, old)
            try:
                os.rename(tmp, dst)
            except BaseException:
                if old is not None:
                    os.rename(old, dst)
                raise
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
