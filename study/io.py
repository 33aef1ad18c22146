"""Atomic file writes and safe checkpoint reads.

Writes: a crash never leaves a half-written record, config or checkpoint behind. Each file is written to a
temporary file beside it and renamed over it, so readers see the old file or the new one, never half of
one. Files get the permissions a plain ``open()`` would give them (0666 less the umask, 0644 under the
usual umask 022), so a team can share run folders, reports and benchmark files. A full disk (ENOSPC, or a
quota: EDQUOT) ends in one :class:`~study.errors.UserError` naming the path and the bytes needed; the
temporary file is removed and the previous file stays intact.

Ownership: every output folder that the suite writes into keeps a manifest (``.study-manifest.json``) of the
files it wrote there. A guarded write (``guard=True``, or :func:`refuse_foreign` before a writer of another
library such as ``savefig``, then :func:`record_written`) refuses to replace a file that the manifest does not
list, so a user's own ``index.md`` or ``panoptic_pred.json`` in that folder is never overwritten.

Reads: :func:`read_torch_file` loads a ``torch.save`` file without running pickled code
(``weights_only=True``) and turns a damaged file into one message naming it.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable, Optional

from study.errors import UserError

_FULL = (errno.ENOSPC, errno.EDQUOT)


def _umask() -> int:
    """The process umask, read without changing it where Linux reports it (``/proc/self/status``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: read it by setting it, and put it back at once
    os.umask(mask)
    return mask


def _disk_full(exc: BaseException) -> Optional[OSError]:
    """The ENOSPC / EDQUOT OSError behind ``exc`` (torch wraps it in a RuntimeError), else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _FULL:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _human(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} bytes"


MANIFEST = ".study-manifest.json"


def _manifest(folder: Path) -> set[str]:
    try:
        names = json.loads((folder / MANIFEST).read_text())["written"]
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    return {n for n in names if isinstance(n, str)} if isinstance(names, list) else set()


def written_by_suite(path: str | os.PathLike) -> bool:
    """Whether ``path`` is listed in its folder's manifest (the suite wrote it)."""
    path = Path(path)
    return path.name in _manifest(path.parent)


def refuse_foreign(path: str | os.PathLike) -> None:
    """A UserError if ``path`` exists and the suite did not write it (not in its folder's manifest)."""
    path = Path(path)
    if path.name == MANIFEST:
        return
    if (path.exists() or path.is_symlink()) and not written_by_suite(path):
        what = "a folder" if path.is_dir() else "a file"
        raise UserError(f"{path} is {what} that this suite did not write, and it is not replaced; move it away, "
                        f"or write to another folder")


def record_written(*paths: str | os.PathLike) -> None:
    """Add ``paths`` to their folders' manifests (after they were written)."""
    by_folder: dict[Path, set[str]] = {}
    for p in map(Path, paths):
        if p.name != MANIFEST:
            by_folder.setdefault(p.parent, set()).add(p.name)
    for folder, names in by_folder.items():
        have = _manifest(folder)
        if not names <= have:
            text = json.dumps({"written": sorted(have | names)}, indent=1) + "\n"
            atomic_write(folder / MANIFEST, lambda tmp, t=text: Path(tmp).write_text(t), lambda t=text: len(t))


def adopt_earlier_output(folder: str | os.PathLike, marker: str) -> Path:
    """``folder / marker``, after listing the folder's files in its manifest when the marker is there but no
    manifest is: a folder the suite wrote before manifests existed (``marker`` is a file only the suite writes
    there, e.g. ``make study``'s ``.inputs``), so that writing it again is not refused."""
    folder = Path(folder)
    if (folder / marker).is_file() and not (folder / MANIFEST).exists():
        record_written(*(p for p in folder.iterdir() if p.is_file()))
    return folder / marker


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], size: Callable[[], int],
                 guard: bool = False) -> None:
    """Write ``path`` through ``write(tmp)``; ``size()`` estimates the bytes needed (for a full disk).

    ``guard``: refuse to replace a file the suite did not write, and list ``path`` in its folder's manifest.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if guard:
        refuse_foreign(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give what open() would
    finally:
        os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one, never half
        if guard:
            record_written(path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        full = _disk_full(e)
        if full is None:
            raise
        try:
            free = f", {_human(shutil.disk_usage(path.parent).free)} free there"
        except OSError:
            free = ""
        kept = "the previous file is intact" if path.exists() else "nothing was written"
        raise UserError(f"no space left to write {path}: it needs about {_human(size())} ({size()} bytes)"
                        f"{free}; {kept}. Free some space (or point the output elsewhere) and run again") from None


def atomic_write_text(path: str | os.PathLike, text: str, guard: bool = False) -> None:
    data = text.encode("utf-8")

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write, lambda: len(data), guard=guard)


def atomic_write_json(path: str | os.PathLike, obj: Any, guard: bool = False) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n", guard=guard)


def _tensor_bytes(obj: Any, seen: Optional[set] = None) -> int:
    """Bytes of the tensors in a nested container (what a torch.save file mostly holds)."""
    import torch

    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in obj)
    return 0


def atomic_torch_save(obj: Any, path: str | os.PathLike, guard: bool = False) -> None:
    import torch

    def write(tmp: str) -> None:
        # Through a Python file object, so that a write error keeps its errno (torch's own writer reports a
        # bare "file write failed").
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    atomic_write(path, write, lambda: _tensor_bytes(obj), guard=guard)


def read_torch_file(path: str | os.PathLike, what: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; a missing, damaged or unsafe file is a UserError.

    A file that needs code to unpickle is refused (no advice to lift ``weights_only``: such a file can
    run anything), a truncated or random file is called damaged.
    """
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist")
    size = path.stat().st_size
    damaged = (f"{what} {path} is damaged ({size} bytes: truncated, or not a file written by torch.save); "
               f"delete it, or restore it from a copy")
    if size == 0 or not zipfile.is_zipfile(path):
        # torch.save writes a zip archive since PyTorch 1.6; anything else is damaged (or far older)
        raise UserError(damaged)
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()  # CRC of every member: catches a file cut or overwritten inside
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise UserError(f"{damaged} [{type(e).__name__}: {e}]") from None
    if bad is not None:
        raise UserError(f"{damaged} [member {bad} fails its CRC check]")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip().startswith(("WeightsUnpickler",
                                                                                        "Unsupported"))), "")
        raise UserError(f"{what} {path} holds Python objects besides tensors and plain values, which are not "
                        f"loaded because unpickling them can run arbitrary code{': ' + first if first else ''}. "
                        f"Save only tensors (e.g. model.state_dict()) and load that") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError) as e:
        raise UserError(f"{damaged} [{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}]") from None
