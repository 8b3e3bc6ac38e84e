"""Kept for `from takeover import proc` in scripts and tests outside takeover: the code is vm_image.proc."""

from vm_image.proc import *  # noqa: F401,F403
from vm_image.proc import _kernel_address, _state, _status_fields  # noqa: F401
