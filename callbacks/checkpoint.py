"""Step checkpoints that also cover the final step, written crash-safely."""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from eidetic.io import torch_save_atomic

__all__ = ["StepCheckpoint", "AtomicCheckpointIO", "checkpoint_mismatch"]


def _some(names: list[str], limit: int) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def checkpoint_mismatch(expected: dict[str, tuple], found: dict[str, tuple], limit: int = 3) -> str | None:
    """What keeps a checkpoint's state dict (key -> shape, ``found``) from loading into a model
    that has ``expected``: a few keys of each kind and their counts, or None when it fits."""
    differ = [f"{k} (checkpoint {list(found[k])}, config {list(expected[k])})" for k in expected if k in found and found[k] != expected[k]]
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    parts = []
    if differ:
        parts.append(f"{len(differ)} weight(s) differ in shape: {_some(differ, limit)}")
    if missing:
        parts.append(f"{len(missing)} weight(s) of this config are not in the checkpoint: {_some(missing, limit)}")
    if unexpected:
        parts.append(f"{len(unexpected)} weight(s) of the checkpoint are not in this config: {_some(unexpected, limit)}")
    return "; ".join(parts) or None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file beside the target and renamed into place.

    Lightning's own "atomic" save stages the file through fsspec in the system temporary
    directory and then moves it, which is a plain copy (a torn file after a kill) whenever that
    directory is on another file system than the run.
    """

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        torch_save_atomic(checkpoint, path)


def _csv_loggers(trainer) -> list:
    from lightning_modules.csv_logger import RunCSVLogger

    return [logger for logger in trainer.loggers if isinstance(logger, RunCSVLogger)]


class StepCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` every N steps, plus one at ``max_steps``; each checkpoint vouches for ``metrics.csv``.

    The final checkpoint is taken inside ``on_train_batch_end`` like every other one, so its
    loop state is the one Lightning knows how to resume from (a checkpoint saved after
    ``fit`` returns resumes one batch short of the epoch).

    Lightning logs a step's training metrics only after ``on_train_batch_end``, that is after
    the step's checkpoint is on disk: a kill in between lost that row for good (the resumed run
    does not train that step again). So before a checkpoint is written, the step's pending
    metrics go to ``metrics.csv`` and the file is saved; the checkpoint then carries the rows
    that may still change after it, which a resumed run puts back in place of whatever the
    killed run wrote later (:class:`lightning_modules.csv_logger.RunCSVLogger`).
    """

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        final = trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps
        if final and not self._should_skip_saving_checkpoint(trainer):
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)

    def on_train_end(self, trainer, pl_module):
        if not trainer.fast_dev_run:  # Lightning's end-of-training last.ckpt ignores fast_dev_run
            super().on_train_end(trainer, pl_module)

    # ---- metrics.csv ----------------------------------------------------------------------------
    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        loggers = _csv_loggers(trainer)
        if not loggers:
            return
        loop = trainer.fit_loop.epoch_loop
        pending = self._pending_step_metrics(trainer)
        for logger in loggers:
            if pending:
                logger.log_metrics(pending, step=loop._batches_that_stepped)
            logger.save()
        # Rows from the step Lightning logs next may still be added to after this checkpoint.
        checkpoint["metrics_csv"] = loggers[0].checkpoint_state(loop._batches_that_stepped)

    @staticmethod
    def _pending_step_metrics(trainer) -> dict:
        """The training metrics Lightning will log right after this ``on_train_batch_end`` (the
        same test as its ``update_train_step_metrics``), as the scalars it will log."""
        from lightning.fabric.utilities.apply_func import convert_tensors_to_scalars

        connector = trainer._logger_connector
        if connector._first_loop_iter is None or trainer._results is None:  # not inside a training batch
            return {}
        if trainer.fit_loop._should_accumulate() and trainer.lightning_module.automatic_optimization:
            return {}
        if not (connector.should_update_logs or trainer.fast_dev_run):
            return {}
        metrics = convert_tensors_to_scalars(connector.metrics["log"])
        if metrics:
            metrics.setdefault("epoch", trainer.current_epoch)
        return metrics

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        state = checkpoint.get("metrics_csv")
        if state is not None:
            for logger in _csv_loggers(trainer):
                logger.restore(state)
