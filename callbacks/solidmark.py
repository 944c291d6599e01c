"""SolidMark monitor: per-image memorization scores during training.

Every ``every_n_steps`` optimizer steps / ``every_n_epochs`` epochs and at the end of
training, a fixed sample of training and held-out images (the same ids every time, so the
curves are comparable) is outpainted with the EMA weights and scored with
:mod:`eidetic.solidmark`. Results go to

* the loggers (W&B curves: eidetic counts, chance counts and p-values per δ for both
  splits, the AUCs, cost; a table of the most-memorized images and a grid),
* ``solidmark.csv`` in the run directory (one row per image per evaluation),
* the ``solidmark`` section of ``summary.json``,
* a :class:`~callbacks.monitor.MonitorResult` (counts vs chance per δ for stop rules, and
  the training images whose per-image test is significant under false-discovery control
  at ``solidmark.flag_q``) that the memorization controls read.

Under multi-process training each process outpaints its share of the sample (noise is
seeded per image, so the split does not change the result) and the per-image scores are
gathered by torchmetrics; only rank 0 writes.
"""

from __future__ import annotations

import csv
import logging
import io
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from torchmetrics import Metric

from eidetic.config import build_section
from eidetic.figures import ell_histograms
from eidetic.io import update_summary, write_npz_atomic, write_text_atomic
from eidetic.schema.train import SolidMarkSettings
from eidetic.solidmark import SolidMarkMetric, autoencoder_floor, chance_probability, stratified_sample, outpaint_border

from .loggers import log_figure, log_image, log_scalars, log_wandb, to_uint8
from .monitor import BudgetSignal, Monitor, MonitorResult

__all__ = ["SolidMarkCallback", "GeneratedCanvases"]

log = logging.getLogger("eidetic")


