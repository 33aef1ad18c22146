"""Readable errors for inconsistent evaluator input: each names the image and the offending id.

All derive from :class:`study.errors.UserError` (a ``ValueError``), which ``study``'s command line prints as
one line on stderr.
"""
from __future__ import annotations

from study.errors import UserError


class EvalInputError(UserError):
    """Predictions and ground truth that cannot be scored together."""


class UnknownSegmentError(EvalInputError):
    """A prediction PNG holds a segment id its JSON does not list (or the JSON lists one the PNG lacks)."""


class MissingPredictionError(EvalInputError):
    """An image of the ground truth has no prediction."""


class UnknownCategoryError(EvalInputError):
    """A prediction names a category id the ground truth does not define."""


class SizeMismatchError(EvalInputError):
    """A prediction's size differs from its ground truth's."""


class UnknownImageError(EvalInputError):
    """A prediction names an image absent from the ground truth."""


class EvalTimeoutError(EvalInputError):
    """A native scorer (pycocotools) ran past its time limit: its input is inconsistent in a way the checks
    before it did not catch."""
