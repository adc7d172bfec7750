"""Safe writes: a reader never sees a half-written output, and nothing that is not ours is replaced.

Every output is written to a temporary beside its target (``.NAME.PID.RANDOM.tmp`` or ``.tmpdir``) and
renamed into place. A writer killed by SIGKILL cannot remove its temporary; the next write to the same
place removes those whose writer no longer runs (the PID in the name). Outputs get the permissions a
plain ``open`` would give them under the user's umask.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import BadInput

#: A temporary of ours for any target: ``.NAME.PID.RANDOM.tmp`` (files) or ``.tmpdir`` (directories).
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[a-z0-9_]+\.(?:tmp|tmpdir)$")
#: Largest JSON document we parse (manifests and checkpoint metadata are kilobytes).
MAX_JSON_BYTES = 64 << 20


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: Path, what: str) -> Any:
    """Parse a JSON file we did not write ourselves: bounded in size and depth, one-line errors."""
    if path.stat().st_size > MAX_JSON_BYTES:
        raise BadInput(f"{path} is larger than {MAX_JSON_BYTES >> 20} MB; it is not {what}")
    try:
        return json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadInput(f"{path} is not valid JSON (corrupt or truncated {what})") from None
    except RecursionError:
        raise BadInput(f"{path} is nested too deeply to be {what}") from None


# -- temporaries --------------------------------------------------------------------------------


def is_temporary(name: str) -> bool:
    """Whether ``name`` is one of our temporaries (for any target)."""
    return _TEMP.match(name) is not None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale(parent: Path, name: str) -> None:
    """Remove temporaries for target ``name`` in ``parent`` whose writing process no longer runs."""
    try:
        entries = list(parent.iterdir())
    except OSError:
        return
    for entry in entries:
        match = _TEMP.match(entry.name)
        if match is None or match["name"] != name or _alive(int(match["pid"])):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError:
            pass  # another writer cleaned it first, or it is not ours to remove


def current_umask() -> int:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # no /proc: read it the only portable way, restoring it at once
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it over ``target`` only on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target.parent, target.name)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~current_umask())
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(target: str | os.PathLike, payload: dict) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where that is unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


@contextmanager
def atomic_dir(target: str | os.PathLike, owned: Callable[[Path], bool], what: str) -> Iterator[Path]:
    """Yield a fresh temporary directory; it replaces ``target`` only if the block succeeds.

    ``target`` may be absent, empty, or ``what`` according to ``owned``; anything else is refused
    (:func:`check_output_dir`), before the block runs and again just before the swap. The swap is one
    atomic exchange where the kernel offers it (Linux), so readers see the old or the new directory and
    never a missing one; elsewhere two renames leave the target absent for that instant (never half-written).
    """
    target = check_output_dir(target, owned, what)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target.parent, target.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmpdir", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~current_umask())
        check_output_dir(target, owned, what)
        if target.exists() and _exchange(tmp, target):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the previous contents
        elif target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmpdir", dir=target.parent))
            os.replace(target, old / "prev")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# -- output targets -----------------------------------------------------------------------------


def _existing_ancestor(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(directory: str | os.PathLike) -> None:
    """Refuse unless files can be created in ``directory`` (or in its nearest existing ancestor)."""
    place = _existing_ancestor(Path(directory))
    if not place.is_dir():
        raise BadInput(f"{place} is not a directory, so nothing can be written under it")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".acf-deploy-probe.{os.getpid()}.", suffix=".tmp", dir=place)
    except OSError as exc:
        raise BadInput(f"cannot write to {place}: {exc.strerror}") from None
    os.close(fd)
    os.unlink(probe)


def check_output_file(target: str | os.PathLike) -> Path:
    """The one check of a file output: not a directory or special file, its directory writable."""
    target = Path(target)
    if target.is_dir():
        raise BadInput(f"{target} is a directory; --out names the file to write")
    if target.exists() and not target.is_file():
        raise BadInput(f"{target} exists and is not a regular file; refusing to replace it")
    check_writable(target.parent)
    return target


def check_output_dir(target: str | os.PathLike, owned: Callable[[Path], bool], what: str) -> Path:
    """The one check of a directory output: absent, empty or ``what`` (``owned``), and writable.

    Anything else (a plain file, a symlink, a directory of someone else's files) is refused untouched.
    """
    target = Path(target)
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise BadInput(f"{target} exists and is not a directory; refusing to replace it (choose another --out)")
    if target.is_dir() and any(not is_temporary(p.name) for p in target.iterdir()) and not owned(target):
        raise BadInput(f"{target} is not empty and is not {what}; refusing to replace it (choose another --out)")
    check_writable(target.parent)
    return target


def check_free_space(target: str | os.PathLike, nbytes: int) -> None:
    """Refuse an output of ``nbytes`` that the file system holding ``target`` has no room for."""
    free = shutil.disk_usage(_existing_ancestor(Path(target).parent)).free
    if nbytes > free:
        raise BadInput(
            f"{target} needs {_size(nbytes)}, but only {_size(free)} are free there; write less or elsewhere"
        )


def _size(nbytes: float) -> str:
    units = ("B", "KB", "MB", "GB", "TB", "PB")
    k = 0
    while nbytes >= 1000 and k < len(units) - 1:
        nbytes, k = nbytes / 1000, k + 1
    return f"{nbytes:.1f} {units[k]}"
