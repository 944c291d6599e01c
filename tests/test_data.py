import json
import warnings

import numpy as np
import pytest
from PIL import Image

from workflows.train import load_config
from lightning_modules.data import DataError, SolidMarkDataModule, load_folder


def _img(path, size=(20, 20), mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        Image.fromarray(rng.integers(0, 65535, size[::-1], dtype=np.uint16)).save(path)
        return
    arr = rng.integers(0, 255, (*size[::-1], len(mode) if mode in ("RGB", "RGBA") else 1), dtype=np.uint8)
    Image.fromarray(arr.squeeze(), mode=None).convert(mode).save(path)


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(4):
        _img(d / f"ok{i}.png", seed=i)
    return d


def test_conversions_grayscale_rgba_16bit(folder):
    _img(folder / "gray.png", mode="L", seed=10)
    _img(folder / "alpha.png", mode="RGBA", seed=11)
    _img(folder / "deep.png", mode="I;16", seed=12)
    records, arrays = load_folder(folder, 16)
    assert len(records) == 7 and arrays.shape == (7, 16, 16, 3) and arrays.dtype == np.uint8
    deep = arrays[[r.id for r in records].index("deep.png")]
    assert deep.max() > 200  # scaled from 16 bits, not clipped or wrapped


@pytest.mark.parametrize("content", [b"", b"not an image at all", None])
def test_unreadable_files_are_listed(folder, content):
    bad = folder / "bad.png"
    if content is None:  # truncated PNG
        _img(bad, seed=5)
        bad.write_bytes(bad.read_bytes()[:60])
    else:
        bad.write_bytes(content)
    with pytest.raises(DataError, match=r"could not be read:[\s\S]*bad.png[\s\S]*data.bad_files=skip"):
        load_folder(folder, 16)
    with pytest.warns(UserWarning, match="bad.png"):
        records, _ = load_folder(folder, 16, bad_files="skip")
    assert len(records) == 4


def test_small_images_error_upscale_skip(folder):
    _img(folder / "tiny.png", size=(8, 8))
    with pytest.raises(DataError, match=r"tiny.png \(8x8\)[\s\S]*small_images=upscale"):
        load_folder(folder, 16)
    assert len(load_folder(folder, 16, small_images="upscale")[0]) == 5
    with pytest.warns(UserWarning, match="tiny.png"):
        assert len(load_folder(folder, 16, small_images="skip")[0]) == 4


def test_non_images_and_orphan_captions_are_listed(folder):
    (folder / "notes.txt").write_text("hello")
    rows = [{"file_name": "ok0.png", "text": "first"}, {"file_name": "gone.png", "text": "missing"}]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(DataError, match=r"captions for 1 file\(s\) that are not images[\s\S]*gone.png[\s\S]*data.bad_files=skip"):
        load_folder(folder, 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records, _ = load_folder(folder, 16, bad_files="skip")
    text = " ".join(str(w.message) for w in caught)
    assert "notes.txt" in text and "gone.png" in text
    assert {r.id: r.caption for r in records}["ok0.png"] == "first"


def test_bad_metadata_line(folder):
    (folder / "metadata.jsonl").write_text('{"file_name": "ok0.png", "text": "x"}\nnot json\n')
    with pytest.raises(DataError, match="metadata.jsonl: 1 line.*\n.*line 2: 'not json'"):
        load_folder(folder, 16)


def test_every_kind_of_bad_input_is_reported_in_one_pass(folder):
    """A broken metadata line, a caption of a missing file, an unreadable file and a too-small
    image: one error names all four."""
    from PIL import Image

    (folder / "metadata.jsonl").write_text('{"file_name": "ok0.png", "text": "x"}\n{"text": "no file name"}\n'
                                           '{"file_name": "gone.png", "text": "y"}\n')
    (folder / "broken.png").write_bytes(b"not a png")
    Image.new("RGB", (8, 8)).save(folder / "small.png")
    with pytest.raises(DataError) as err:
        load_folder(folder, 16)
    message = str(err.value)
    assert "line 2" in message and "gone.png" in message and "broken.png" in message and "small.png (8x8)" in message


def test_empty_and_missing_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found"):
        load_folder(tmp_path / "empty", 16)
    with pytest.raises(DataError, match="does not exist"):
        load_folder(tmp_path / "nowhere", 16)


def _dm(*overrides):
    return SolidMarkDataModule(load_config([], ["data.num_images=24", "data.duplicate.ladder=[]", *overrides]).data)


def test_the_default_job_carries_a_positive_control_and_your_own_data_does_not(folder):
    default = SolidMarkDataModule(load_config([], []).data)
    train = [r for r in default.records if r.split == "train"]
    assert sorted(r.copies for r in train if r.copies > 1) == [32] * 4
    assert len(default.train_index()) == len(train) + 4 * 31
    assert not [r for r in default.records if r.split == "heldout" and r.copies > 1]
    off = SolidMarkDataModule(load_config([], ["data.duplicate.ladder=[]"]).data)
    assert {r.copies for r in off.records} == {1}
    own = SolidMarkDataModule(load_config([], [f"data.folder={folder}", "data.source=folder", "data.resolution=16", "data.heldout_fraction=0"]).data)
    assert {r.copies for r in own.records} == {1}
    with pytest.raises(DataError, match="positive control"):
        SolidMarkDataModule(load_config([], ["data.num_images=3"]).data)


def test_duplication_heldout_and_keys():
    dm = _dm("data.duplicate.fraction=0.25", "data.duplicate.copies=3", "data.heldout_fraction=0.25")
    train = [r for r in dm.records if r.split == "train"]
    held = [r for r in dm.records if r.split == "heldout"]
    assert len(held) == 6 and len(train) == 18
    dup = [r for r in train if r.copies == 3]
    assert len(dup) == round(0.25 * 18)
    index = dm.train_index()
    assert len(index) == 18 + 2 * len(dup)
    assert not {dm.records[i].split for i in index} - {"train"}  # held-out never trained on
    again = _dm("data.duplicate.fraction=0.25", "data.duplicate.copies=3", "data.heldout_fraction=0.25")
    assert [r.key for r in again.records] == [r.key for r in dm.records]
    assert all(0 <= r.key < 1 for r in dm.records)


def test_own_keys_give_every_copy_a_key():
    dm = _dm("data.duplicate.ids=[astronaut-000]", "data.duplicate.copies=3", "data.duplicate.own_keys=true", "data.heldout_fraction=0")
    copies = [r for r in dm.records if r.id.startswith("astronaut-000#")]
    assert len(copies) == 3 and len({r.key for r in copies}) == 3
    canv = dm.canvases([r.id for r in copies])
    assert (canv[0, :, 4:-4, 4:-4] == canv[1, :, 4:-4, 4:-4]).all()  # same image, other key
    assert len(dm.train_index()) == 24 - 1 + 3


def test_duplicate_ids_are_checked():
    with pytest.raises(DataError, match="unknown image ids"):
        _dm("data.duplicate.ids=[nope]")


def test_dedup_removes_exact_copies(tmp_path, folder):
    (folder / "copy.png").write_bytes((folder / "ok1.png").read_bytes())
    cfg = load_config([], [f"data.folder={folder}", "data.source=folder", "data.resolution=16", "data.heldout_fraction=0"])
    with pytest.warns(UserWarning, match="copy.png"):
        dm = SolidMarkDataModule(cfg.data)
    assert len(dm.records) == 4
    dm.write_keymap(tmp_path)
    assert "copy.png" in (tmp_path / "dedup_removed.txt").read_text()


def test_batches_are_bordered_in_range():
    dm = _dm()
    batch = next(iter(dm.train_dataloader()))
    x = batch["pixel_values"]
    assert x.shape[1:] == (3, 40, 40) and x.min() >= -1 and x.max() <= 1
    ids = list(batch["id"])
    keys = {r.id: r.key for r in dm.records}
    assert np.allclose(x[:, 0, 0, 0].numpy(), [2 * keys[i] - 1 for i in ids], atol=1e-6)
