"""ExtractionProbeCallback: score training and held-out captions with the extraction probes.

Schedules and feeds :mod:`eidetic.extraction`; computes nothing itself. On a schedule
(every ``extraction.every_n_steps`` optimizer steps, and at the end of training) it scores
the distinct training captions (or a seeded sample of them) plus the held-out captions
with each configured detector, and reports

* AUC against the ground truth the data module knows: captions of duplicated images vs
  captions of single images (each carried by exactly one training image), and training
  vs held-out captions;
* ``precision_at_k`` of the top-k captions for "duplicated";
* the top-k captions of the first detector, verified with full-sampler generations
  against the training canvases (template copies: right interior, other border key);
* ``extraction.csv`` (one row per caption and probe round), the ``extraction`` section of
  ``summary.json``, and on W&B: score histograms, AUCs, and a table of the top-k captions
  with their one-step image, their generation and the nearest training image.

Only global rank 0 probes and writes (the probes are deterministic given the seed); the
other processes receive its rows, so controls acting on them agree across ranks.
"""

from __future__ import annotations

import csv
import io
import math
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.pytorch import Callback

from eidetic import extraction as ex
from eidetic.borders import border_mask
from eidetic.io import update_summary, write_text_atomic

__all__ = ["ExtractionProbeCallback", "CaptionTruth", "caption_truth"]

DETECTORS = ("denoising_confidence", "edge_consistency", "noise_prediction_norm", "clique")


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


def _section(cfg):
    section = cfg.get("extraction") if hasattr(cfg, "get") else None
    if section is None:
        raise ValueError("the config has no 'extraction' section; add it (see configs/default.yaml)")
    return section


