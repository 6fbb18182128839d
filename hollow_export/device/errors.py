"""The device runtime's one error type (torch-free)."""

from ..errors import HollowError


class RuntimeFault(HollowError):
    """A buffer, run folder or disk problem on the device (message names the problem and the fix)."""
