"""What every command line of ours does with a user error or an interrupt: one line, an exit code, no traceback."""
from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block SIGTERM raises KeyboardInterrupt, so cleanup runs as for Ctrl-C."""
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_cli(name: str, body: Callable[[], object]) -> int:
    """Run ``body``; a ValueError is a user error (exit 2), Ctrl-C / SIGTERM an interrupt (exit 130, one line)."""
    try:
        with sigterm_as_interrupt():
            body()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: {name}; nothing half-written was left", file=sys.stderr)
        return 130
    return 0
