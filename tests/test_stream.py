"""data.source=stream: a folder or Parquet shards read in DataLoader workers, keys from ids."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eidetic.keys import id_key
from lightning_modules.data import DataError, SolidMarkDataModule
from lightning_modules.stream import StreamingBorderedDataset, StreamLoader
from workflows.train import load_config, run


def _png(seed: int, size=(24, 20)) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    rows = []
    for i in range(14):
        name = f"sub/im{i:02d}.png" if i % 3 == 0 else f"im{i:02d}.png"
        (d / name).write_bytes(_png(i))
        rows.append({"file_name": name, "text": f"picture number {i}"})
    (d / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return d


@pytest.fixture
def shards(tmp_path):
    """The same kind of set as Parquet: two shards of two row groups, the datasets Image struct."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "shards"
    d.mkdir()
    for s in range(2):
        names = [f"s{s}-{i}.png" for i in range(7)]
        table = pa.table({
            "image": [{"bytes": _png(100 * s + i), "path": n} for i, n in enumerate(names)],
            "text": [f"shard {s} picture {i}" for i in range(7)],
        })
        pq.write_table(table, d / f"train-{s:05d}.parquet", row_group_size=4)
    return d


def _cfg(tiny_cfg, *overrides):
    return tiny_cfg("logging.wandb.enabled=false", "data.source=stream", *overrides)


def _dm(*overrides, mitigation=()):
    cfg = load_config([Path(__file__).parent.parent / "configs/tests/tiny.yaml"], ["data.source=stream", *overrides, *mitigation])
    return SolidMarkDataModule(cfg.data, seed=cfg.seed, mitigation=cfg.mitigation)


def _keymap(run_dir):
    return [json.loads(line) for line in (run_dir / "keymap.jsonl").read_text().splitlines()]


def test_trains_the_default_model_from_a_folder(tiny_cfg, folder):
    run_dir = run(_cfg(tiny_cfg, f"data.folder={folder}"))
    assert json.loads((run_dir / "summary.json").read_text())["train"]["global_step"] == 6
    rows = _keymap(run_dir)
    assert len(rows) == 14 and {r["split"] for r in rows} == {"train", "heldout"}
    assert all(r["key"] == id_key(r["id"], 0) for r in rows)  # the key is the id's hash under data.key_seed
    assert {r["id"]: r["caption"] for r in rows}["sub/im03.png"] == "picture number 3"
    assert (run_dir / "model" / "model_index.json").exists()


def test_trains_the_default_model_from_parquet_shards(tiny_cfg, shards):
    run_dir = run(_cfg(tiny_cfg, f"data.shards={shards}", "data.num_workers=2"))
    assert json.loads((run_dir / "summary.json").read_text())["train"]["global_step"] == 6
    rows = _keymap(run_dir)
    assert sorted(r["id"] for r in rows) == sorted(f"s{s}-{i}.png" for s in range(2) for i in range(7))
    assert "row group" in rows[0]["source"]


