"""Readable errors for inconsistent evaluator input: each names the image and the offending id.

All derive from ``ValueError`` so that ``study``'s command line turns them into one line on stderr.
"""
from __future__ import annotations


class EvalInputError(ValueError):
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
