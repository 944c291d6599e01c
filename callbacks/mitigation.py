"""Training-time mitigations wired into training.

:class:`MitigationCallback` installs the ``mitigation:`` section's transforms on the module
(``batch_transforms``: caption perturbation, flips; ``embedding_transforms``: Gaussian
text-embedding noise; ``sample_filters``: Wen et al.'s norm filter) and writes a
``mitigation`` summary section with what they did (captions changed, samples skipped,
near-duplicates removed). The algorithms live in :mod:`eidetic.mitigations`; every random
choice is a pure function of (seed, step, micro-batch), so runs resume exactly.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from eidetic import mitigations
from eidetic.io import update_summary

from .loggers import log_scalars

__all__ = ["MitigationCallback", "is_active"]


def is_active(section) -> bool:
    """Whether the ``mitigation`` section asks for anything at all."""
    return (bool(section.caption.methods) or section.text_noise_sigma > 0 or section.near_dedup.enabled
            or section.augment.flip > 0 or section.wen.enabled)


def _micro(module, batch_idx: int) -> int:
    return batch_idx % max(1, module.cfg.train.grad_accum)


class MitigationCallback(pl.Callback):
    def __init__(self, cfg, captions: list[str], near_dedup_removed: list[str] | None = None):
        self.cfg = cfg  # the mitigation section
        self.vocabulary = mitigations.caption_vocabulary(captions)
        self.near_dedup_removed = list(near_dedup_removed or [])
        self.captions_seen = 0
        self.captions_changed = 0
        self.flipped = 0
        self.wen_seen = 0
        self.wen_skipped = 0
        self.wen_norms: list[float] = []
        self._installed = False
        self._tokenizer = None
        self._token_pool = None

    def setup(self, trainer, pl_module, stage=None):
        if self._installed:
            return
        self._installed = True
        m = self.cfg
        if m.caption.methods:
            mitigations.perturb_captions([], list(m.caption.methods), float(m.caption.prob), mitigations.step_rng(0, 0))  # validate early
            if "random_word" in m.caption.methods:  # random token addition draws from the model's own tokenizer
                from eidetic.inference_mitigations import token_id_pool

                self._tokenizer = pl_module.text.tokenizer
                self._token_pool = token_id_pool(self._tokenizer)
            pl_module.batch_transforms.append(self._captions)
        if m.augment.flip > 0:
            pl_module.batch_transforms.append(self._flip)
        if m.text_noise_sigma > 0:
            pl_module.embedding_transforms.append(self._embedding_noise)
        if m.wen.enabled:
            pl_module.sample_filters.append(self._wen_filter)

    # ---- the hooks --------------------------------------------------------------------------
    def _captions(self, module, batch, batch_idx):
        rng = mitigations.step_rng(module.cfg.seed, module.global_step, _micro(module, batch_idx), salt=1)
        new, changed = mitigations.perturb_captions(batch["caption"], list(self.cfg.caption.methods), float(self.cfg.caption.prob), rng, self.vocabulary,
                                                    tokenizer=self._tokenizer, token_pool=self._token_pool)
        self.captions_seen += len(new)
        self.captions_changed += sum(changed)
        return {**batch, "caption": new}

    def _flip(self, module, batch, batch_idx):
        g = mitigations.step_generator(module.cfg.seed, module.global_step, _micro(module, batch_idx), salt=3)
        pixels, flipped = mitigations.random_flip(batch["pixel_values"], float(self.cfg.augment.flip), g)
        self.flipped += int(flipped.sum())
        # the mask tells cached-latent training which stored view (mirrored or not) to read
        return {**batch, "pixel_values": pixels, "flipped": flipped}

    def _embedding_noise(self, module, hidden, batch_idx):
        g = mitigations.step_generator(module.cfg.seed, module.global_step, _micro(module, batch_idx), salt=2)
        return mitigations.embedding_noise(hidden, float(self.cfg.text_noise_sigma), g)

    def _wen_filter(self, module, batch, x_t, t, hidden):
        b = x_t.shape[0]
        if module.global_step < self.cfg.wen.warmup_steps:
            return torch.ones(b, dtype=torch.bool, device=x_t.device)
        with torch.no_grad():
            uncond = module.text([""]).detach()

            def predict(x, tt, h):
                return module.unet(x, tt, encoder_hidden_states=h).sample

            keep, norms = mitigations.wen_keep_mask(predict, x_t, t, hidden.detach(), uncond, float(self.cfg.wen.threshold))
        self.wen_seen += b
        self.wen_skipped += int((~keep).sum())
        self.wen_norms += norms.tolist()
        return keep

    # ---- resume: counts cover the whole run, not just its last leg ---------------------------
    _COUNTERS = ("captions_seen", "captions_changed", "flipped", "wen_seen", "wen_skipped", "wen_norms")

    def state_dict(self) -> dict:
        return {name: getattr(self, name) for name in self._COUNTERS}

    def load_state_dict(self, state: dict) -> None:
        for name in self._COUNTERS:
            if name in state:
                setattr(self, name, state[name])

    # ---- reporting --------------------------------------------------------------------------
    def section(self) -> dict:
        norms = torch.tensor(self.wen_norms) if self.wen_norms else None
        return {
            "caption_methods": list(self.cfg.caption.methods),
            "captions_seen": self.captions_seen,
            "captions_changed": self.captions_changed,
            "text_noise_sigma": float(self.cfg.text_noise_sigma),
            "flipped": self.flipped,
            "near_duplicates_removed": len(self.near_dedup_removed),
            "wen_seen": self.wen_seen,
            "wen_skipped": self.wen_skipped,
            "wen_norm_median": float(norms.median()) if norms is not None else None,
        }

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero and pl_module.run_dir is not None:
            update_summary(pl_module.run_dir, "mitigation", self.section())
        log_scalars(trainer, {"mitigation/wen_skipped": self.wen_skipped, "mitigation/captions_changed": self.captions_changed})
