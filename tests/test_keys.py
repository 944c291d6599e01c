"""Keys and splits from ids (a keyed hash), and the key map written chunk by chunk."""

import json

import numpy as np

from eidetic.io import JsonlChunkWriter
from eidetic.keys import id_key, id_split, id_uniforms, lowest_ranked


def test_keys_are_a_function_of_id_and_seed_only():
    ids = [f"img{i:05d}.png" for i in range(2000)]
    keys = id_uniforms(ids, 3, "key")
    assert keys.tolist() == [id_key(i, 3) for i in ids]
    assert id_uniforms(ids[::-1], 3, "key").tolist() == keys[::-1].tolist()  # order plays no part
    assert (keys >= 0).all() and (keys < 1).all() and len(set(keys.tolist())) == len(ids)
    assert abs(keys.mean() - 0.5) < 0.03 and np.histogram(keys, 4, (0, 1))[0].min() > 400  # uniform
    assert not np.allclose(id_uniforms(ids, 4, "key"), keys)  # the seed changes them
    assert abs(np.corrcoef(keys, id_uniforms(ids, 3, "split"))[0, 1]) < 0.1  # purposes are separate hashes


def test_split_fraction_and_stability():
    ids = [f"x/{i}.jpg" for i in range(4000)]
    held = [i for i in ids if id_split(i, 0, 0.25) == "heldout"]
    assert 900 < len(held) < 1100
    assert [i for i in ids if id_split(i, 0, 0.0) == "heldout"] == []
    assert set(held) <= {i for i in ids if id_split(i, 0, 0.4) == "heldout"}  # a larger fraction only adds


def test_lowest_ranked_ignores_order():
    ids = [str(i) for i in range(500)]
    assert lowest_ranked(ids, 7, 1, "ladder") == lowest_ranked(ids[::-1], 7, 1, "ladder")
    assert len(set(lowest_ranked(ids, 7, 1, "ladder"))) == 7


def test_chunk_writer_is_crash_safe_and_resumes(tmp_path):
    path = tmp_path / "keymap.jsonl"
    rows = [{"id": f"r{i}", "key": i / 100} for i in range(25)]
    w = JsonlChunkWriter(path, chunk_rows=10)
    for r in rows[:23]:
        w.write(r)
    w.abandon()  # killed with 3 rows pending after two committed chunks
    assert not path.exists()
    w = JsonlChunkWriter(path, chunk_rows=10, resume=True)
    assert w.rows_done == 20
    for r in rows[w.rows_done:]:
        w.write(r)
    w.close()
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keymap.jsonl"]
    # without resume a new writer starts over
    w = JsonlChunkWriter(path, chunk_rows=10)
    w.write(rows[0])
    w.close()
    assert path.read_text().count("\n") == 1
