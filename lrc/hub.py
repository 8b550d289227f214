"""What lrc fetches from the Hugging Face Hub (a model, a calibration file, lm-eval's task data) has one way
to fail offline: `network_failure` recognises it, and `quiet_retries` keeps huggingface_hub's retry warnings
off the user's terminal while lrc waits for the answer it turns into one line."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


def network_failure(exc: BaseException) -> bool:
    """Whether `exc` (or what it was raised from) says the Hub could not be reached: offline mode, no connection,
    a timeout, or a file that is neither downloadable nor in the local cache."""
    seen: BaseException | None = exc
    for _ in range(8):  # the exception and the ones it was raised from
        if seen is None:
            return False
        names = {kind.__name__ for kind in type(seen).__mro__}
        if any(word in name for name in names for word in ("Offline", "LocalEntryNotFound", "Connect", "Timeout")):
            return True
        if "Connection" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@contextmanager
def quiet_retries() -> Iterator[None]:
    """huggingface_hub logs only errors inside the block (not its "Retrying in Ns" warnings)."""
    from huggingface_hub.utils import logging as hub_logging

    logger = hub_logging.get_logger("huggingface_hub")
    level = logger.level
    logger.setLevel("ERROR")
    try:
        yield
    finally:
        logger.setLevel(level)
