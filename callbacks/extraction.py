"""ExtractionProbeCallback: score training and held-out captions with the extraction probes.

Schedules and feeds :mod:`eidetic.extraction`; computes nothing itself. On a schedule
(every ``extraction.every_n_steps`` optimizer steps, and at the end of training) it scores
the distinct training captions (or a seeded sample of them) plus the held-out captions
with each configured detector (looked up in :data:`eidetic.extraction.DETECTORS`), and reports

* AUC (rank, with its bootstrap interval and TPR at 1 % FPR) against the ground truth the
  data module knows: captions of duplicated images vs captions of single images (each
  carried by exactly one training image), and training vs held-out captions;
* ``precision_at_k`` of the top-k captions for "duplicated";
* the top-k captions of the first detector, verified with full-sampler generations against
  the training canvases (template copies: right interior, other border key); the training
  image a verified generation copies is what the monitor flags for the controls;
* ``extraction.csv`` (one row per caption and probe round), the ``extraction`` section of
  ``summary.json``, and on W&B: score histograms, AUCs, and a table of the top-k captions
  with their one-step image, their generation and the nearest training image.

Under multi-process training each process scores its share of the captions (the probes'
noise is shared by all captions or seeded per caption, so the split does not change a
score) and the scores are gathered by torchmetrics; verification is split the same way.
Every process ends with the same rows, so controls acting on them agree across ranks.
"""

from __future__ import annotations

import csv
import io
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchmetrics.aggregation import CatMetric

from eidetic.borders import border_mask
from eidetic.config import build_section
from eidetic.extraction import DETECTORS, precision_at_k, verify_extractions
from eidetic.figures import roc_curves
from eidetic.io import update_summary, write_npz_atomic, write_text_atomic
from eidetic.schema.train import ExtractionSettings
from eidetic.stats import auc_report

from .loggers import log_figure, log_scalars, log_wandb
from .monitor import Monitor, MonitorResult

__all__ = ["ExtractionProbeCallback", "CaptionTruth", "caption_truth", "detector_options"]


@dataclass
class CaptionTruth:
    """What the data module knows about one distinct caption."""

    caption: str
    trained: bool  # carried by at least one training record
    n_images: int  # distinct training images (records) carrying it
    copies: int  # total training copies of those images
    ids: list[str]  # training record ids carrying it

    @property
    def duplicated(self) -> bool | None:
        """True: one image, repeated; False: one image, once; None: shared or held-out."""
        if not self.trained or self.n_images != 1:
            return None
        return self.copies > 1


def caption_truth(records) -> dict[str, CaptionTruth]:
    """Group data-module records (id, source, caption, copies, split) by caption.

    An image is its ``source``; its copy count is the larger of its records' ``copies``
    and the number of training records it has, so the truth is the same whether the data
    module lists a duplicated image once (with ``copies`` = k) or once per copy.
    """
    by_caption: dict[str, CaptionTruth] = {}
    per_source: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        by_caption.setdefault(r.caption, CaptionTruth(r.caption, False, 0, 0, []))
        if r.split == "train":
            per_source[r.caption][r.source].append(r)
    for caption, sources in per_source.items():
        t = by_caption[caption]
        t.trained = True
        t.n_images = len(sources)
        t.copies = sum(max(max(int(r.copies) for r in recs), len(recs)) for recs in sources.values())
        t.ids = [r.id for recs in sources.values() for r in recs]
    return by_caption


def detector_options(name: str, s: ExtractionSettings) -> dict:
    """The keyword options of detector ``name`` from the ``extraction`` section."""
    if name == "denoising_confidence":
        return {"guidance": float(s.guidance), "seeds": int(s.confidence.seeds), "reference": str(s.confidence.reference), "sigma": s.sigma}
    if name == "edge_consistency":
        e = s.edge
        return {"seeds": int(e.seeds), "guidance": float(e.guidance), "threshold": float(e.threshold), "sigma": s.sigma,
                "channel_smoothing": bool(e.channel_smoothing), "resize": e.resize}
    if name == "noise_prediction_norm":
        return {"steps": int(s.wen.steps), "first_steps": int(s.wen.first_steps), "seeds": int(s.wen.seeds), "guidance": float(s.guidance)}
    if name == "anisotropy":
        a = s.anisotropy
        return {"steps": int(a.steps), "low_step": int(a.low_step), "gamma_norm": float(a.gamma_norm),
                "gamma_cosine": float(a.gamma_cosine), "norm_scale": str(a.norm_scale)}
    if name == "clique":
        c = s.clique
        return {"generations": int(c.generations), "steps": int(c.steps), "guidance": float(s.guidance), "threshold": float(c.threshold),
                "min_clique": int(c.min_clique), "tiles": int(c.tiles)}
    return {}


