"""The console every tool writes to: the project's own messages and the warnings that matter.

Other libraries print notices on every run that say nothing about it: a Lightning tip to
install another product, its device and seed lines, a deprecation inside Lightning's own use
of torch, transformers' torchvision fallbacks and the Hugging Face progress bars of a local
save. :func:`configure` filters exactly those, by message, in this one place; everything
else (every warning of the project, and every other library warning) still shows.
``run.verbose_console=true`` or ``EIDETIC_VERBOSE_CONSOLE=1`` shows everything.
"""

from __future__ import annotations

import logging
import os
import re
import warnings

__all__ = ["VERBOSE_ENV", "BENIGN_LOG_MESSAGES", "BENIGN_WARNINGS", "configure", "verbose_requested"]

VERBOSE_ENV = "EIDETIC_VERBOSE_CONSOLE"

# (logger the message is created on, pattern at the start of the message)
BENIGN_LOG_MESSAGES: tuple[tuple[str, str], ...] = tuple(
    (name, pattern)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero", "lightning_utilities.core.rank_zero")
    for pattern in (
        r"💡 Tip: For seamless cloud logging",  # an advertisement for litlogger
        r"(GPU|TPU|HPU) available: ",  # the device line: the run report records the device
        r"`Trainer.fit` stopped: `max_(steps|epochs)=",  # the summary says how many steps ran
    )
) + (
    ("lightning.fabric.utilities.seed", r"Seed set to "),
    ("transformers.utils.import_utils", r"`\w+` requires torchvision \(not installed\); falling back"),
)

# warnings.filterwarnings(message=...) patterns: notices about library internals, not about the run
BENIGN_WARNINGS: tuple[str, ...] = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning's use of torch.utils._pytree
)


def verbose_requested(setting: bool = False) -> bool:
    return bool(setting) or os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


class _DropMessages(logging.Filter):
    def __init__(self, patterns: list[str]):
        super().__init__()
        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            return not self.pattern.match(record.getMessage())
        except Exception:
            return True


_installed: list[tuple[logging.Logger, logging.Filter]] = []


def configure(verbose: bool = False) -> None:
    """Quiet (the default) or verbose console; may be called again to switch."""
    for logger, f in _installed:
        logger.removeFilter(f)
    _installed.clear()
    if verbose_requested(verbose):
        return
    by_logger: dict[str, list[str]] = {}
    for name, pattern in BENIGN_LOG_MESSAGES:
        by_logger.setdefault(name, []).append(pattern)
    for name, patterns in by_logger.items():
        logger, f = logging.getLogger(name), _DropMessages(patterns)
        logger.addFilter(f)
        _installed.append((logger, f))
    for pattern in BENIGN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    # a local save_pretrained draws a "Writing model shards" bar; nothing here downloads
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    except Exception:  # transformers absent or changed: a progress bar is not worth failing over
        pass
