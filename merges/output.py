"""Every file and folder the tool writes: atomic, fsynced, and never over what it did not write.

Files (recipe YAML, report HTML) are written to a temp sibling ``NAME.tmp-PID``, fsynced,
renamed into place and the folder fsynced. An existing file is replaced only when it holds
the caller's ``signature`` (a string the tool writes at the top of every such file).

Output folders (checkpoints) are built in a temp sibling ``.NAME.tmp-PID`` that carries a
marker file (``.mergesearch-output.json``) from its first moment, and published by a rename
once every file and the folder are fsynced. The finished folder's marker lists each file the
tool wrote with its size and mtime. A non-empty output folder is refused unless
``overwrite``, and even then only a folder whose entries are exactly the ones its marker
lists is replaced. Protected folders (sources, the base, the study folder) and their parents
are never valid outputs. Temp folders left by a killed run (recognisable name, marker, a dead
PID on this host) are removed by the next run on the same output.

Every OS error (disk full, permissions) becomes one :class:`OutputError` naming the path and
the cause; nothing half-written is left under a name that looks complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from merges.errors import MergeError

MARKER = ".mergesearch-output.json"
_TOOL = "mergesearch"
_PID = re.compile(r"[0-9]+")
_SIGNATURE_WINDOW = 4096  # the signature must sit this close to the start of a file


class OutputError(MergeError):
    """An output path is not allowed, or writing it failed (the message names path and cause)."""


@dataclass(frozen=True)
class Protected:
    """A folder that is never a valid output, nor any parent of it (``what``: for the message)."""

    what: str
    path: Path


# -- single files ---------------------------------------------------------------------------


def check_file_target(path: str | Path, *, signature: str) -> Path:
    """The absolute ``path`` if a file may be written there; raises :class:`OutputError`.

    An existing file is replaced only when ``signature`` occurs near its start (one this tool
    wrote earlier); a folder, a link or any other file is refused.
    """
    path = Path(os.path.abspath(Path(path).expanduser()))
    if path.is_symlink():
        raise OutputError(f"{path}: is a symbolic link; refusing to replace it (give the file it points to)")
    if path.is_dir():
        raise OutputError(f"{path}: is a folder; give a file name")
    if path.exists():
        if not path.is_file():
            raise OutputError(f"{path}: exists and is not a regular file; refusing to replace it")
        if not _holds_signature(path, signature):
            raise OutputError(
                f"{path}: exists and was not written by mergesearch; refusing to replace it "
                "(move it away or choose another file)"
            )
    return path


def write_file(path: str | Path, data: str | bytes, *, signature: str) -> Path:
    """Write ``data`` to ``path`` atomically and durably; returns the absolute path.

    ``data`` must contain ``signature`` near its start, so that a later write recognises the
    file as this tool's (see :func:`check_file_target`).
    """
    raw = data.encode("utf-8") if isinstance(data, str) else data
    if signature.encode("utf-8") not in raw[:_SIGNATURE_WINDOW]:
        raise ValueError(f"the data to write to {path} lacks its signature {signature!r}")
    path = check_file_target(path, signature=signature)
    tmp = path.with_name(_temp_name(path.name, "file", os.getpid()))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _clean_stale_files(path, signature)
        try:
            with open(tmp, "wb") as handle:
                handle.write(raw)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        _fsync_dir(path.parent)
    except OSError as exc:
        raise OutputError(_os_message(path, exc, ours=tmp)) from None
    return path


def _holds_signature(path: Path, signature: str) -> bool:
    try:
        with open(path, "rb") as handle:
            head = handle.read(_SIGNATURE_WINDOW)
    except OSError as exc:
        raise OutputError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    return signature.encode("utf-8") in head


def _clean_stale_files(path: Path, signature: str) -> None:
    """Remove ``NAME.tmp-PID`` files of dead runs that hold the signature (so are ours)."""
    for entry, pid in _temps(path, "file"):
        if entry.is_file() and not entry.is_symlink() and not _alive(pid) and _holds_signature(entry, signature):
            with contextlib.suppress(OSError):
                entry.unlink()


# -- output folders -------------------------------------------------------------------------


def check_output_folder(
    out: str | Path, *, overwrite: bool = False, protected: Iterable[Protected] = ()
) -> Path:
    """The absolute ``out`` if a new output folder may be published there; raises :class:`OutputError`.

    Allowed: a missing or empty folder; with ``overwrite``, a folder holding exactly a
    previous output of this tool. Never: a protected folder or any parent of one, a link,
    a file, a folder holding anything this tool did not write.
    """
    out = Path(os.path.abspath(Path(out).expanduser()))  # ".." folded: messages name the real folder
    if out.is_symlink():
        raise OutputError(f"{out}: is a symbolic link; give the folder itself as the output")
    real = out.resolve()
    for guard in protected:
        kept = Path(guard.path).expanduser().resolve()
        if real == kept:
            raise OutputError(f"{out}: is the {guard.what}; refusing to write an output there")
        if real in kept.parents:
            raise OutputError(
                f"{out}: holds the {guard.what} ({kept}); refusing to write an output there"
            )
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder")
    if not out.exists():
        return out
    if os.path.ismount(out):  # the output is built beside it and renamed: not across file systems
        raise OutputError(f"{out}: is a mount point; give a folder inside it")
    try:
        entries = sorted(p.name for p in out.iterdir())
    except OSError as exc:
        raise OutputError(f"{out}: cannot list it: {exc.strerror or exc}") from None
    if not entries:
        return out
    foreign = _foreign_entries(out, entries)
    if foreign is None:
        raise OutputError(
            f"{out}: folder is not empty and was not written by mergesearch (it holds "
            f"{_names(entries)}); give a new or empty folder"
        )
    if foreign:
        raise OutputError(
            f"{out}: holds files mergesearch did not write ({_names(foreign)}); refusing to "
            "replace it, even with --overwrite"
        )
    if not overwrite:
        raise OutputError(f"{out}: holds a previous mergesearch output; pass --overwrite to replace it")
    return out


@contextlib.contextmanager
def output_folder(
    out: str | Path, *, overwrite: bool = False, protected: Iterable[Protected] = ()
) -> Iterator[Path]:
    """Build an output folder: yields the temp folder to fill, publishes it when the block ends.

    The checks of :func:`check_output_folder` run before and again right before publishing.
    If the block raises, the temp folder is removed and ``out`` is left as it was. OS errors
    (while filling or publishing) become one :class:`OutputError` naming ``out`` and the cause.
    """
    protected = list(protected)
    out = Path(os.path.abspath(Path(out).expanduser()))  # ".." folded: messages name the real folder
    tmp = out.parent / _temp_name(out.name, "tmp", os.getpid())
    try:
        _clean_stale_folders(out)  # first: it may put a previous output back in place
    except OSError as exc:
        raise OutputError(_os_message(out, exc, ours=tmp)) from None
    check_output_folder(out, overwrite=overwrite, protected=protected)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists() or tmp.is_symlink():
            if tmp.is_symlink() or not tmp.is_dir() or _read_marker(tmp) is None:
                raise OutputError(f"{tmp}: is in the way and was not made by mergesearch; move it away")
            shutil.rmtree(tmp)  # left by an earlier run with this very PID (a reused PID)
        tmp.mkdir()
        _write_marker(tmp, {"tool": _TOOL, "pid": os.getpid(), "host": socket.gethostname(), "complete": False})
    except OSError as exc:
        raise OutputError(_os_message(out, exc, ours=tmp)) from None
    try:
        try:
            yield tmp
            _seal(tmp)
            check_output_folder(out, overwrite=overwrite, protected=protected)
            _publish(tmp, out)
        except OSError as exc:
            raise OutputError(_os_message(out, exc, ours=tmp)) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _seal(tmp: Path) -> None:
    """Write the final marker (every file with its size and mtime) and fsync everything."""
    files: dict[str, dict[str, int]] = {}
    for entry in sorted(tmp.iterdir()):
        if entry.name == MARKER:
            continue
        if entry.is_symlink() or not entry.is_file():
            raise OSError(f"{entry.name}: an output folder holds plain files only")
        _fsync_file(entry)
        stat = entry.stat()
        files[entry.name] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    _write_marker(tmp, {"tool": _TOOL, "complete": True, "files": files})
    _fsync_dir(tmp)


def _publish(tmp: Path, out: Path) -> None:
    """Rename the sealed ``tmp`` to ``out``; a previous output is moved aside, then removed."""
    if not out.exists() or not any(out.iterdir()):
        os.replace(tmp, out)  # rename(2) replaces an empty folder atomically
        _fsync_dir(out.parent)
        return
    old = out.parent / _temp_name(out.name, "old", os.getpid())
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)  # put the previous output back
        raise
    _fsync_dir(out.parent)
    left = _remove_marked(old)
    if left:
        raise OutputError(
            f"{out}: written; the previous output was moved to {old} and kept there because it "
            f"now holds files mergesearch did not write ({_names(left)})"
        )


def _foreign_entries(folder: Path, entries: list[str]) -> list[str] | None:
    """Entries of ``folder`` its marker does not vouch for; ``None`` if it has no valid marker."""
    marker = _read_marker(folder)
    if marker is None or marker.get("complete") is not True or not isinstance(marker.get("files"), dict):
        return None
    files: dict[str, object] = marker["files"]
    foreign: list[str] = []
    for name in entries:
        if name == MARKER:
            continue
        entry = folder / name
        record = files.get(name)
        if not isinstance(record, dict) or entry.is_symlink() or not entry.is_file():
            foreign.append(name)
            continue
        stat = entry.stat()
        if (stat.st_size, stat.st_mtime_ns) != (record.get("size"), record.get("mtime_ns")):
            foreign.append(f"{name} (changed since mergesearch wrote it)")
    return foreign


def _remove_marked(folder: Path) -> list[str]:
    """Delete the files ``folder``'s marker vouches for, then the folder; returns what is left."""
    entries = sorted(p.name for p in folder.iterdir())
    foreign = _foreign_entries(folder, entries)
    if foreign is None:
        return entries
    if foreign:
        return foreign
    for name in entries:
        if name != MARKER:
            (folder / name).unlink()
    (folder / MARKER).unlink()
    folder.rmdir()
    return []


