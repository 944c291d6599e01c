"""Fault injection: writes killed half-way, runs killed at any point, and failing commands
against an existing run directory (which must come out of them byte for byte unchanged)."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tests" / "tiny.yaml"
KILLPOINT = Path(__file__).resolve().parent / "killpoint.py"


# ---- a write killed half-way leaves the previous version -------------------------------------
class Killed(BaseException):
    """Stands for SIGKILL inside a write (a BaseException, like KeyboardInterrupt)."""


class _TornFile:
    def __init__(self, fh):
        self._fh = fh

    def write(self, data):
        self._fh.write(data[: max(1, len(data) // 2)])
        self._fh.flush()
        raise Killed

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._fh.__exit__(*exc)


@contextmanager
def torn_writes(monkeypatch):
    """Every file opened by the crash-safe writers stops half-way through its first write."""
    real = os.fdopen
    with monkeypatch.context() as m:
        m.setattr(os, "fdopen", lambda fd, *a, **k: _TornFile(real(fd, *a, **k)))
        yield


def _digest(path: Path) -> str:
    if path.is_dir():
        return hashlib.sha256(b"".join(p.relative_to(path).as_posix().encode() + p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file())).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _keymap(d: Path, version: int) -> Path:
    from lightning_modules.data import SolidMarkDataModule
    from workflows.train import load_config

    cfg = load_config([TINY], [f"data.num_images={6 + version}"])
    return SolidMarkDataModule(cfg.data, seed=0).write_keymap(d)


def _summary(d: Path, version: int) -> Path:
    from workflows.rundir import RunDirectory

    RunDirectory(d).update_summary("train", {"global_step": version})
    return d / "summary.json"


def _report(d: Path, version: int) -> Path:
    from workflows.rundir import RunDirectory

    return RunDirectory(d).write_text("report.md", f"# report {version}\n" * 50)


def _metrics(d: Path, version: int) -> Path:
    from lightning_modules.csv_logger import RunCSVLogger

    logger = RunCSVLogger(d / "metrics.csv")
    for step in range(version + 2):
        logger.log_metrics({"train/loss": 1.0 / (step + 1)}, step=step)
    logger.save()
    return logger.path


def _checkpoint(d: Path, version: int) -> Path:
    from callbacks.checkpoint import AtomicCheckpointIO

    path = d / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.full((256, 256), float(version))}}, path)
    return path


def _tokenizer(d: Path, version: int) -> Path:
    from lightning_modules.models import build_tokenizer

    build_tokenizer([f"a photo of thing {i}" for i in range(version + 3)], 600, 16, d / "tokenizer")
    return d / "tokenizer"


def _sample_grid(d: Path, version: int) -> Path:
    from callbacks.samples import save_grid

    save_grid(torch.full((4, 3, 8, 8), version / 4.0 - 0.5), d / "samples" / "step-000003.png")
    return d / "samples" / "step-000003.png"


def _exported_model(d: Path, version: int) -> Path:
    from eidetic.io import atomic_directory

    with atomic_directory(d / "model") as tmp:  # the way pipelines and autoencoders are saved
        (tmp / "model_index.json").write_text(json.dumps({"version": version}))
        if version == 2:
            raise Killed  # killed half-way through save_pretrained
    return d / "model"


@pytest.mark.parametrize("writer", [_keymap, _summary, _report, _metrics, _checkpoint, _tokenizer, _sample_grid, _exported_model])
def test_a_write_killed_half_way_leaves_the_previous_version(writer, tmp_path, monkeypatch):
    path = writer(tmp_path, 1)
    before = _digest(path)
    with pytest.raises(Killed), torn_writes(monkeypatch):
        writer(tmp_path, 2)
    assert _digest(path) == before, f"{path.name} changed by a write that was killed"
    if path.suffix == ".ckpt":
        assert torch.load(path, weights_only=True)["state_dict"]["w"][0, 0] == 1.0
    leftovers = [p.name for p in tmp_path.rglob(".*") if p.name.endswith(".tmp")]
    assert not leftovers, leftovers


# Writing a file in place (instead of through eidetic.io) is what left torn files behind.
_RAW_WRITES = re.compile(r"""open\([^)]*["'][wa]b?["']|(?<!run_dir)\.write_text\(|\.write_bytes\(|torch\.save\(|json\.dump\(|\.savefig\([^f]|\.save_pretrained\((?!tmp)""")
_ALLOWED = {
    ("eidetic/io.py", "torch.save("),  # the helpers themselves
    ("eidetic/io.py", "open(self.partial"),  # the chunked JSONL writer: a partial file published only by rename
    ("workflows/sweep.py", "open("),  # the sweep's lock file: its content is never read
    ("eidetic/figures.py", "savefig(buffer"),  # into memory, embedded in the report, which is written atomically
}


def test_every_writer_goes_through_the_crash_safe_helpers():
    offenders = []
    for folder in ("eidetic", "workflows", "lightning_modules", "callbacks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            for lineno, line in enumerate(path.read_text().splitlines(), 1):
                match = _RAW_WRITES.search(line)
                if match and not line.lstrip().startswith("#") and not any(rel == f and a in line for f, a in _ALLOWED):
                    offenders.append(f"{rel}:{lineno}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


# ---- a run killed at any point resumes to the uninterrupted run ------------------------------
def _killed_run(spec: str, args: list[str], rename_log: Path | None = None, tool: str = "train") -> int:
    # its own W&B service, as a separate command would have (the test process's one would keep the killed run open)
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    # as many threads as this process, which trains the reference and the resumed part: CPU kernels
    # split their sums by thread count, so another count gives other last bits
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(torch.get_num_threads()), HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    command = [sys.executable, str(KILLPOINT), tool, spec, *([str(rename_log)] if rename_log else []), "--", *args]
    return subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=600).returncode


def _checkpoint_state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def _csv_rows(run_dir: Path) -> list[dict]:
    with (run_dir / "metrics.csv").open() as fh:
        return list(csv.DictReader(fh))


def _wandb_id(run_dir: Path) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.load(run_dir / "config.yaml").logging.wandb.id


def assert_resumed_like(run_dir: Path, reference: Path, wandb_id: str) -> None:
    """Bitwise the reference's weights and optimizer state; its metrics.csv, every step once; one W&B id."""
    a, b = _checkpoint_state(reference), _checkpoint_state(run_dir)
    assert b["global_step"] == a["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    differ = [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    assert not differ, f"weights differ after resume: {differ[:5]}"
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa), "optimizer state differs after resume"
    steps = [int(r["step"]) for r in _csv_rows(run_dir)]
    assert steps == sorted(set(steps)) == [int(r["step"]) for r in _csv_rows(reference)], steps
    assert _csv_rows(run_dir) == _csv_rows(reference)
    segments = [p.name for p in (run_dir / "wandb").glob("offline-run-*")]
    assert segments and all(name.split("-")[-1] == wandb_id or f"-{wandb_id}" in name for name in segments), segments


def test_metrics_and_weights_survive_a_kill_right_after_a_checkpoint(tiny_cfg, tmp_path):
    import train
    from workflows.train import run

    reference = run(tiny_cfg(f"run.dir={tmp_path / 'reference'}"))
    killed = tmp_path / "killed"
    # right after the step-3 last.ckpt is renamed into place, before that step's metrics are logged
    rc = _killed_run("rename:last.ckpt:1", ["--config", str(TINY), f"run.dir={killed}"])
    assert rc == -9, "the run was not killed"
    wandb_id = _wandb_id(killed)
    assert train.main([f"run.dir={killed}", "train.resume=last"]) == 0
    assert_resumed_like(killed, reference, wandb_id)


# ---- a failing command leaves an existing run directory byte for byte as it was -------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished tiny run (checkpoints, metrics, W&B segment), shared by the failing commands below."""
    import wandb

    from workflows.train import load_config, run

    run_dir = run(load_config([TINY], [f"run.dir={tmp_path_factory.mktemp('finished') / 'run'}", "run.report=false"]))
    wandb.teardown()  # the W&B service may still append to the run's logs after the run is closed
    return run_dir


def _bad_folder(root: Path) -> Path:
    """Every kind of bad data at once: a broken metadata line, a caption of a missing file, an
    unreadable image and one smaller than the resolution."""
    from PIL import Image

    folder = root / "bad_data"
    folder.mkdir(exist_ok=True)
    for i in range(3):
        Image.new("RGB", (20, 20), (40 * i, 0, 0)).save(folder / f"ok{i}.png")
    Image.new("RGB", (8, 8)).save(folder / "small.png")
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "metadata.jsonl").write_text('{"file_name": "ok0.png", "text": "x"}\nnot json\n{"file_name": "gone.png", "text": "y"}\n')
    return folder


def _garbage_checkpoint(root: Path) -> Path:
    (root / "garbage.ckpt").write_bytes(b"\0" * 100)
    return root / "garbage.ckpt"


# (overrides, what the error must say); RUN and ROOT stand for the run directory and a scratch folder
FAILING = {
    "bad data on resume": (["train.resume=last", "data.source=folder", "data.folder={bad_data}"],
                           ["line 2: 'not json'", "gone.png", "broken.png", "small.png (8x8)"]),
    "bad data with overwrite": (["--config", str(TINY), "run.overwrite=true", "data.source=folder", "data.folder={bad_data}"],
                                ["line 2", "gone.png", "broken.png", "small.png"]),
    "not a model directory": (["train.resume=last", "model.pretrained={root}"], ["is not a diffusers text-to-image directory", "unet/"]),
    "model shape changed on resume": (["train.resume=last", "model.unet.block_out_channels=[8,16]"],
                                      ["does not fit this config", "unet.conv_in.weight (checkpoint [16, 4, 3, 3], config [8, 4, 3, 3])",
                                       "and 255 more", "model.unet.block_out_channels: [16, 32] -> [8, 16]"]),
    "model kind changed on resume": (["train.resume=last", "model.space=pixel"], ["does not fit this config", "vae.encoder.conv_in.weight",
                                                                                  "model.space: 'latent' -> 'pixel'"]),
    "typo'd key": (["train.resume=last", "train.lrr=0.1"], ["unknown config key 'train.lrr': did you mean 'train.lr'?"]),
    "checkpoint not found": (["train.resume={root}/nope.ckpt"], ["checkpoint not found", "last.ckpt", "train.resume=last"]),
    "unreadable checkpoint": (["train.resume={garbage}"], ["cannot read the checkpoint", "train.resume=PATH"]),
    "a finished run reused": (["--config", str(TINY)], ["already holds a run", "train.resume=last", "run.overwrite=true"]),
}


@pytest.mark.parametrize("case", list(FAILING))
def test_a_failing_command_leaves_the_run_directory_as_it_was(case, finished_run, tmp_path, monkeypatch, capsys):
    import train
    import workflows.train as workflow

    def trained(*args, **kwargs):
        raise AssertionError("a command that fails its checks must not start building or training")

    monkeypatch.setattr(workflow, "build", trained)
    monkeypatch.setattr(workflow, "train_autoencoder", trained)
    overrides, expected = FAILING[case]
    fill = {"bad_data": _bad_folder(tmp_path), "root": tmp_path, "garbage": _garbage_checkpoint(tmp_path)}
    before = _digest(finished_run)
    capsys.readouterr()
    assert train.main([f"run.dir={finished_run}", *(o.format(**fill) for o in overrides)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err, err
    missing = [text for text in expected if text not in err]
    assert not missing, f"{missing} not in:\n{err}"
    assert _digest(finished_run) == before, f"{case}: the run directory changed"
    assert [p.name for p in finished_run.parent.iterdir()] == [finished_run.name], "something was written beside the run"


def test_overwrite_moves_the_old_run_aside(finished_run, tmp_path):
    import shutil

    from workflows.train import load_config, run

    target = tmp_path / "run"
    shutil.copytree(finished_run, target)
    before = _digest(target)
    run(load_config([TINY], [f"run.dir={target}", "run.overwrite=true", "train.max_steps=1", "logging.wandb.enabled=false",
                             "run.report=false"]))
    (old,) = tmp_path.glob("run.old-*")
    assert _digest(old) == before, "the old run was not kept as it was"
    assert sorted(p.name for p in (target / "checkpoints").iterdir()) == ["last.ckpt", "step-000001.ckpt"], "files of the old run mixed in"
    assert [int(r["step"]) for r in _csv_rows(target)] == [0]


@pytest.mark.slow
def test_a_run_killed_anywhere_resumes_to_the_uninterrupted_run(tmp_path):
    """SIGKILL at a dozen seeded points (renames of every kind of file, right after the first
    last.ckpt, and inside a checkpoint's and metrics.csv's writes), then ``train.resume=last``:
    bitwise the uninterrupted run's weights and optimizer state, every step once in
    metrics.csv, one W&B id."""
    import random

    import train
    from workflows.train import load_config, run

    reference = run(load_config([TINY], [f"run.dir={tmp_path / 'reference'}"]))
    renames = tmp_path / "renames.txt"
    assert _killed_run("none", ["--config", str(TINY), f"run.dir={tmp_path / 'counted'}"], rename_log=renames) == 0
    names = renames.read_text().split()
    first_checkpoint = names.index("last.ckpt") + 1
    others = [n for n in range(1, len(names) + 1) if n != first_checkpoint]
    specs = [f"rename:{n}" for n in sorted([first_checkpoint, *random.Random(17).sample(others, 9)])]
    specs += ["write:last.ckpt:1", "write:metrics.csv:2"]
    for spec in specs:
        killed = tmp_path / spec.replace(":", "-").replace(".", "_")
        assert _killed_run(spec, ["--config", str(TINY), f"run.dir={killed}"]) == -9, f"{spec}: the run was not killed"
        wandb_id = _wandb_id(killed)
        assert train.main([f"run.dir={killed}", "train.resume=last"]) == 0, spec
        try:
            assert_resumed_like(killed, reference, wandb_id)
        except AssertionError as exc:
            raise AssertionError(f"killed at {spec} ({names[int(spec.split(':')[1]) - 1] if spec.startswith('rename') else spec}): {exc}") from exc
