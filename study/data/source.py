"""Where dataset files come from: an extracted folder or an official zip file (possibly a zip inside a zip).

Readers never open paths themselves. They ask :func:`locate_folder` / :func:`read_file` for a logical
location (``val2017``, ``annotations/panoptic_val2017.json``) together with the official zip files that
hold it, and get back a :class:`Files` object that lists and reads members the same way whether they sit
in a folder or in a zip. This is how the official EoMT code reads COCO, ADE20K and Cityscapes straight
from the downloaded zips, without extracting them.

User mistakes end in one readable error naming the file: :class:`DataError` (a
:class:`~study.errors.UserError`) for bad content, including a corrupt archive or a damaged zip member,
:class:`DataNotFoundError` (also a ``FileNotFoundError``) for a missing file or folder. Raised inside a
DataLoader worker, a DataError reaches the main process with its own one-line message (see
:class:`DataError`).
"""
from __future__ import annotations

import io
import os
import re
import zipfile
import zlib
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from study.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


_WORKER = re.compile(r"^Caught (\w+) in DataLoader worker process (\d+)\.\nOriginal ", re.S)


class DataError(UserError):
    """Bad dataset content (corrupt image or archive, unknown category id, label value out of range, empty set).

    torch's DataLoader re-raises an exception of a worker in the main process as ``type(msg)`` with ``msg``
    = "Caught DataError in DataLoader worker process N. Original Traceback ..." and the worker's whole
    traceback. Built from such a text, a DataError keeps only the worker's own message (the last line of the
    traceback) and says which worker; the full text stays in ``worker_traceback``.
    """

    worker_traceback: Optional[str] = None

    def __init__(self, *args):
        text = args[0] if len(args) == 1 and isinstance(args[0], str) else None
        m = _WORKER.match(text) if text else None
        if m:
            name = type(self).__name__
            lines = text.rstrip("\n").splitlines()
            # the traceback ends with "module.DataError: message" (one line: our messages are one line)
            own = next((ln.split(": ", 1)[1] for ln in reversed(lines)
                        if ln.split(": ", 1)[0].rsplit(".", 1)[-1] == name and ": " in ln), lines[-1])
            args = (f"{own} (in DataLoader worker {m.group(2)})",)
            self.worker_traceback = text
        super().__init__(*args)


class DataNotFoundError(DataError, FileNotFoundError):
    """A dataset file or folder that does not exist; the message names it.

    Also a :class:`DataError`, so callers can catch every data problem with one ``except``.
    """


class Files:
    """A read-only view of one folder's files, recursively: names are relative paths with '/'."""

    def names(self) -> set[str]:
        raise NotImplementedError

    def read(self, name: str) -> bytes:
        raise NotImplementedError

    def where(self, name: str = "") -> str:
        """A human-readable location for error messages (``/data/val2017.zip:val2017/0001.jpg``)."""
        raise NotImplementedError


class DirFiles(Files):
    def __init__(self, root: Path):
        self.root = Path(root)
        self._names: Optional[set[str]] = None

    def names(self) -> set[str]:
        if self._names is None:  # listed once: existence checks of 100k annotations are set look-ups
            out = set()
            for dirpath, _, files in os.walk(self.root):
                rel = os.path.relpath(dirpath, self.root)
                prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
                out.update(prefix + f for f in files)
            self._names = out
        return self._names

    def read(self, name: str) -> bytes:
        try:
            return (self.root / name).read_bytes()
        except FileNotFoundError:
            raise DataNotFoundError(f"file not found: {self.where(name)}") from None

    def where(self, name: str = "") -> str:
        return str(self.root / name) if name else str(self.root)


class ZipFiles(Files):
    """Members of ``zip_path`` under ``prefix``; with ``inner`` set, members of the zip stored at that
    member of ``zip_path`` (COCO panoptic PNGs ship as a zip inside ``panoptic_annotations_trainval2017.zip``).

    The zip is opened lazily and once per process, so the object can be handed to DataLoader workers.
    """

    def __init__(self, zip_path: Path, prefix: str = "", inner: Optional[str] = None):
        self.zip_path = Path(zip_path)
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.inner = inner
        self._zip: Optional[zipfile.ZipFile] = None
        self._pid = -1
        self._names: Optional[set[str]] = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_zip"], state["_pid"] = None, -1  # open file handles do not cross processes
        return state

    def _open(self) -> zipfile.ZipFile:
        if self._zip is None or self._pid != os.getpid():
            outer = open_zip(self.zip_path)
            if self.inner is None:
                self._zip = outer
            else:
                where = f"{self.zip_path}:{self.inner}"
                try:
                    info = outer.getinfo(self.inner)
                except KeyError:
                    raise DataNotFoundError(f"zip member not found: {where}") from None
                # A stored inner zip is read in place (seekable); a compressed one is held in memory, as the
                # official code does, because seeking in a deflated stream re-reads it from the start.
                stream = outer.open(info) if info.compress_type == zipfile.ZIP_STORED \
                    else io.BytesIO(read_member(outer, info.filename, self.zip_path))
                self._zip = open_zip(stream, where)
            self._pid = os.getpid()
        return self._zip

    def names(self) -> set[str]:
        if self._names is None:
            n = len(self.prefix)
            self._names = {m[n:] for m in self._open().namelist() if m.startswith(self.prefix) and
                           not m.endswith("/")}
        return self._names

    def read(self, name: str) -> bytes:
        z = self._open()
        if self.prefix + name not in z.NameToInfo:
            raise DataNotFoundError(f"file not found: {self.where(name)}")
        return read_member(z, self.prefix + name, self.where(name), is_where=True)

    def where(self, name: str = "") -> str:
        inner = f":{self.inner}" if self.inner else ""
        return f"{self.zip_path}{inner}:{self.prefix}{name}"


