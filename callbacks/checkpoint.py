"""Step checkpoints that also cover the final step."""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint

__all__ = ["StepCheckpoint"]


class StepCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` every N steps, plus one at ``max_steps``.

    The final checkpoint is taken inside ``on_train_batch_end`` like every other one, so its
    loop state is the one Lightning knows how to resume from (a checkpoint saved after
    ``fit`` returns resumes one batch short of the epoch).
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
