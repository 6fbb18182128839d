"""The one base class of every error a user can cause (the CLI prints its message and exits 1).

Torch-free and dependency-free, so every stage, the device runtime included, can share it.
"""


class HollowError(Exception):
    """A problem the user can fix; the message says what went wrong and what to do."""
