"""The one exception type a user can cause.

Anything a person can get wrong (a bad path, a broken config, a corrupted file, an invalid sampling
parameter) raises `MixtralError` with a message that says what was wrong and what to do about it.
The CLI prints that message on one line and exits non-zero; it never shows a traceback for it.
"""


class MixtralError(ValueError):
    """A problem with the user's input, files or settings (not a bug in mixtral)."""