class ExtractionProbeCallback(Callback):
    """Runs the extraction probes on the schedule in ``cfg.extraction``."""

    def __init__(self, cfg=None):
        super().__init__()
        self._cfg = cfg
        self.rows: list[dict] = []
        self.history: list[dict] = []
        self._last_step = -1

    # ---- schedule ------------------------------------------------------------------
    def _settings(self, pl_module):
        return _section(self._cfg if self._cfg is not None else pl_module.cfg)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        s = self._settings(pl_module)
        every = int(s.every_n_steps or 0)
        step = trainer.global_step
        if s.enabled and every > 0 and step > 0 and step % every == 0 and step != self._last_step:
            self.probe(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        s = self._settings(pl_module)
        if s.enabled and s.at_end and trainer.global_step != self._last_step:
            self.probe(trainer, pl_module)

    # ---- one probe round -----------------------------------------------------------
    def probe(self, trainer, pl_module) -> dict | None:
        self._last_step = trainer.global_step
        section = self._probe(trainer, pl_module) if trainer.is_global_zero else None
        if trainer.world_size > 1:
            # Only rank 0 probes, but the controls read the verified captions on every
            # process: an image excluded on one rank only would give the ranks samplers of
            # different lengths and hang DDP. So every process takes rank 0's rows.
            rows = [r for r in self.rows if r["step"] == trainer.global_step] if trainer.is_global_zero else None
            rows, section = trainer.strategy.broadcast((rows, section), src=0)
            if not trainer.is_global_zero:
                self.rows.extend(rows or [])
                if section is not None:
                    self.history.append(section)
        return section

    @torch.no_grad()
    def _probe(self, trainer, pl_module) -> dict | None:
        s = self._settings(pl_module)
        cfg = self._cfg if self._cfg is not None else pl_module.cfg
        dm = trainer.datamodule
        truth = caption_truth(dm.records)
        captions = self._captions(truth, s)
        if not captions:
            return None
        was_training = pl_module.training
        pl_module.eval()
        try:
            model = pl_module.diffusion_model(ema=True)
            train_ids = sorted({i for t in truth.values() for i in t.ids})
            train_canvases = dm.canvases(train_ids)
            shape = tuple(train_canvases.shape[-2:])
            results = self._run_detectors(model, captions, shape, s)
            verification = self._verify(model, results[0], truth, train_ids, train_canvases, cfg, s)
        finally:
            pl_module.train(was_training)
        section = self._summarise(results, captions, truth, verification, trainer.global_step, s)
        self._write(pl_module, results, captions, truth, verification, trainer.global_step, section)
        self._log(trainer, results, captions, verification, train_canvases, section)
        return section

    def _captions(self, truth: dict[str, CaptionTruth], s) -> list[str]:
        trained = sorted(c for c, t in truth.items() if t.trained)
        limit = int(s.max_train_captions or 0)
        if 0 < limit < len(trained):
            rng = random.Random(int(s.seed))
            # keep every caption of a duplicated image: they are the rare positives
            dup = [c for c in trained if truth[c].duplicated]
            rest = [c for c in trained if not truth[c].duplicated]
            trained = sorted(dup[:limit] + rng.sample(rest, max(0, min(len(rest), limit - len(dup)))))
        heldout = sorted(c for c, t in truth.items() if not t.trained) if s.heldout else []
        return trained + heldout

    def _run_detectors(self, model, captions, shape, s) -> list[ex.ProbeResult]:
        unknown = [d for d in s.detectors if d not in DETECTORS]
        if unknown:
            raise ValueError(f"unknown extraction detector(s) {unknown}; choose from {list(DETECTORS)}")
        common = {"seed": int(s.seed), "batch_size": int(s.batch_size)}
        results = []
        for name in s.detectors:
            if name == "denoising_confidence":
                r = ex.denoising_confidence(
                    model, captions, shape, guidance=float(s.guidance), reference=str(s.reference), return_images=True, **common
                )
            elif name == "edge_consistency":
                e = s.edge
                r = ex.edge_consistency(
                    model, captions, shape, seeds=int(e.seeds), guidance=float(e.guidance), threshold=float(e.threshold),
                    return_images=True, **common,
                )
            elif name == "noise_prediction_norm":
                w = s.wen
                r = ex.noise_prediction_norm(
                    model, captions, shape, steps=int(w.steps), first_steps=int(w.first_steps), seeds=int(w.seeds),
                    guidance=float(s.guidance), **common,
                )
            else:
                c = s.clique
                r = ex.clique_detector(
                    model, captions, shape, generations=int(c.generations), steps=int(c.steps), guidance=float(s.guidance),
                    threshold=float(c.threshold), min_clique=int(c.min_clique), tiles=int(c.tiles), return_images=True, **common,
                )
            results.append(r)
        return results

    def _verify(self, model, primary: ex.ProbeResult, truth, train_ids, train_canvases, cfg, s):
        v = s.verify
        if not v.enabled or int(s.top_k) < 1:
            return None
        k = min(int(s.top_k), len(primary.captions))
        top = torch.topk(primary.scores, k).indices.tolist()
        id_to_caption = {i: t.caption for t in truth.values() for i in t.ids}
        train_captions = [id_to_caption[i] for i in train_ids]
        mask = None
        if v.template_mask == "border":
            h, w = train_canvases.shape[-2:]
            mask = border_mask(h, w, int(cfg.data.border))
        result = ex.verify_extractions(
            model, [primary.captions[i] for i in top], train_canvases.to(model.device), train_captions,
            generations=int(v.generations), steps=int(v.steps), guidance=float(v.guidance), sampler=str(v.sampler),
            threshold=float(v.threshold), mask=mask, seed=int(s.seed), batch_size=int(s.batch_size),
        )
        return top, result

    # ---- outputs ---------------------------------------------------------------------
    def _summarise(self, results, captions, truth, verification, step, s) -> dict:
        dup = [truth[c].duplicated for c in captions]
        known = torch.tensor([d is not None for d in dup])
        dup_labels = torch.tensor([bool(d) for d in dup])
        trained = torch.tensor([truth[c].trained for c in captions])
        k = int(s.top_k)
        section: dict = {"step": int(step), "captions": len(captions), "heldout_captions": int((~trained).sum())}
        for r in results:
            entry = {
                "auc": _nan_to_none(ex.auc(r.scores[known], dup_labels[known])) if known.any() else None,
                "auc_trained_vs_heldout": _nan_to_none(ex.auc(r.scores, trained)),
                "precision_at_k": ex.precision_at_k(r.scores[known], dup_labels[known], k) if known.any() and k > 0 else None,
                "unet_evals_per_caption": r.unet_evals_per_caption,
                "unet_evals": r.unet_evals,
                "score_mean": float(r.scores.mean()),
            }
            if r.flagged is not None:
                entry["flagged"] = int(r.flagged.sum())
            section[r.name] = entry
        if verification is not None:
            _, v = verification
            section["verified_extractions"] = v.count
            section["verified_matching"] = sum(label == "matching" for label in v.labels)
            section["verified_template"] = sum(label == "template" for label in v.labels)
            section["verification_unet_evals"] = v.unet_evals
        else:
            section["verified_extractions"] = None
        self.history.append(section)
        return section

    def _write(self, pl_module, results, captions, truth, verification, step, section):
        labels = {}
        if verification is not None:
            top, v = verification
            labels = {results[0].captions[i]: (lab, d) for i, lab, d in zip(top, v.labels, v.distances.tolist())}
        for i, c in enumerate(captions):
            t = truth[c]
            row = {
                "step": int(step),
                "caption": c,
                "split": "train" if t.trained else "heldout",
                "n_images": t.n_images,
                "copies": t.copies,
                "duplicated": "" if t.duplicated is None else int(t.duplicated),
            }
            for r in results:
                row[r.name] = float(r.scores[i])
            lab = labels.get(c)
            row["verified"] = lab[0] if lab else ""
            row["verified_distance"] = f"{lab[1]:.5f}" if lab else ""
            self.rows.append(row)
        run_dir = Path(pl_module.run_dir)
        fields = list(dict.fromkeys(key for row in self.rows for key in row))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(self.rows)
        write_text_atomic(run_dir / "extraction.csv", buffer.getvalue())
        update_summary(run_dir, "extraction", section)

    def _log(self, trainer, results, captions, verification, train_canvases, section):
        scalars = {}
        for r in results:
            for key in ("auc", "auc_trained_vs_heldout", "precision_at_k", "unet_evals_per_caption"):
                value = section[r.name].get(key)
                if value is not None:
                    scalars[f"extraction/{r.name}/{key}"] = value
        if section.get("verified_extractions") is not None:
            scalars["extraction/verified_extractions"] = section["verified_extractions"]
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=trainer.global_step)
        wandb_loggers = [lg for lg in trainer.loggers if type(lg).__name__ == "WandbLogger"]
        if not wandb_loggers:
            return
        import wandb

        run = wandb_loggers[0].experiment
        payload = {f"extraction/{r.name}/scores": wandb.Histogram(r.scores.numpy()) for r in results}
        if verification is not None:
            top, v = verification
            primary = results[0]
            table = wandb.Table(columns=["rank", "caption", "score", "one_step", "generation", "nearest_training", "label", "distance"])
            for rank, (i, label) in enumerate(zip(top, v.labels)):
                one_step = primary.images[i] if primary.images is not None else None
                table.add_data(
                    rank, primary.captions[i], float(primary.scores[i]), _wandb_image(wandb, one_step),
                    _wandb_image(wandb, v.images[rank]), _wandb_image(wandb, train_canvases[int(v.nearest[rank])]),
                    label, float(v.distances[rank]),
                )
            payload["extraction/top_k"] = table
        run.log(payload, step=trainer.global_step)


def _wandb_image(wandb, image):
    if image is None:
        return None
    array = ((image.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
    return wandb.Image(array)


def _nan_to_none(value: float) -> float | None:
    return None if value is None or math.isnan(value) else value
