"""The one error type for user mistakes (bad arguments, missing files or data).

It subclasses ``ValueError`` so library callers can catch the usual type; the
CLI prints it as one line without a traceback.
"""


class UserError(ValueError):
    """A mistake the user can fix; the message says what is wrong and how to fix it."""


class RankAboveLayerError(UserError):
    """A rank above what one layer can hold (its full rank); valid for a larger layer."""
