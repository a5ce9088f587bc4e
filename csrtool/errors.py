"""The one exception type for user errors.

Anything a user can cause (a bad path, a corrupted file, a wrong option) raises
`CsrError` with a message that names the problem and the fix. The CLI prints the
message to stderr and exits 1; it never shows a traceback for these.
"""


class CsrError(Exception):
    """A user-facing error: the message says what is wrong and what to do."""