def _clean_stale_folders(out: Path) -> None:
    """Remove temp folders that killed runs left next to ``out`` (ours, dead PID, this host).

    A ``.NAME.old-PID`` (a previous output moved aside when the run died between its two
    renames) is put back if ``out`` is missing, else removed file by file.
    """
    for entry, pid in _temps(out, "tmp"):
        if _stale(entry, pid):
            shutil.rmtree(entry, ignore_errors=True)
    for entry, pid in _temps(out, "old"):
        if not _stale(entry, pid):
            continue
        if not out.exists():
            os.replace(entry, out)
        else:
            _remove_marked(entry)


def _stale(entry: Path, pid: int) -> bool:
    if entry.is_symlink() or not entry.is_dir():
        return False
    marker = _read_marker(entry)
    if marker is None:
        return False
    host = marker.get("host")
    if host is not None and host != socket.gethostname():
        return False  # a run on another machine sharing this disk: its PID means nothing here
    return not _alive(pid)


def _temps(path: Path, kind: str) -> Iterator[tuple[Path, int]]:
    """Temp siblings of ``path`` of this ``kind`` (see :func:`_temp_name`), with their PIDs."""
    prefix = _temp_name(path.name, kind, "")
    with contextlib.suppress(OSError):
        for entry in path.parent.iterdir():
            pid = entry.name[len(prefix):]
            if entry.name.startswith(prefix) and _PID.fullmatch(pid):
                yield entry, int(pid)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _temp_name(name: str, kind: str, pid: int | str) -> str:
    """``NAME.tmp-PID`` for a file being written; ``.NAME.tmp-PID`` for a folder being built,
    ``.NAME.old-PID`` for a previous output moved aside (hidden: they can be large)."""
    return {"file": f"{name}.tmp-{pid}", "tmp": f".{name}.tmp-{pid}", "old": f".{name}.old-{pid}"}[kind]


def _read_marker(folder: Path) -> dict | None:
    try:
        data = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("tool") == _TOOL else None


def _write_marker(folder: Path, data: dict) -> None:
    with open(folder / MARKER, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _names(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"


def _os_message(target: Path, exc: OSError, *, ours: Path) -> str:
    """``could not write TARGET: CAUSE``; a failing path other than ``target`` or its temp
    ``ours`` (e.g. a base file being copied) is named too."""
    cause = exc.strerror or str(exc)
    if exc.filename is not None:
        failed = Path(os.fsdecode(exc.filename)).absolute()
        if failed != target and failed != ours and ours not in failed.parents:
            return f"could not write {target}: {failed}: {cause}"
    return f"could not write {target}: {cause}"
