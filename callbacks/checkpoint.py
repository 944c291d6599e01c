"""Step checkpoints that also cover the final step, written crash-safely."""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from eidetic.io import torch_save_atomic

__all__ = ["StepCheckpoint", "AtomicCheckpointIO"]


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
