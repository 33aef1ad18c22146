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
