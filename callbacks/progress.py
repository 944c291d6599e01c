"""The training progress bar: optimizer steps of ``max_steps``, not epochs.

Lightning's bar counts batches of the current epoch and titles it ``Epoch N/max_epochs-1``,
which reads ``Epoch 266/-2`` for a run bounded by steps (``max_epochs=-1``). A run here is
sized in steps, so the bar shows steps.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar

__all__ = ["StepProgressBar"]


class StepProgressBar(RichProgressBar):
    def __init__(self, label: str = "training", **kwargs):
        super().__init__(**kwargs)
        self.label = label

    @property
    def total_train_batches(self):
        steps = self.trainer.max_steps
        return steps if steps and steps > 0 else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        return f"{self.label} (epoch {current_epoch})"

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self.is_disabled:
            return
        if self.progress is not None and self.train_progress_bar_id is not None:
            # one bar for the whole run: a new epoch renames it instead of restarting it
            self.progress.update(self.train_progress_bar_id, description=self._get_train_description(trainer.current_epoch))
            self.refresh()
            return
        super().on_train_epoch_start(trainer, pl_module)
        self._update(self.train_progress_bar_id, trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()

    def get_metrics(self, trainer, pl_module):
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the W&B run id: not progress
        return metrics