def _gather(trainer, rows: torch.Tensor) -> torch.Tensor:
    """Concatenate every process's (n_i, k) rows (float64) through torchmetrics."""
    metric = CatMetric(nan_strategy="disable").to(rows.device)
    metric.update(rows)
    if trainer.world_size == 1 and rows.numel() == 0:
        return rows
    out = metric.compute()
    return out.reshape(-1, rows.shape[1]).cpu()


class ExtractionProbeCallback(Monitor):
    """Runs the extraction probes on the schedule of the ``extraction`` config section."""

    source = "extraction"

    def __init__(self, settings=None, border: int = 1, **overrides):
        super().__init__()
        self.settings: ExtractionSettings = build_section(ExtractionSettings, settings, **overrides)
        self.border = int(border)
        self.rows: list[dict] = []
        self.history: list[dict] = []
        self._last_step = -1

    # ---- schedule ------------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        every = int(self.settings.every_n_steps or 0)
        step = trainer.global_step
        if self.settings.enabled and every > 0 and step > 0 and step % every == 0 and step != self._last_step:
            self.probe(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        if self.settings.enabled and self.settings.at_end and trainer.global_step != self._last_step:
            self.probe(trainer, pl_module)

    # ---- one probe round -----------------------------------------------------------
    @torch.no_grad()
    def probe(self, trainer, pl_module) -> dict | None:
        self._last_step = trainer.global_step
        dm = trainer.datamodule
        truth = caption_truth(dm.records)
        captions = self._captions(truth)
        if not captions:
            return None
        rank, world = trainer.global_rank, max(1, trainer.world_size)
        mine = list(range(len(captions)))[rank::world]
        was_training = pl_module.training
        pl_module.eval()
        try:
            model = pl_module.diffusion_model(ema=True)
            train_ids = self._reference_ids(truth, captions)
            train_canvases = dm.canvases(train_ids)
            shape = tuple(train_canvases.shape[-2:])
            scores, evals, images = self._score(trainer, model, [captions[i] for i in mine], mine, shape)
            verification = self._verify(trainer, model, captions, scores[0], truth, train_ids, train_canvases)
        finally:
            pl_module.train(was_training)
        section = self._summarise(scores, evals, captions, truth, verification, trainer.global_step)
        flagged = {train_ids[v["nearest"]] for v in (verification or {}).values() if v["label"] != "none"}
        self.publish(MonitorResult(source=self.source, step=trainer.global_step, flagged=frozenset(flagged)))
        self._record(scores, captions, truth, verification, trainer.global_step)
        if trainer.is_global_zero:
            self._write(pl_module, section)
            self._log(trainer, scores, captions, verification, train_canvases, train_ids, section, images)
        return section

    def _reference_ids(self, truth: dict[str, CaptionTruth], captions: list[str]) -> list[str]:
        """The training images generations are checked against: all of them up to
        ``verify.max_reference``; beyond, those of the probed captions and a seeded sample of
        the rest, so a large set is never decoded whole."""
        everything = sorted({i for t in truth.values() for i in t.ids})
        cap = int(self.settings.verify.max_reference)
        if len(everything) <= cap:
            return everything
        probed = {i for c in captions for i in truth[c].ids}
        rest = [i for i in everything if i not in probed]
        extra = random.Random(int(self.settings.seed) + 2).sample(rest, max(0, min(len(rest), cap - len(probed))))
        return sorted(probed | set(extra))

    def _captions(self, truth: dict[str, CaptionTruth]) -> list[str]:
        s = self.settings
        trained = sorted(c for c, t in truth.items() if t.trained)
        limit = int(s.max_train_captions or 0)
        if 0 < limit < len(trained):
            rng = random.Random(int(s.seed))
            # keep every caption of a duplicated image: they are the rare positives
            dup = [c for c in trained if truth[c].duplicated]
            rest = [c for c in trained if not truth[c].duplicated]
            trained = sorted(dup[:limit] + rng.sample(rest, max(0, min(len(rest), limit - len(dup)))))
        heldout = sorted(c for c, t in truth.items() if not t.trained) if s.heldout else []
        if 0 < limit < len(heldout):
            heldout = sorted(random.Random(int(s.seed) + 1).sample(heldout, limit))
        return trained + heldout

    def _score(self, trainer, model, captions, ids, shape):
        """Every detector's scores for all captions (gathered), its UNet evaluations, and this
        process's one-step images of the first detector (for the W&B table)."""
        s = self.settings
        columns, evals, images = [], {}, {}
        for name in s.detectors:
            if captions:
                r = DETECTORS[name](model, captions, shape, seed=int(s.seed), batch_size=int(s.batch_size), return_images=True,
                                    **detector_options(name, s), **({"noise_ids": ids} if name == "clique" else {}))
                local, spent = r.scores.double(), r.unet_evals
                if r.images is not None:
                    images[name] = dict(zip(ids, r.images))
            else:
                local, spent = torch.zeros(0, dtype=torch.float64), 0
            rows = torch.stack([torch.tensor(ids, dtype=torch.float64), local], dim=1) if captions else torch.zeros(0, 2, dtype=torch.float64)
            gathered = _gather(trainer, rows)
            order = torch.argsort(gathered[:, 0])
            columns.append(gathered[order, 1])
            evals[name] = int(trainer.strategy.reduce(torch.tensor(float(spent)), reduce_op="sum").item()) if trainer.world_size > 1 else spent
        return columns, evals, images

    def _verify(self, trainer, model, captions, primary, truth, train_ids, train_canvases) -> dict[int, dict] | None:
        """caption index -> {label, nearest, distance} for the top-k captions of the first detector."""
        s, v = self.settings, self.settings.verify
        if not v.enabled or int(s.top_k) < 1:
            return None
        k = min(int(s.top_k), len(captions))
        top = torch.topk(primary, k).indices.tolist()
        rank, world = trainer.global_rank, max(1, trainer.world_size)
        mine = top[rank::world]
        mask = border_mask(*train_canvases.shape[-2:], self.border) if v.template_mask == "border" else None
        id_to_caption = {i: t.caption for t in truth.values() for i in t.ids}
        labels = ("none", "matching", "template")
        rows = torch.zeros(0, 4, dtype=torch.float64)
        if mine:
            result = verify_extractions(
                model, [captions[i] for i in mine], train_canvases.to(model.device), [id_to_caption[i] for i in train_ids],
                generations=int(v.generations), steps=int(v.steps), guidance=float(v.guidance), sampler=str(v.sampler),
                threshold=float(v.threshold), mask=mask, seed=int(s.seed), batch_size=int(s.batch_size), noise_ids=mine,
            )
            rows = torch.tensor([[i, labels.index(lab), int(n), float(d)] for i, lab, n, d in
                                 zip(mine, result.labels, result.nearest.tolist(), result.distances.tolist())], dtype=torch.float64)
            self._verification_images = dict(zip(mine, result.images))
            self._verification_evals = result.unet_evals
        gathered = _gather(trainer, rows)
        return {int(r[0]): {"label": labels[int(r[1])], "nearest": int(r[2]), "distance": float(r[3])} for r in gathered}

    # ---- outputs ---------------------------------------------------------------------
    def _summarise(self, scores, evals, captions, truth, verification, step) -> dict:
        dup = [truth[c].duplicated for c in captions]
        known = torch.tensor([d is not None for d in dup])
        dup_labels = torch.tensor([bool(d) for d in dup])
        trained = torch.tensor([truth[c].trained for c in captions])
        k = int(self.settings.top_k)
        section: dict = {"step": int(step), "captions": len(captions), "heldout_captions": int((~trained).sum())}
        for name, column in zip(self.settings.detectors, scores):
            dup_report = auc_report(column[known], dup_labels[known]) if known.any() else None
            heldout_report = auc_report(column, trained)
            entry = {
                "auc": dup_report["auc"] if dup_report else None,
                "auc_duplicated": dup_report,
                "auc_trained_vs_heldout": heldout_report["auc"],
                "trained_vs_heldout": heldout_report,
                "precision_at_k": precision_at_k(column[known], dup_labels[known], k) if known.any() and k > 0 else None,
                "unet_evals_per_caption": evals[name] / max(1, len(captions)),
                "unet_evals": evals[name],
                "score_mean": float(column.mean()),
            }
            section[name] = entry
        if verification is not None:
            labels = [v["label"] for v in verification.values()]
            section["verified_extractions"] = sum(label != "none" for label in labels)
            section["verified_matching"] = labels.count("matching")
            section["verified_template"] = labels.count("template")
        else:
            section["verified_extractions"] = None
        self.history.append(section)
        return section

    def _record(self, scores, captions, truth, verification, step) -> None:
        for i, c in enumerate(captions):
            t = truth[c]
            row = {
                "step": int(step), "caption": c, "split": "train" if t.trained else "heldout", "n_images": t.n_images,
                "copies": t.copies, "duplicated": "" if t.duplicated is None else int(t.duplicated),
            }
            for name, column in zip(self.settings.detectors, scores):
                row[name] = float(column[i])
            v = (verification or {}).get(i)
            row["verified"] = v["label"] if v else ""
            row["verified_distance"] = f"{v['distance']:.5f}" if v else ""
            self.rows.append(row)

    def _write(self, pl_module, section) -> None:
        run_dir = Path(pl_module.run_dir)
        fields = list(dict.fromkeys(key for row in self.rows for key in row))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(self.rows)
        write_text_atomic(run_dir / "extraction.csv", buffer.getvalue())
        update_summary(run_dir, "extraction", section)

    def _log(self, trainer, scores, captions, verification, train_canvases, train_ids, section, images):
        scalars = {}
        for name in self.settings.detectors:
            for key in ("auc", "auc_trained_vs_heldout", "precision_at_k", "unet_evals_per_caption"):
                scalars[f"extraction/{name}/{key}"] = section[name].get(key)
        scalars["extraction/verified_extractions"] = section.get("verified_extractions")
        log_scalars(trainer, scalars)
        if verification:
            self._save_verified(trainer, scores, captions, verification, train_canvases, train_ids)
        step = int(trainer.global_step)
        figure_rows = [r for r in self.rows if r["step"] == step]
        log_figure(trainer, "extraction/roc_curves", lambda: roc_curves(figure_rows, self.settings.detectors))

        def payload(wandb):
            out = {f"extraction/{name}/scores": wandb.Histogram(column.numpy()) for name, column in zip(self.settings.detectors, scores)}
            if verification:
                one_step = images.get(self.settings.detectors[0], {})
                generated = getattr(self, "_verification_images", {})
                table = wandb.Table(columns=["caption", "score", "one_step", "generation", "nearest_training", "label", "distance"])
                for i, v in sorted(verification.items(), key=lambda kv: -float(scores[0][kv[0]])):
                    table.add_data(captions[i], float(scores[0][i]), _wandb_image(wandb, one_step.get(i)),
                                   _wandb_image(wandb, generated.get(i)), _wandb_image(wandb, train_canvases[v["nearest"]]),
                                   v["label"], v["distance"])
                out["extraction/top_k"] = table
            return out

        log_wandb(trainer, payload)

    def _save_verified(self, trainer, scores, captions, verification, train_canvases, train_ids) -> None:
        """``extraction/verified.npz``: the newest round's verified captions (most suspicious
        first), each generation beside the training image nearest to it, for the report.
        Under multi-process training the generations are this process's share."""
        from .loggers import to_uint8

        generated = getattr(self, "_verification_images", {})
        chosen = [i for i in sorted(verification, key=lambda i: -float(scores[0][i])) if i in generated]
        if not chosen:
            return
        v = [verification[i] for i in chosen]
        write_npz_atomic(
            Path(trainer.lightning_module.run_dir) / "extraction" / "verified.npz",
            step=int(trainer.global_step), detector=self.settings.detectors[0], caption=[captions[i] for i in chosen],
            score=[float(scores[0][i]) for i in chosen], label=[x["label"] for x in v], distance=[x["distance"] for x in v],
            nearest_id=[train_ids[x["nearest"]] for x in v], threshold=float(self.settings.verify.threshold),
            generated=np.stack([to_uint8(generated[i]) for i in chosen]),
            nearest=np.stack([to_uint8(train_canvases[x["nearest"]]) for x in v]),
        )


def _wandb_image(wandb, image):
    if image is None:
        return None
    array = ((image.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
    return wandb.Image(array)
