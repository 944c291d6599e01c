"""ExtractionProbeCallback end to end on the empirical oracle, through the data-module and
module contract of the foundation (records, canvases(ids), cfg, run_dir, diffusion_model).

The oracle knows the captions of the duplicated images (it memorized them) and not those
of the single-copy images, so the callback's duplicated-vs-single AUC must be 1 and the
verified extractions must be the duplicated images."""

from __future__ import annotations

import csv
import json
import os
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from diffusers import DDPMScheduler
from omegaconf import OmegaConf

from callbacks.extraction import ExtractionProbeCallback, caption_truth
from eidetic.borders import add_border, make_keys
from eidetic.diffusion import DiffusionModel
from eidetic.oracle import EmpiricalDenoiser
from tests.test_extraction import rectangles

SNIPPET = os.path.join(os.path.dirname(__file__), "..", "configs", "extraction.yaml-snippet")


class OracleDataModule:
    def __init__(self, n_dup=4, n_single=4, n_heldout=3, copies=3):
        gen = torch.Generator().manual_seed(0)
        n = n_dup + n_single + n_heldout
        self.images = add_border(rectangles(n, 8, gen), make_keys(n, 0).float(), thickness=2)  # 12 px canvases
        self.records = []
        for i in range(n):
            split = "heldout" if i >= n_dup + n_single else "train"
            self.records.append(
                SimpleNamespace(id=f"img{i}", source=f"photo{i}", caption=f"caption {i}", key=0.0,
                                copies=copies if i < n_dup else 1, split=split)
            )
        self.table = {r.caption: torch.randint(-1, 2, (2, 4), generator=gen).float() for r in self.records}
        self.table[""] = torch.zeros(2, 4)
        self.n_dup = n_dup

    def canvases(self, ids):
        index = {r.id: k for k, r in enumerate(self.records)}
        return self.images[[index[i] for i in ids]]

    def encode(self, captions):
        return torch.stack([self.table[c] for c in captions])


class OracleModule:
    """What the callback needs from LatentDiffusionModule."""

    def __init__(self, dm, cfg, run_dir):
        self.cfg, self.run_dir, self.training = cfg, run_dir, True
        scheduler = DDPMScheduler()
        trained = [r for r in dm.records if r.split == "train"]
        data = dm.canvases([r.id for r in trained])
        # memorized duplicated images only: single-copy captions get an embedding nobody queries
        emb = torch.stack([dm.table[r.caption] if r.copies > 1 else torch.full((2, 4), 9.0) for r in trained])
        self.model = DiffusionModel(EmpiricalDenoiser(data, scheduler.alphas_cumprod, emb), scheduler, dm.encode)

    def diffusion_model(self, ema=True):
        return self.model

    def eval(self):
        self.training = False

    def train(self, mode=True):
        self.training = mode


def test_callback_writes_csv_summary_and_separates_duplicated(tmp_path):
    cfg = OmegaConf.merge(OmegaConf.load(SNIPPET), {"data": {"border": 2}})
    cfg.extraction.detectors = ["denoising_confidence", "edge_consistency", "noise_prediction_norm", "clique"]
    cfg.extraction.wen.steps, cfg.extraction.wen.first_steps = 10, 2
    cfg.extraction.clique.generations, cfg.extraction.clique.steps, cfg.extraction.clique.min_clique = 4, 5, 3
    cfg.extraction.clique.tiles = 3
    cfg.extraction.verify.steps = 10
    cfg.extraction.top_k = 4
    dm = OracleDataModule()
    module = OracleModule(dm, cfg, tmp_path)
    trainer = SimpleNamespace(is_global_zero=True, global_step=10, datamodule=dm, loggers=[])
    callback = ExtractionProbeCallback()

    callback.on_train_batch_end(trainer, module, None, None, 0)  # step 10 is not on the 500-step schedule
    assert not (tmp_path / "extraction.csv").exists()
    callback.on_train_end(trainer, module)
    assert module.training  # training mode restored

    summary = json.loads((tmp_path / "summary.json").read_text())["extraction"]
    for name in ("denoising_confidence", "edge_consistency", "noise_prediction_norm", "clique"):
        assert summary[name]["auc"] == 1.0, (name, summary[name])
        assert summary[name]["precision_at_k"] == 1.0
        assert summary[name]["auc_trained_vs_heldout"] > 0.7
    assert summary["denoising_confidence"]["unet_evals_per_caption"] == (11 + 1) / 11
    assert summary["edge_consistency"]["unet_evals_per_caption"] == 4
    assert summary["clique"]["unet_evals_per_caption"] == 20
    assert summary["verified_extractions"] == 4 and summary["verified_matching"] == 4
    rows = list(csv.DictReader(open(tmp_path / "extraction.csv")))
    assert len(rows) == 11 and {r["split"] for r in rows} == {"train", "heldout"}
    assert sorted(r["caption"] for r in rows if r["verified"] == "matching") == [f"caption {i}" for i in range(4)]

    truth = caption_truth(dm.records)
    assert truth["caption 0"].duplicated is True and truth["caption 5"].duplicated is False
    assert truth["caption 9"].duplicated is None and not truth["caption 9"].trained
    # a duplicated image listed once per copy reads the same as one listed with copies=k
    per_copy = [SimpleNamespace(id=f"a{k}", source="a", caption="x", copies=1, split="train") for k in range(3)]
    shared = [SimpleNamespace(id=f"b{k}", source=f"b{k}", caption="y", copies=1, split="train") for k in range(2)]
    truth = caption_truth(per_copy + shared)
    assert (truth["x"].n_images, truth["x"].copies, truth["x"].duplicated) == (1, 3, True)
    assert (truth["y"].n_images, truth["y"].duplicated) == (2, None)
