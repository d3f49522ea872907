"""Atomic file and directory writes: a reader sees the old state or the new one, never half.

Everything we write that a user keeps (checkpoints, shards, exports, reports) goes through
here: build under a temporary name beside the target, fsync, then rename.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from ettin import faults


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _cannot_write(target: Path, e: OSError) -> Exception:
    from ettin.errors import EttinError

    return EttinError(f"{target}: cannot write here ({e.strerror or e})")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_TMP_RE = re.compile(r"^\..+\.(?:tmp-(\d+)-[a-z0-9_]{8}|old-(\d+))$")  # exactly what atomic_* name them


def remove_stale_tmp(directory: str | os.PathLike) -> int:
    """Remove ``.NAME.tmp-PID-*`` / ``.NAME.old-PID`` leftovers of writers that no longer run.

    A killed writer leaves its temporary beside the target (never visible under the target's
    name); the next writer into the same directory removes it. Returns how many were removed.
    """
    n = 0
    try:
        entries = os.listdir(directory)
    except OSError:
        return 0
    for name in entries:
        m = _TMP_RE.match(name)
        if not m:
            continue
        pid = int(m.group(1) or m.group(2))
        if pid == os.getpid() or _alive(pid):
            continue
        p = os.path.join(directory, name)
        if ".old-" in name:  # killed between moving the old target aside and renaming the new one in
            target = os.path.join(directory, name[1:].rsplit(".old-", 1)[0])
            if not os.path.lexists(target):
                with contextlib.suppress(OSError):
                    os.replace(p, target)  # restore: the previous complete version comes back
                    n += 1
                    continue
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(p)
        n += 1
    return n


def fsync_tree(path: Path) -> None:
    for root, _dirs, files in os.walk(path):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(Path(root))


def _usual_modes(root: Path) -> None:
    """safetensors writes its files 0600 whatever the umask; give weights the mode every other
    file gets (0666 minus the umask), so a shared checkpoint or export is readable like its JSON."""
    mode = 0o666 & ~_umask()
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            if f.endswith(".safetensors"):
                os.chmod(os.path.join(dirpath, f), mode)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, *, overwrite: bool = True):
    """Yield a temporary directory; on success it replaces ``target`` in one rename.

    On any exception the temporary directory is removed and ``target`` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(target.parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    except OSError as e:
        raise _cannot_write(target, e) from None
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; a finished directory gets the usual mode
    try:
        yield tmp
        _usual_modes(tmp)
        fsync_tree(tmp)
        faults.point("atomic-dir-before-rename")
        if target.exists():
            if not overwrite:
                raise FileExistsError(target)
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    except OSError as e:
        raise _cannot_write(path, e) from None
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            b = fh.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()
