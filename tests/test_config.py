"""Typed configs and the shared command line: unknown keys name the closest valid key, wrong
types and ranges are errors before any work, and every tool reports them the same way."""

import pytest
from omegaconf import OmegaConf

from eidetic.config import build_section, load
from eidetic.errors import ConfigError
from eidetic.schema.train import SolidMarkSettings, TrainConfig
from workflows.cli import main, parse_args
from workflows.train import load_config


def test_files_merge_left_to_right_then_overrides(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("train:\n  lr: 0.5\n  max_steps: 7\n")
    b.write_text("train:\n  lr: 0.25\n")
    cfg = load_config([a, b], ["train.max_steps=9"])
    assert cfg.train.lr == 0.25 and cfg.train.max_steps == 9


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=1", "did you mean 'train.lr'"),
        ("data.resolutoin=32", "did you mean 'data.resolution'"),
        ("trian.lr=1", "did you mean 'train'"),
        ("border=4", "did you mean 'data.border'"),
        ("data.resolution=big", "'data.resolution' expects int, got str 'big'"),
        ("train.ema.enabled=3", "'train.ema.enabled' expects bool"),
        ("model.vae=3", "is a section"),
        ("train.min_snr_gamma=high", "'train.min_snr_gamma' expects float or null"),
        ("solidmark.deltas=[0.1,x]", "expects a list of float"),
        ("data.source=foldr", "data.source must be one of builtin, tiles, folder, stream; got 'foldr' \\(did you mean 'folder'\\?\\)"),
        ("train.lr=-1", "train.lr must be > 0"),
        ("solidmark.deltas=[0.1,2]", r"solidmark.deltas must lie in \(0, 1\)"),
        ("extraction.detectors=[denoising_confidance]", "did you mean 'denoising_confidence'"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config([], [override])


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as err:
        load_config([], ["train.lr=-1", "data.batch_size=0", "model.space=pixle"])
    assert all(s in str(err.value) for s in ("train.lr", "data.batch_size", "model.space"))


def test_typo_in_a_file_names_the_file(tmp_path):
    f = tmp_path / "typo.yaml"
    f.write_text("data:\n  borderr: 4\n")
    with pytest.raises(ConfigError, match=r"typo.yaml[\s\S]*did you mean 'data.border'"):
        load_config([f])


def test_missing_file_and_malformed_override():
    with pytest.raises(ConfigError, match="not found"):
        load_config(["nope.yaml"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config([], ["train.lr"])


def test_int_given_for_float_becomes_float():
    assert isinstance(load_config([], ["train.lr=1"]).train.lr, float)


def test_assigning_an_unknown_key_later_is_an_error_too():
    cfg = load(TrainConfig)
    cfg.run.dir = "/tmp/x"
    with pytest.raises(Exception):
        cfg.run.dirr = "/tmp/x"


def test_sections_built_in_code_are_checked_like_configs():
    assert build_section(SolidMarkSettings, steps=3).steps == 3
    with pytest.raises(ConfigError, match="did you mean 'steps'"):
        build_section(SolidMarkSettings, stepz=3)
    with pytest.raises(ConfigError, match="flag_q must be in"):
        build_section(SolidMarkSettings, flag_q=2.0)


@pytest.mark.parametrize("tool, override", [
    ("train", "train.lrr=1"), ("compare", "settingz=1"), ("sweep", "n_trial=3"), ("protect", "objectiv=sds-"), ("imitate", "teachr=x"),
])
def test_every_tool_reports_config_errors_the_same_way(tool, override, capsys):
    assert main(tool, [override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "did you mean" in err and "Traceback" not in err


def test_the_command_line_forms(tmp_path):
    assert parse_args("sweep", ["configs/sweeps/tiny.yaml", "--n-trials", "3", "--workers=2", "--print-config"]) == (
        ["configs/sweeps/tiny.yaml"], ["n_trials=3", "workers=2"], True)
    assert parse_args("train", ["--config", "a.yaml", "--train.lr=0.1", "seed=2"]) == (["a.yaml"], ["train.lr=0.1", "seed=2"], False)
    with pytest.raises(SystemExit):
        parse_args("train", ["--train.lr"])  # a flag without its value


def test_print_config_prints_the_resolved_config(capsys):
    assert main("train", ["--print-config", "train.lr=0.123"]) == 0
    assert OmegaConf.create(capsys.readouterr().out).train.lr == 0.123


def test_resolved_config_is_saved(tiny_cfg):
    from workflows.train import run

    cfg = tiny_cfg("train.lr=0.123", "train.max_steps=1", "logging.wandb.enabled=false")
    run_dir = run(cfg)
    saved = OmegaConf.load(run_dir / "config.yaml")
    assert saved.train.lr == 0.123 and saved.logging.wandb.id
