"""Work that one process does for all: the others wait for it and fail with it (multi-process training)."""

from __future__ import annotations


class MainProcessFailed(RuntimeError):
    """Raised on the other processes when work done by the main process alone failed."""


def on_main_process(accelerator, fn, *args):
    """``fn(*args)`` on the main process only, as a barrier: if it raises there, every process raises
    (the others ``MainProcessFailed`` with its message) instead of waiting for it at the next barrier."""
    from accelerate.utils import broadcast_object_list

    result, error = None, None
    if accelerator.is_main_process:
        try:
            result = fn(*args)
        except Exception as err:       # noqa: BLE001  (re-raised below, once the others know)
            error = err
    if accelerator.num_processes > 1:
        message = [None if error is None else f"{type(error).__name__}: {error}"]
        broadcast_object_list(message, from_process=0)
        if message[0] is not None and error is None:
            raise MainProcessFailed(f"the main process failed: {message[0]}")
    if error is not None:
        raise error
    return result