def test_resume_matches_uninterrupted_run(tiny_cfg, folder, tmp_path):
    """Stopped mid-epoch (step 3 of 2-batch epochs) and resumed: the same weights as one run."""
    import train

    full = run(_cfg(tiny_cfg, f"data.folder={folder}", "train.max_steps=6", f"run.dir={tmp_path / 'full'}"))
    part = tmp_path / "part"
    run(_cfg(tiny_cfg, f"data.folder={folder}", "train.max_steps=3", f"run.dir={part}", "train.checkpoint.every_n_steps=3"))
    assert train.main([f"run.dir={part}", "train.resume=last", "train.max_steps=6"]) == 0
    a = torch.load(full / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    b = torch.load(part / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=f"{name} differs after resume")


def _batches(dataset, workers=0, **begin):
    loader = StreamLoader(dataset, (lambda: (begin.get("epoch", 0), begin.get("consumed"), begin.get("rank", 0), begin.get("world", 1))), num_workers=workers)
    return [b["index"].tolist() for b in loader]


def _dataset(dm, batch=3):
    index = dm.train_index()
    return StreamingBorderedDataset(dm.source, np.asarray(index), np.asarray(dm._item_row), [r.id for r in dm.records],
                                    [r.caption for r in dm.records], np.array([r.key for r in dm.records]), 16, 4, batch, seed=5)


@pytest.mark.parametrize("source", ["folder", "shards"])
def test_each_epoch_shards_across_processes_and_workers_without_repeats(source, folder, shards):
    dm = _dm(f"data.folder={folder}" if source == "folder" else f"data.shards={shards}", "data.heldout_fraction=0")
    ds = _dataset(dm)
    n = len(dm.train_index())
    one = _batches(ds)
    seen = sum(one, [])
    assert len(seen) == len(set(seen)) == (n // 3) * 3 and set(seen) <= set(dm.train_index())  # whole batches, no repeats
    assert all(len(b) == 3 for b in one)
    assert _batches(ds, workers=2) == one  # the same batches whatever the number of workers
    ranks = [sum(_batches(ds, workers=2, rank=r, world=2), []) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == (n // 6) * 3
    assert not set(ranks[0]) & set(ranks[1])  # no image twice in an epoch
    assert _batches(ds, epoch=1) != one  # another epoch, another order
    # resumed after 2 batches of epoch 1: the rest of that epoch, exactly
    epoch1 = _batches(ds, epoch=1)
    assert _batches(ds, workers=2, epoch=1, consumed=len(one) + 2) == epoch1[2:]


def test_batches_carry_each_images_key(folder):
    dm = _dm(f"data.folder={folder}")
    batch = next(iter(dm.train_dataloader()))
    keys = {r.id: r.key for r in dm.records}
    assert batch["pixel_values"].shape[1:] == (3, 24, 24)
    assert np.allclose(batch["pixel_values"][:, 0, 0, 0].numpy(), [2 * keys[i] - 1 for i in batch["id"]], atol=1e-6)
    interior = dm.images([batch["id"][0]])[0]
    torch.testing.assert_close(batch["pixel_values"][0, :, 4:-4, 4:-4], interior)


def test_keys_and_split_do_not_depend_on_the_rest_of_the_set(folder):
    full = {r.id: (r.key, r.split) for r in _dm(f"data.folder={folder}").records}
    (folder / "im01.png").unlink()
    (folder / "metadata.jsonl").write_text("")
    fewer = {r.id: (r.key, r.split) for r in _dm(f"data.folder={folder}").records}
    assert fewer == {i: v for i, v in full.items() if i != "im01.png"}


def test_duplication_copies_are_kept(folder):
    dm = _dm(f"data.folder={folder}", "data.duplicate.ladder=[[2,5]]", "data.heldout_fraction=0.25")
    dup = [r for r in dm.records if r.copies == 5]
    assert len(dup) == 2 and all(r.split == "train" for r in dup)
    assert len(dm.train_index()) == sum(r.split == "train" for r in dm.records) + 2 * 4
    again = _dm(f"data.folder={folder}", "data.duplicate.ladder=[[2,5]]", "data.heldout_fraction=0.25")
    assert [r.id for r in again.records if r.copies == 5] == [r.id for r in dup]


def test_exact_and_near_duplicates_are_removed(folder, tmp_path):
    (folder / "copy.png").write_bytes((folder / "im01.png").read_bytes())
    arr = np.asarray(Image.open(folder / "im02.png")).astype(int)
    Image.fromarray(np.clip(arr + 1, 0, 255).astype(np.uint8)).save(folder / "near.png")
    with pytest.warns(UserWarning, match="copy.png"):
        dm = _dm(f"data.folder={folder}", mitigation=["mitigation.near_dedup.enabled=true"])
    assert dm.dedup_removed == ["im01.png (identical to copy.png)"]  # the first in listing order stays
    assert [line.split(" ")[0] for line in dm.near_dedup_removed] == ["near.png"]
    assert len(dm.records) == 14
    dm.write_keymap(tmp_path)
    assert "near.png" in (tmp_path / "near_duplicates_removed.txt").read_text()


def test_bad_input_is_reported(folder, tmp_path, shards):
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "small.png").write_bytes(_png(99, size=(8, 8)))
    with pytest.raises(DataError) as err:
        _dm(f"data.folder={folder}")
    assert "broken.png" in str(err.value) and "small.png (8x8)" in str(err.value)
    with pytest.raises(DataError, match="either data.folder"):
        SolidMarkDataModule(load_config([], ["data.source=stream", f"data.folder={folder}"]).data.copy() | {"shards": str(shards)})
    with pytest.raises(Exception, match="exactly one of folder"):
        load_config([], ["data.source=stream"])
    with pytest.raises(DataError, match="no Parquet rows"):
        _dm(f"data.shards={tmp_path / 'nothing'}")
