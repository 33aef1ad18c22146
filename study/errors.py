"""The one kind of error the `study` command shows as a one-line message.

A :class:`UserError` is a mistake in what the user gave us: a config key or value, a data file, a
checkpoint, a command-line flag. Its message names the file, key or id at fault and says what to do.
``study/cli.py`` prints it as one line and exits 2. Every other exception is a bug in the suite and keeps
its traceback, so that it is reported rather than mistaken for bad input.

It subclasses ``ValueError`` so that callers who already catch ``ValueError`` around validation keep working.
"""
from __future__ import annotations


class UserError(ValueError):
    """A mistake in the user's input; the message names the culprit (file, key, image id, flag)."""


def os_error_line(e: OSError) -> str:
    """One line for an OSError the machine raised: what was refused, on which path, and what to do (a read-only
    output folder or mount, a permission, a full disk, a missing file)."""
    import errno

    where = " -> ".join(str(p) for p in (e.filename, e.filename2) if p is not None) or "(no path given)"
    why = e.strerror or type(e).__name__
    hint = {errno.EROFS: "the file system is mounted read-only: point output_dir (--set output_dir=...) or the "
                         "output path at a writable folder",
            errno.EACCES: "no permission: point the output at a folder you may write, or fix its permissions",
            errno.EPERM: "not permitted: point the output at a folder you may write",
            errno.ENOSPC: "the disk is full: free some space or write elsewhere",
            errno.ENOENT: "it does not exist: check the path",
            errno.EISDIR: "it is a folder: give a file path",
            errno.ENOTDIR: "a part of the path is a file, not a folder: check the path"}.get(e.errno, "check the path")
    return f"{why}: {where}; {hint}"