def open_zip(source, where: Optional[str] = None) -> zipfile.ZipFile:
    """``zipfile.ZipFile(source)``; a file that is not a zip, or a damaged one, is a DataError naming it."""
    where = where or str(source)
    try:
        return zipfile.ZipFile(source)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError) as e:
        raise DataError(f"archive {where} is not a zip file or is damaged ({e}); download it again, or "
                        f"extract it and point data.root at the folder") from None


def read_member(z: zipfile.ZipFile, member: str, where, is_where: bool = False) -> bytes:
    """One member's bytes; a damaged member (bad CRC, bad compressed data, cut archive) names it."""
    place = str(where) if is_where else f"{where}:{member}"
    try:
        return z.read(member)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, ValueError) as e:
        raise DataError(f"zip member {place} is damaged ({type(e).__name__}: {e}); download the archive "
                        f"again") from None
    except OSError as e:  # a cut archive: reading past its end
        raise DataError(f"zip member {place} cannot be read ({e}); the archive is damaged or truncated") from None


def _zip_has(zip_path: Path, member: str, is_dir: bool) -> bool:
    with open_zip(zip_path) as z:
        names = z.namelist()
    if is_dir:
        prefix = member.strip("/") + "/"
        return any(n.startswith(prefix) for n in names)
    return member in names


# A zip candidate: (zip file name under the root, member path in it) or, for a zip inside a zip,
# (zip file name, inner zip member, member path in the inner zip).
ZipCandidate = tuple


def locate_folder(root: Path, folder: str, zips: Sequence[ZipCandidate] = ()) -> Files:
    """The folder ``root/folder``, else the first official zip under ``root`` that holds it."""
    root = Path(root)
    if (root / folder).is_dir():
        return DirFiles(root / folder)
    for cand in zips:
        zpath = root / cand[0]
        if not zpath.is_file():
            continue
        if len(cand) == 2:
            if _zip_has(zpath, cand[1], is_dir=True):
                return ZipFiles(zpath, cand[1])
        elif _zip_has(zpath, cand[1], is_dir=False):
            return ZipFiles(zpath, cand[2], inner=cand[1])
    tried = ", ".join(str(root / c[0]) for c in zips)
    raise DataNotFoundError(f"folder not found: {root / folder}" + (f" (nor in {tried})" if tried else ""))


def read_file(root: Path, name: str, zips: Sequence[ZipCandidate] = ()) -> tuple[bytes, str]:
    """Bytes of ``root/name`` (or of the member of the first official zip holding it), and where it was."""
    root = Path(root)
    if (root / name).is_file():
        return (root / name).read_bytes(), str(root / name)
    for zname, member in zips:
        zpath = root / zname
        if zpath.is_file() and _zip_has(zpath, member, is_dir=False):
            with open_zip(zpath) as z:
                return read_member(z, member, zpath), f"{zpath}:{member}"
    tried = ", ".join(str(root / z[0]) for z in zips)
    raise DataNotFoundError(f"file not found: {root / name}" + (f" (nor in {tried})" if tried else ""))


def require_root(root: Optional[str], dataset: str) -> Path:
    """The dataset folder from the configuration; missing or absent folders end in a named error."""
    if not root:
        raise DataNotFoundError(f"data.root is not set for dataset '{dataset}': set it to the dataset folder")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataNotFoundError(f"dataset folder for '{dataset}' does not exist: {path} (check data.root)")
    return path


# ------------------------------------------------------------------------------------------ decoding


def decode_image(data: bytes, where: str) -> torch.Tensor:
    """JPEG/PNG bytes -> uint8 tensor (3, H, W), RGB. A corrupt or truncated file raises DataError."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            arr = np.asarray(im.convert("RGB"))
    except UnidentifiedImageError:
        raise DataError(f"cannot decode image {where}: not a known image format (corrupt file?)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot decode image {where}: {e}") from None
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))  # (H, W, 3) -> (3, H, W), one copy


def decode_png(data: bytes, where: str, channels: int) -> np.ndarray:
    """A label PNG as an array: (H, W) for ``channels=1`` (palette indices kept), (H, W, 3) for 3."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            if channels == 1:
                if im.mode not in ("L", "P", "I", "I;16"):
                    raise DataError(f"label PNG {where} has mode {im.mode}; a single-channel PNG is expected")
                arr = np.asarray(im)
            else:
                arr = np.asarray(im.convert("RGB"))
    except DataError:
        raise
    except UnidentifiedImageError:
        raise DataError(f"cannot decode label PNG {where}: not a known image format (corrupt file?)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot decode label PNG {where}: {e}") from None
    return arr


def check_same_size(image: torch.Tensor, label: np.ndarray, image_where: str, label_where: str) -> None:
    if tuple(image.shape[1:]) != tuple(label.shape[:2]):
        raise DataError(f"label {label_where} is {label.shape[1]}x{label.shape[0]} but image {image_where} "
                        f"is {image.shape[2]}x{image.shape[1]}")


def fill(pattern: Optional[str], split: str, default: str) -> str:
    """A configured path override with '{split}' replaced, or the official default."""
    return pattern.replace("{split}", split) if pattern else default
