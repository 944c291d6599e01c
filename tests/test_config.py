import pytest
from omegaconf import OmegaConf

from eidetic.config import ConfigError, load_config


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
        ("data.resolution=big", "expects int"),
        ("train.ema.enabled=3", "expects bool"),
        ("model.vae=3", "is a section"),
        ("train.min_snr_gamma=high", "expects float or int"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config([], [override])


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


def test_train_py_reports_config_errors_without_traceback(capsys):
    import train

    assert train.main(["train.lrr=1"]) == 2
    assert "did you mean 'train.lr'" in capsys.readouterr().err


def test_resolved_config_is_saved(tiny_cfg):
    from lightning_modules.run import prepare_run_dir

    cfg = tiny_cfg("train.lr=0.123")
    run_dir = prepare_run_dir(cfg)
    saved = OmegaConf.load(run_dir / "config.yaml")
    assert saved.train.lr == 0.123 and saved.logging.wandb.id
