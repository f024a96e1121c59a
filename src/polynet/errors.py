"""What counts as the user's mistake, and so is reported as one line instead of a traceback.

The library raises :class:`UserError` (a ``ValueError``, so callers that catch ValueError keep
working) where it knows the input is at fault and can name the fix. The command line also
treats as the user's a ``ValueError`` raised by polynet's own checks and file-system errors
(a missing file, a full disk); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import traceback
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


class UserError(ValueError):
    """Bad input the user can fix; the message names the problem and the fix."""


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` is the user's to fix (one line) rather than a bug (traceback).

    Args:
        err: A raised exception, with its traceback.

    """
    if isinstance(err, (UserError, OSError)):
        return True
    if type(err) is not ValueError:
        return False
    frames = traceback.extract_tb(err.__traceback__)
    # Raised by a check in polynet itself, not deep inside torch or timm.
    return bool(frames) and Path(frames[-1].filename).resolve().is_relative_to(_PACKAGE_DIR)
