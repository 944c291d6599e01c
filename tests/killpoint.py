"""Run a tool's command line in this process and SIGKILL it at a chosen point (fault injection).

    python tests/killpoint.py TOOL SPEC [RENAME_LOG] -- ARGS...

SPEC is one of:
  none                  run to the end (with RENAME_LOG: write every renamed file's name there)
  rename:N              right after the N-th file or directory is renamed into place (1-based)
  rename:NAME:N         right after the N-th rename onto a file called NAME (e.g. last.ckpt)
  write:NAME:N          inside the N-th write of NAME: half of the first chunk written, then killed
  seconds:S             after S seconds of wall time

Every crash-safe writer renames a finished temporary file into place (eidetic.io), so counting
``os.replace`` calls enumerates every point at which a run's files change.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class _TornFile:
    """A file whose first write stops half-way and kills the process."""

    def __init__(self, fh):
        self._fh = fh

    def write(self, data):
        self._fh.write(data[: max(1, len(data) // 2)])
        self._fh.flush()
        _kill()

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._fh.__exit__(*exc)


def install(spec: str, rename_log: str | None = None) -> None:
    kind, *rest = spec.split(":")
    real_replace, real_fdopen = os.replace, os.fdopen
    seen = {"renames": 0, "named": 0, "writes": 0}

    def replace(src, dst, *args, **kwargs):
        real_replace(src, dst, *args, **kwargs)
        name = Path(dst).name
        if name.startswith("."):  # an old copy moved aside, not a new file in place
            return
        seen["renames"] += 1
        if rename_log:
            with open(rename_log, "a") as fh:
                fh.write(name + "\n")
        if kind == "rename" and len(rest) == 1 and seen["renames"] == int(rest[0]):
            _kill()
        if kind == "rename" and len(rest) == 2 and name == rest[0]:
            seen["named"] += 1
            if seen["named"] == int(rest[1]):
                _kill()

    def fdopen(fd, *args, **kwargs):
        fh = real_fdopen(fd, *args, **kwargs)
        target = os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else ""
        if kind == "write" and Path(target).name.startswith(f".{rest[0]}."):
            seen["writes"] += 1
            if seen["writes"] == int(rest[1]):
                return _TornFile(fh)
        return fh

    os.replace = replace
    os.fdopen = fdopen
    if kind == "seconds":
        timer = threading.Timer(float(rest[0]), _kill)
        timer.daemon = True
        timer.start()


def main(argv: list[str]) -> int:
    split = argv.index("--")
    tool, spec, *log = argv[:split]
    install(spec, log[0] if log else None)
    from workflows.cli import main as cli_main

    return cli_main(tool, argv[split + 1 :])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
