"""Near-duplicate removal in blocks makes the decisions of the plain greedy rule."""

import pytest
import torch

from eidetic.mitigations import near_duplicates


def greedy_reference(features, threshold):
    """The rule as first written: a full N x N distance matrix, then one greedy pass."""
    d = torch.cdist(features.double(), features.double()) / features.shape[1] ** 0.5
    kept, removed = [], []
    for j in range(features.shape[0]):
        if kept:
            dist = d[j, kept]
            k = int(dist.argmin())
            if float(dist[k]) < threshold:
                removed.append((j, kept[k]))
                continue
        kept.append(j)
    return removed


def planted(n=300, dim=64, seed=0):
    """Random thumbnails with chains of near-duplicates (each a small step from the last) and exact copies."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, dim, generator=g)
    for j in range(20, n, 7):
        src = int(torch.randint(0, j, (1,), generator=g))
        x[j] = x[src] + 0.02 * torch.randn(dim, generator=g)  # chains: a copy of a copy may fall either side
    x[n - 1] = x[3]
    return x.float()


@pytest.mark.parametrize("block,column_block", [(1024, 16384), (7, 5), (64, 13)])
@pytest.mark.parametrize("threshold", [0.01, 0.02, 0.03])
def test_blocks_make_the_greedy_decisions(block, column_block, threshold):
    x = planted()
    found = near_duplicates(x, threshold, block=block, column_block=column_block)
    assert [(d.removed, d.kept) for d in found] == greedy_reference(x, threshold)
    assert found, "the planted set must exercise removals"


def test_never_builds_the_full_matrix(monkeypatch):
    x = planted(n=200)
    expected = greedy_reference(x, 0.02)
    monkeypatch.setattr(torch, "cdist", lambda *a, **k: pytest.fail("near_duplicates must not build an N x N matrix"))
    assert [(d.removed, d.kept) for d in near_duplicates(x, 0.02, block=16, column_block=32)] == expected


def test_exact_copies_have_distance_zero_and_empty_input():
    x = planted()
    last = [d for d in near_duplicates(x, 0.02) if d.removed == x.shape[0] - 1]
    assert last and last[0].kept == 3 and last[0].distance == 0
    assert near_duplicates(torch.zeros(0, 64), 0.02) == []
