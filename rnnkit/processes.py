"""Facts about processes that several layers need (the run lock, the data store's clean-up)."""
from __future__ import annotations

import os


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
