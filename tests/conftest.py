import os
import warnings
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tests" / "tiny.yaml"


@pytest.fixture(autouse=True)
def _quiet_loader_warning():
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")


@pytest.fixture
def tiny_cfg(tmp_path):
    """The tiny test config with its run directory under ``tmp_path`` (a fresh DictConfig)."""
    from workflows.train import load_config

    def make(*overrides, files=()):
        return load_config([TINY, *files], [f"run.dir={tmp_path / 'run'}", *overrides])

    return make


@pytest.fixture
def render():
    """A console summary (a rich renderable) as plain text, whitespace collapsed (rich wraps)."""
    import io

    from rich.console import Console

    def text(renderable) -> str:
        buffer = io.StringIO()
        Console(file=buffer, width=160).print(renderable)
        return " ".join(buffer.getvalue().split())

    return text
