"""Monitors on large sets score a fixed, seeded sample stratified by copy count and split."""

from collections import Counter

import pytest

from callbacks.extraction import ExtractionProbeCallback, caption_truth
from callbacks.solidmark import SolidMarkCallback
from eidetic.solidmark import fixed_sample, stratified_sample
from lightning_modules.data import Record


def test_stratified_sample_keeps_rare_strata_and_proportions():
    strata = [1] * 9_000 + [4] * 600 + [32] * 8
    chosen = stratified_sample(strata, 100, seed=3)
    assert chosen == stratified_sample(strata, 100, seed=3) and len(set(chosen)) == 100 == len(chosen)
    counts = Counter(strata[i] for i in chosen)
    assert counts[32] >= 1 and counts[4] in (6, 7) and counts[1] in (92, 93)
    assert fixed_sample(len(strata), 100, seed=3) != chosen  # plain sampling would miss the rare ones
    assert Counter(strata[i] for i in stratified_sample(strata, 2, seed=0)) == {32: 1, 4: 1}  # rarest first
    assert stratified_sample([1] * 50, 10, seed=5) == fixed_sample(50, 10, seed=5)  # one stratum: as before
    assert stratified_sample(strata, None) == list(range(len(strata)))
    with pytest.raises(ValueError):
        stratified_sample(strata, len(strata) + 1)


def _records(n=6_000):
    out = []
    for i in range(n):
        split = "heldout" if i % 8 == 0 else "train"
        copies = 16 if split == "train" and i % 997 == 1 else 1
        out.append(Record(id=f"im{i}", source=f"/d/im{i}.png", caption=f"caption {i}", key=0.5, copies=copies, split=split))
    return out


def test_solidmark_samples_a_large_split_instead_of_scoring_all():
    records = _records()
    cb = SolidMarkCallback(max_sample=200)
    chosen = cb.sample_indices(records)
    splits = Counter(records[i].split for i in chosen)
    assert splits == {"train": 200, "heldout": 200}
    assert any(records[i].copies == 16 for i in chosen)  # the duplicated images are in it
    assert chosen == SolidMarkCallback(max_sample=200).sample_indices(records)
    small = _records(40)
    assert len(SolidMarkCallback(max_sample=200).sample_indices(small)) == 40  # small sets: every image, as before


def test_extraction_probe_caps_heldout_captions_and_the_reference_set():
    records = _records()
    truth = caption_truth(records)
    cb = ExtractionProbeCallback(max_train_captions=50, verify={"max_reference": 300})
    captions = cb._captions(truth)
    trained = [c for c in captions if truth[c].trained]
    assert len(trained) == 50 and len(captions) - len(trained) == 50
    assert all(c in trained for c, t in truth.items() if t.duplicated)  # duplicated ones always kept
    ref = cb._reference_ids(truth, captions)
    assert len(ref) == 300 and {i for c in trained for i in truth[c].ids} <= set(ref)
    assert ref == cb._reference_ids(truth, captions)
