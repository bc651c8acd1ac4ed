"""Where the project writes: one check that an output path can be written, before any work is done, and one
way to report a write that fails (a full disk above all) in one line naming the path.

`check_output(path, what, folder=...)` accepts a path whose nearest existing ancestor is a folder this
process can create files in (by trying: permission bits say nothing for root or a read-only mount), and
refuses a folder given for a file and a file given for a folder. Missing parents are created when the
output is written; `prepare_output_dir` checks a run's folder and creates it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path

from alphaalign.errors import UserError

DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
NEARLY_FULL_BYTES = 1 << 20  # a write that failed with less free space than this failed for want of space


def check_output(path: str | Path, what: str, folder: bool) -> Path:
    """`path` as a Path, or a UserError starting with `what` (a flag or a dotted key) saying why it cannot
    be written: a file given for a folder or the reverse, a parent that is a file, no permission, read-only."""
    given = Path(path).expanduser()
    target = given.absolute()
    if target.exists():
        if folder and not target.is_dir():
            raise UserError(f"{what}: {path} is a file, not a folder")
        if not folder and target.is_dir():
            raise UserError(f"{what}: {path} is a folder; give a file name")
    parent = target if folder else target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{what}: cannot write to {path} ({parent} is a file, not a folder)")
    probe_dir = target if folder and target.is_dir() else parent
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=probe_dir)
        os.close(fd)
        os.unlink(probe)
        if not folder and target.is_file() and not os.access(target, os.W_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    except OSError as exc:
        raise UserError(f"{what}: cannot write to {path} ({probe_dir}: {exc.strerror})") from None
    return given


def prepare_output_dir(path: str | Path, what: str) -> Path:
    """The output folder of a run, checked as `check_output` does and created."""
    out = check_output(path, what, folder=True)
    with writing(out, "the output folder"):
        out.mkdir(parents=True, exist_ok=True)
    return out


def write_failure(exc: BaseException, path: Path) -> str | None:
    """A one-line reason for a failed write into `path`, or None when `exc` is not about writing there.
    Writers report a full disk differently (OSError ENOSPC; torch and safetensors wrap it in their own
    errors), so a failed write on a file system with almost no space left counts as a full disk."""
    if isinstance(exc, OSError) and exc.errno in DISK_FULL:
        return f"no space left on device ({exc.strerror})"
    if "No space left on device" in str(exc) or _free_bytes(path) < NEARLY_FULL_BYTES:
        return "no space left on device"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return None


def _free_bytes(path: Path) -> int:
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return NEARLY_FULL_BYTES


@contextlib.contextmanager
def writing(path: str | Path, what: str = "", keep: str = ""):
    """Turn a failed write into `path` into one line naming it (and `what` was being written); `keep` says
    what is left intact. Errors that are not about the write pass through."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:
        reason = write_failure(exc, Path(path))
        if reason is None:
            raise
        label = f"{what} " if what else ""
        raise UserError(f"cannot write {label}{path}: {reason}{'; ' + keep if keep else ''}") from exc
