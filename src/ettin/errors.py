"""One exception type for every user-facing failure.

The CLI turns an ``EttinError`` into a single line on stderr and a non-zero exit;
anything else is a bug and keeps its traceback.
"""


class EttinError(Exception):
    """A problem with the user's input, files or environment (not a bug)."""