class GeneratedCanvases(Metric):
    """Generated canvases gathered across processes (for the table and grid on rank 0)."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("canvases", default=[], dist_reduce_fx="cat")
        self.add_state("index", default=[], dist_reduce_fx="cat")

    def update(self, canvases: torch.Tensor, index: torch.Tensor) -> None:
        self.canvases.append(canvases.to(self.device, torch.float32))
        self.index.append(torch.as_tensor(index).reshape(-1).to(self.device, torch.float64))

    def compute(self) -> dict[int, torch.Tensor]:
        canvases = self.canvases if isinstance(self.canvases, torch.Tensor) else torch.cat(self.canvases)
        index = self.index if isinstance(self.index, torch.Tensor) else torch.cat(self.index)
        return {int(i): c.cpu() for i, c in zip(index.reshape(-1).tolist(), canvases)}


def _delta_name(delta: float) -> str:
    return f"{delta:g}"


class SolidMarkCallback(Monitor):
    """The SolidMark monitor; ``settings`` is the ``solidmark`` config section (or keywords of it)."""

    source = "solidmark"

    def __init__(self, settings=None, **overrides):
        super().__init__()
        self.settings: SolidMarkSettings = build_section(SolidMarkSettings, settings, **overrides)
        self._last_step = -1
        self._sample: list[int] | None = None  # record indices: trained sample, then held-out
        self.history: list[dict] = []
        self.total_unet_evals = 0
        self.total_seconds = 0.0
        self.floor: dict | None = None
        self.last_result: dict | None = None

    # ---- checkpointed state: a resumed run continues the same curves and cost totals ----
    @property
    def last_step(self) -> int | None:
        """Global step of the newest evaluation (None before the first)."""
        return self._last_step if self._last_step >= 0 else None

    def state_dict(self) -> dict:
        return {
            "last_step": self._last_step, "history": self.history, "total_unet_evals": self.total_unet_evals,
            "total_seconds": self.total_seconds, "floor": self.floor,
        }

    def load_state_dict(self, state: dict) -> None:
        self._last_step = state.get("last_step", -1)
        self.history = list(state.get("history", []))
        self.total_unet_evals = int(state.get("total_unet_evals", 0))
        self.total_seconds = float(state.get("total_seconds", 0.0))
        self.floor = state.get("floor")

    def deltas_below_floor(self) -> list[float]:
        """The δ thresholds under the autoencoder floor's mean: counts there show nothing."""
        if not self.floor:
            return []
        return [d for d in self.settings.deltas if d <= self.floor["mean"]]

    # ---- the fixed sample ---------------------------------------------------------------
    def sample_indices(self, records) -> list[int]:
        """Record indices scored at every evaluation (trained first, then held-out)."""
        s = self.settings
        chosen: list[int] = []
        for split, size, offset in (("train", s.train_sample, 0), ("heldout", s.heldout_sample, 1)):
            pool = [i for i, r in enumerate(records) if r.split == split]
            if size is not None and size > len(pool):
                raise ValueError(
                    f"solidmark.{'train' if split == 'train' else 'heldout'}_sample={size} but the data has only "
                    f"{len(pool)} {split} images; set it to at most {len(pool)} (or null for all)"
                )
            if size == 0 or not pool:
                continue
            if size is None and len(pool) > s.max_sample:
                size = int(s.max_sample)
            copies = [records[i].copies for i in pool]  # duplicated images are few: every copy count is scored
            chosen += [pool[j] for j in stratified_sample(copies, size, seed=s.sample_seed + offset)]
        if not any(records[i].split == "train" for i in chosen):
            raise ValueError("solidmark needs at least one training image in its sample (solidmark.train_sample)")
        return chosen

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.settings.enabled:
            self._sample = self.sample_indices(trainer.datamodule.records)

    # ---- schedule -----------------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n = self.settings.every_n_steps
        step = trainer.global_step
        if self.settings.enabled and n and step > 0 and step % n == 0 and step != self._last_step:
            self.evaluate(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        n = self.settings.every_n_epochs
        if self.settings.enabled and n and (trainer.current_epoch + 1) % n == 0 and trainer.global_step != self._last_step:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.settings.enabled and self.settings.at_train_end and trainer.global_step != self._last_step:
            self.evaluate(trainer, pl_module)

    # ---- one evaluation -----------------------------------------------------------------
    def evaluate(self, trainer, pl_module) -> dict:
        s = self.settings
        self._last_step = trainer.global_step
        start = time.perf_counter()
        dm = trainer.datamodule
        records = dm.records
        if self._sample is None:
            self._sample = self.sample_indices(records)
        rank, world = trainer.global_rank, max(1, trainer.world_size)
        mine = self._sample[rank::world]  # each process outpaints its share
        ids = [records[i].id for i in mine]
        thickness = int(pl_module.cfg.data.border)

        model = pl_module.diffusion_model(ema=s.ema)
        was_training = pl_module.training
        pl_module.eval()
        try:
            canvases = dm.canvases(ids) if ids else torch.zeros(0, 3, dm.canvas_size, dm.canvas_size)
            out = outpaint_border(
                model, canvases, [records[i].caption for i in mine], thickness, noise_ids=mine,
                **s.outpaint_options(latent=model.is_latent),
            )
            if self.floor is None and trainer.is_global_zero:
                train_rows = [i for i in self._sample if records[i].split == "train"]
                floor = autoencoder_floor(model, dm.canvases([records[i].id for i in train_rows]), torch.tensor([records[i].key for i in train_rows]),
                                          thickness, latents=pl_module.cached_latents(train_rows))
                self.floor = {"mean": float(floor.mean()), "p95": float(floor.quantile(0.95)), "max": float(floor.max())}
                below = self.deltas_below_floor()
                if below:
                    log.warning(
                        "solidmark: delta %s lies below the autoencoder's own round-trip error (floor: mean %.4f, p95 %.4f): "
                        "a latent model cannot reproduce a key that precisely, so counts at that delta are uninformative",
                        ", ".join(f"{d:g}" for d in below), self.floor["mean"], self.floor["p95"],
                    )
        finally:
            pl_module.train(was_training)

        device = pl_module.device
        metric = SolidMarkMetric(deltas=s.deltas, flag_q=s.flag_q).to(device)
        images = GeneratedCanvases().to(device)
        metric.update(
            out.border_key,
            torch.tensor([records[i].key for i in mine], dtype=torch.float64),
            torch.tensor([records[i].split == "train" for i in mine]),
            torch.tensor([records[i].copies for i in mine]),
            torch.tensor(mine),
        )
        images.update(out.canvases[:, 0], torch.tensor(mine))
        result = metric.compute()  # gathers every process's images
        generated = images.compute() if s.log_images else {}  # a collective: every process calls it
        evals = trainer.strategy.reduce(torch.tensor(float(out.unet_evals), device=device), reduce_op="sum")
        seconds = time.perf_counter() - start
        self.total_unet_evals += int(evals.item())
        self.total_seconds += seconds
        result.update(unet_evals=int(evals.item()), seconds=seconds, step=trainer.global_step, epoch=trainer.current_epoch)
        self.last_result = result
        self.publish(self._monitor_result(result, records))
        if trainer.is_global_zero:
            self._write(trainer, pl_module, result, generated)
        return result

    # ---- outputs ------------------------------------------------------------------------
    def _flat_metrics(self, result: dict) -> dict[str, float]:
        flat: dict[str, float] = {}
        for split, prefix in (("trained", "solidmark"), ("heldout", "solidmark/heldout")):
            for kind in ("eidetic", "chance", "p_value"):
                for d, value in result[split][kind].items():
                    flat[f"{prefix}/{kind}@{_delta_name(d)}"] = float(value)
            if result[split]["mean_loss"] is not None:
                flat[f"{prefix}/mean_loss"] = result[split]["mean_loss"]
        for name in ("auc_heldout", "auc_duplicated"):
            if result[name] is not None:
                flat[f"solidmark/{name}"] = float(result[name])
        flat["solidmark/unet_evals"] = float(result["unet_evals"])
        flat["solidmark/seconds"] = float(result["seconds"])
        return flat

    def _monitor_result(self, result: dict, records) -> MonitorResult:
        trained = result["trained"]
        budget = {d: BudgetSignal(trained["eidetic"][d], trained["chance"][d], trained["p_value"][d]) for d in self.settings.deltas}
        rows = result["per_image"]
        flagged = [records[int(i)].id for i, f, t in zip(rows["index"].tolist(), rows["flagged"].tolist(), rows["trained"].tolist()) if f and t > 0.5]
        return MonitorResult(source=self.source, step=result["step"], flagged=frozenset(flagged), budget=budget)

    def _summary(self, result: dict) -> dict:
        def by_delta(values: dict) -> dict:
            return {_delta_name(d): v for d, v in values.items()}

        entry = {
            "step": result["step"],
            "epoch": result["epoch"],
            "eidetic": by_delta(result["trained"]["eidetic"]),
            "chance": by_delta(result["trained"]["chance"]),
            "p_value": by_delta(result["trained"]["p_value"]),
            "auc_heldout": result["auc_heldout"],
            "auc_duplicated": result["auc_duplicated"],
            "flagged": result["trained"]["flagged"],
            "heldout_flagged": result["heldout"]["flagged"],
        }
        self.history.append(entry)
        return {
            **entry,
            "heldout": {k: by_delta(result["heldout"][k]) for k in ("eidetic", "chance", "p_value")},
            "n_trained": result["n_trained"],
            "n_heldout": result["n_heldout"],
            "mean_loss": result["trained"]["mean_loss"],
            "heldout_mean_loss": result["heldout"]["mean_loss"],
            "flag_q": result["flag_q"],
            "autoencoder_floor": self.floor,
            "uninformative_deltas": [_delta_name(d) for d in self.deltas_below_floor()],
            "unet_evals": self.total_unet_evals,
            "seconds": round(self.total_seconds, 3),
            "evaluations": len(self.history),
            "last_evaluation": {"unet_evals": result["unet_evals"], "seconds": round(result["seconds"], 3)},
            "history": self.history,
            "settings": OmegaConf.to_container(OmegaConf.structured(self.settings)),
        }

    def _write(self, trainer, pl_module, result: dict, generated: dict[int, torch.Tensor]) -> None:
        run_dir = Path(pl_module.run_dir)
        records = trainer.datamodule.records
        rows = result["per_image"]
        deltas = self.settings.deltas
        path = run_dir / "solidmark.csv"
        header = (["step", "epoch", "id", "split", "copies", "key", "pred_key", "loss", "p_value", "flagged"]
                  + [f"chance@{_delta_name(d)}" for d in deltas] + [f"memorized@{_delta_name(d)}" for d in deltas] + ["caption"])
        kept: list[list[str]] = []
        if path.exists():
            # a run resumed from a checkpoint older than its last evaluation repeats that
            # evaluation: the repeat replaces the rows, it does not duplicate them
            with open(path, newline="") as fh:
                kept = [row for row in list(csv.reader(fh))[1:] if row and int(row[0]) < result["step"]]
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(header)
        writer.writerows(kept)
        for j, i in enumerate(rows["index"].long().tolist()):
            r = records[i]
            pred, loss = float(rows["pred_keys"][j]), float(rows["loss"][j])
            chance = [float(chance_probability(torch.tensor([pred]), d)[0]) for d in deltas]
            writer.writerow(
                [result["step"], result["epoch"], r.id, r.split, r.copies, f"{r.key:.6f}", f"{pred:.6f}", f"{loss:.6f}",
                 f"{float(rows['p_value'][j]):.6g}", int(rows["flagged"][j])]
                + [f"{c:.6f}" for c in chance] + [int(loss < d) for d in deltas] + [r.caption]
            )
        write_text_atomic(path, buffer.getvalue())
        update_summary(run_dir, "solidmark", self._summary(result))

        step = result["step"]
        flat = self._flat_metrics(result)
        log_scalars(trainer, flat, step=step)
        figure_rows = [
            {"step": step, "split": records[i].split, "copies": records[i].copies, "loss": float(rows["loss"][j]),
             "pred_key": float(rows["pred_keys"][j])}
            for j, i in enumerate(rows["index"].long().tolist())
        ]
        log_figure(trainer, "solidmark/ell_histograms", lambda: ell_histograms(figure_rows), step=step)
        if self.settings.log_images and generated:
            self._log_images(trainer, run_dir, result, generated)

    def _log_images(self, trainer, run_dir: Path, result: dict, generated: dict[int, torch.Tensor]) -> None:
        from callbacks.samples import save_grid

        records = trainer.datamodule.records
        rows = result["per_image"]
        trained = rows["trained"] > 0.5
        order = [j for j in torch.argsort(rows["loss"]).tolist() if trained[j]][: self.settings.table_rows]
        if not order:
            return
        top = [int(rows["index"][j]) for j in order]
        truth = trainer.datamodule.canvases([records[i].id for i in top])
        pairs = torch.stack([torch.stack([truth[k], generated[i]]) for k, i in enumerate(top)]).flatten(0, 1)
        grid = save_grid(pairs, run_dir / "solidmark" / f"step-{result['step']:06d}.png", nrow=8)
        # the newest evaluation's most memorized images, with what the report labels them by
        write_npz_atomic(
            run_dir / "solidmark" / "most_memorized.npz",
            step=result["step"], id=[records[i].id for i in top], caption=[records[i].caption for i in top],
            copies=[records[i].copies for i in top], key=[records[i].key for i in top],
            pred_key=[float(rows["pred_keys"][j]) for j in order], loss=[float(rows["loss"][j]) for j in order],
            p_value=[float(rows["p_value"][j]) for j in order], border=int(trainer.lightning_module.cfg.data.border),
            truth=np.stack([to_uint8(t) for t in truth]), generated=np.stack([to_uint8(generated[i]) for i in top]),
        )
        log_image(trainer, "solidmark/most_memorized_grid", [np.asarray(grid)],
                  ["pairs: training canvas | outpainted border (most memorized first)"], step=result["step"])

        def table(wandb):
            columns = ["id", "image", "generated", "key", "predicted", "loss", "p_value", "copies", "caption"]
            data = []
            for k, (j, i) in enumerate(zip(order, top)):
                r = records[i]
                data.append([r.id, wandb.Image(to_uint8(truth[k])), wandb.Image(to_uint8(generated[i])), r.key,
                             float(rows["pred_keys"][j]), float(rows["loss"][j]), float(rows["p_value"][j]), r.copies, r.caption])
            return {"solidmark/most_memorized": wandb.Table(columns=columns, data=data)}

        log_wandb(trainer, table, step=result["step"])
