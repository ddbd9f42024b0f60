"""What every command line of ours does with a user error or an interrupt: one line, an exit code, no traceback."""
from __future__ import annotations

import sys
from collections.abc import Callable

from lemon_composer.atomic import interrupted, sigterm_as_interrupt


def run_cli(name: str, body: Callable[[], object]) -> int:
    """Run ``body``; a ValueError is a user error (exit 2), Ctrl-C / SIGTERM an interrupt (exit 130)."""
    try:
        with sigterm_as_interrupt():
            body()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return interrupted(name)
    return 0
