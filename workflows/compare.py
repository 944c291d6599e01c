"""The comparison workflow: memorization mitigations on the same data, seed and budget.

A comparison config (:class:`eidetic.schema.compare.CompareConfig`) names the training config
files and overrides every setting shares (``base``, ``overrides``) and a list of
``settings``, each a name plus its own training overrides (e.g.
``mitigation.wen.enabled=true``). Every setting trains in-process through
:func:`workflows.train.run` with the same seed into ``OUT/<setting>/`` (W&B group = the
comparison's name), then is scored the same way:

* memorization: the ``solidmark`` summary section (eidetic count vs chance and its p-value at
  ``delta``), when the SolidMark monitor ran; the ``extraction`` section's AUCs;
* realism: the ``realism`` section's mean IRS of generated samples, when it ran;
* quality: a Fréchet distance in a local feature space (:mod:`eidetic.quality`) between
  seeded samples of the exported model and the training canvases of the unmitigated data;
  against real images never trained on, a Fréchet distance, precision/recall and a
  real-vs-generated classifier's accuracy in the same space (:func:`quality`);
* final training loss and wall time.

With ``seeds`` every setting runs once per seed (``OUT/<setting>-seed<k>/``); ``workers``
runs them in parallel single-thread processes. A setting with ``model_of`` is an
inference-time setting: it trains nothing and evaluates that setting's final checkpoint (same
seed) with its own ``inference_mitigation`` / ``solidmark`` / ``extraction`` overrides
(:func:`workflows.train.evaluate`).

Same config and seed, same table (wall time aside). ``resume=true`` keeps the settings that
already finished (their row is in their summary's ``compare`` section) and reruns the rest.
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig, OmegaConf

from eidetic.config import load
from eidetic.errors import ConfigError
from eidetic.schema.compare import CompareConfig

from .compare_report import write_outputs
from .rundir import RunDirectory

__all__ = ["Schema", "load_config", "run", "jobs_of", "quality", "finished_row", "done_message", "ROOT"]

Schema = CompareConfig
ROOT = Path(__file__).resolve().parent.parent


def load_config(files: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> DictConfig:
    """Overrides of comparison keys apply to the comparison; any other ``key=value`` is a
    training override for every setting (``train.max_steps=200``)."""
    from eidetic.config import check_layer, parse_overrides
    from eidetic.schema.train import TrainConfig

    keys = set(Schema.__dataclass_fields__)
    own = [o for o in overrides if o.split("=", 1)[0].split(".", 1)[0].split("[", 1)[0] in keys]
    training = [o for o in overrides if o not in own]
    if training and check_layer(TrainConfig, OmegaConf.to_container(parse_overrides(training))):
        # neither a comparison key nor a training key: name the closest of both
        layer = OmegaConf.to_container(parse_overrides(training))
        errors = [e for e in check_layer(Schema, layer) if "did you mean" in e] or check_layer(TrainConfig, layer)
        raise ConfigError("invalid command-line override (comparison keys, or training keys for every setting):\n  " + "\n  ".join(errors))
    cfg = load(Schema, files, own)
    if training:
        cfg.overrides = [*cfg.overrides, *training]
    return cfg


# ---- quality ----------------------------------------------------------------------------------
def _unseen_reference(dm, count: int):
    """Interiors (N, 3, R, R) in [-1, 1] of real images no setting trained on, and what they are.

    Built-in data: fresh crops of the same photographs overlapping none of the data set's
    crops (its held-out split is a handful of images, too few for k-NN measures); folder
    data: its held-out split."""
    import torch

    from lightning_modules.data import builtin_unseen_crops

    c = dm.cfg
    if c.source == "builtin":
        crops = builtin_unseen_crops(count, c.num_images, c.resolution, c.shared_caption_fraction, c.key_seed)
        return torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 127.5 - 1.0, "unseen_crops"
    return dm.images([r.id for r in dm.records if r.split == "heldout"]), "heldout_split"


def query_model(train_cfg: DictConfig, model_dir: Path):
    """The model in ``model_dir`` as a setting queries it: through its own ``inference_mitigation``."""
    from eidetic.inference_mitigations import InferenceMitigation, mitigate
    from eidetic.pipelines import load_components

    parts = load_components(model_dir)
    return mitigate(parts.diffusion_model(), InferenceMitigation.from_settings(train_cfg.inference_mitigation), tokenizer=parts.tokenizer)


def quality(train_cfg: DictConfig, q, model) -> dict:
    """Measures of ``q.num_samples`` seeded samples of ``model`` (:func:`query_model`) that no
    setting optimises: the Fréchet distance vs the unmitigated training canvases, and
    (``q.reference`` > 0) Fréchet distance, precision/recall and a real-vs-generated
    classifier's accuracy of the samples' interiors vs real images never trained on
    (:func:`_unseen_reference`)."""
    import torch

    from eidetic.diffusion import generate
    from eidetic.quality import classifier_accuracy, frechet_distance, local_features, precision_recall
    from eidetic.schema.compare import CLASSIFIER_FOLDS, unseen_minimum
    from lightning_modules.data import SolidMarkDataModule

    dm = SolidMarkDataModule(train_cfg.data, seed=train_cfg.seed)  # the reference: no mitigation
    train = [r for r in dm.records if r.split == "train"]
    real = dm.canvases([r.id for r in train])
    captions = [train[i % len(train)].caption for i in range(int(q.num_samples))]
    g = torch.Generator().manual_seed(int(q.seed))
    fakes, passes_before = [], model.unet_passes
    with torch.no_grad():
        for start in range(0, len(captions), int(q.batch_size)):
            chunk = captions[start : start + int(q.batch_size)]
            fakes.append(generate(model, chunk, (dm.canvas_size, dm.canvas_size), steps=int(q.steps), guidance=float(q.guidance), generator=g))
    fake = torch.cat(fakes)
    # the generation's cost: guidance doubles it, delayed guidance and Wen's adjustment change it
    per_sample = (model.unet_passes - passes_before) / max(1, len(captions))
    out = {"frechet_distance": frechet_distance(real, fake, int(q.feature_seed)), "quality_samples": len(captions), "quality_real": int(real.shape[0]),
           "unet_passes_per_sample": round(per_sample, 2)}
    if int(q.reference) > 0:
        reference, kind = _unseen_reference(dm, int(q.reference))
        need = unseen_minimum(q.knn_k)
        if reference.shape[0] < need:  # a folder's held-out split is only known here: skip, keep the row
            print(f"quality: {reference.shape[0]} unseen real image(s) ({kind}), fewer than the {need} the unseen-image "
                  "measures need; reporting the training-set Fréchet distance only", file=sys.stderr)
            return out
        b = int(dm.cfg.border)
        interiors = fake[:, :, b : fake.shape[2] - b, b : fake.shape[3] - b]
        ref_f, fake_f = local_features(reference, int(q.feature_seed)), local_features(interiors, int(q.feature_seed))
        pr = precision_recall(ref_f, fake_f, k=int(q.knn_k))
        clf = classifier_accuracy(ref_f, fake_f, folds=CLASSIFIER_FOLDS, seed=int(q.seed))
        rounded = lambda ci: [round(v, 4) for v in ci]  # noqa: E731
        out.update({
            "frechet_unseen": frechet_distance(reference, interiors, int(q.feature_seed)),
            "precision": pr["precision"], "precision_ci": rounded(pr["precision_ci"]),
            "recall": pr["recall"], "recall_ci": rounded(pr["recall_ci"]),
            "classifier_accuracy": clf["accuracy"], "classifier_accuracy_ci": rounded(clf["accuracy_ci"]),
            "quality_unseen": int(reference.shape[0]), "quality_unseen_kind": kind,
        })
    return out


def ladder_scores(train_cfg: DictConfig, model, s, delta: float) -> dict:
    """Row columns of memorization per rung of the data's duplication ladder (empty when
    nothing is repeated or ``s.enabled`` is off), all scored on one evaluation set (every
    repeated image, ``s.singles`` single and ``s.heldout`` held-out ones), through ``model``
    as the setting queries it: ``<rung>_eidetic/_chance/_p`` (SolidMark at ``delta`` with the
    setting's ``solidmark`` settings) and ``<rung>_auc`` (−ℓ vs single images),
    ``<detector>_<rung>_auc`` (caption-level detectors with its ``extraction`` settings), and
    ``<rung>_copy_rate`` (full generations copying the caption's own image; held-out: any
    training image; a model trained with flip augmentation also copies by reproducing an image's
    mirror, which counts). Rungs are ``x<copies>`` and ``heldout``; the labels come from the
    unmitigated data (a mitigation that drops copies is judged on the images it was given)."""
    import numpy as np
    import torch

    from callbacks.extraction import detector_options
    from eidetic import extraction, ladder, solidmark
    from eidetic.borders import strip_border
    from eidetic.config import build_section
    from eidetic.schema.train import SolidMarkSettings
    from eidetic.stats import rank_auc
    from lightning_modules.data import SolidMarkDataModule

    dm = SolidMarkDataModule(train_cfg.data, seed=train_cfg.seed)
    records = dm.records
    copies = np.array([r.copies for r in records])
    trained = np.array([r.split == "train" for r in records])
    if not s.enabled or not (copies[trained] > 1).any():
        return {}
    idx = ladder.evaluation_set(copies.tolist(), trained.tolist(), int(s.singles), int(s.heldout), int(s.seed))
    ev_copies, ev_trained = copies[idx], trained[idx]
    names = np.array(ladder.rung_names(ev_copies, ev_trained))
    captions = [records[i].caption for i in idx]
    keys = torch.tensor([records[i].key for i in idx], dtype=torch.float64)
    border, shape = int(train_cfg.data.border), (dm.canvas_size, dm.canvas_size)
    row: dict = {}

    out = solidmark.outpaint_border(model, dm.canvases([records[i].id for i in idx]), captions, border, noise_ids=idx,
                                    **build_section(SolidMarkSettings, train_cfg.solidmark).outpaint_options(latent=model.is_latent))
    for rung, e in ladder.solidmark_by_rung(out.border_key, keys, ev_copies, ev_trained, delta, int(s.n_boot), int(s.seed)).items():
        row.update({f"{rung}_eidetic": e["eidetic"], f"{rung}_chance": e["chance"], f"{rung}_p": e["p_value"]})
        if "auc" in e:
            row.update({f"{rung}_auc": e["auc"], f"{rung}_auc_ci": e["auc_ci"]})

    single = names == "x1"
    for name in s.detectors:
        scores = extraction.DETECTORS[name](model, captions, shape, seed=int(train_cfg.extraction.seed), batch_size=int(s.batch_size),
                                            **detector_options(name, train_cfg.extraction)).scores.numpy()
        for rung in sorted({n for n in names.tolist() if n not in ("x1", "heldout")}, key=lambda n: int(n[1:])):
            both = (names == rung) | single
            row[f"{name}_{rung}_auc"] = rank_auc(scores[both], (names == rung)[both])

    train_idx = [i for i, r in enumerate(records) if r.split == "train"]
    position = {i: k for k, i in enumerate(train_idx)}
    truth = extraction.generation_ground_truth(
        model, captions, [position.get(i, -1) for i in idx], dm.images([records[i].id for i in train_idx]), shape,
        crop=lambda x: strip_border(x, border), generations=int(s.generations), steps=int(s.steps), guidance=float(s.guidance),
        threshold=float(s.threshold), seed=int(s.seed), batch_size=int(s.batch_size), noise_ids=idx,
        mirrored=float(train_cfg.mitigation.augment.flip) > 0)
    for rung, e in ladder.copy_rates_by_rung(truth.own_rate, truth.copy_rate, ev_copies, ev_trained, int(s.generations)).items():
        row.update({f"{rung}_copy_rate": e["copy_rate"], f"{rung}_copy_rate_ci": e["ci"]})
    return row


# what quality() adds to a row (the rest of its output is in the summary's compare section too)
QUALITY_COLUMNS = ("frechet_distance", "frechet_unseen", "precision", "precision_ci", "recall", "recall_ci",
                   "classifier_accuracy", "classifier_accuracy_ci", "quality_samples", "quality_unseen", "unet_passes_per_sample")


# ---- one row ----------------------------------------------------------------------------------
def _row(name: str, summary: dict, delta: str, wall: float, q: dict) -> dict:
    row: dict = {"setting": name}
    sm = summary.get("solidmark")
    if sm:
        row["eidetic"] = sm.get("eidetic", {}).get(delta)
        row["chance"] = sm.get("chance", {}).get(delta)
        row["p_value"] = sm.get("p_value", {}).get(delta)
        row["solidmark_auc_heldout"] = sm.get("auc_heldout")
    ex = summary.get("extraction")
    if ex:
        for detector, entry in ex.items():
            if isinstance(entry, dict) and "auc_trained_vs_heldout" in entry:
                row[f"{detector}_auc_dup"] = entry.get("auc")
                row[f"{detector}_auc_heldout"] = entry.get("auc_trained_vs_heldout")
        row["verified_extractions"] = ex.get("verified_extractions")
    if summary.get("realism"):
        re = summary["realism"]
        for mode in ("paper", "two_sided"):
            row[f"irs_{mode}_generated_mean"] = re.get(f"irs_{mode}_generated_mean")
            row[f"irs_{mode}_real_mean"] = re.get(f"irs_{mode}_real_mean")
            row[f"fake_rate_{mode}"] = re.get(f"fake_rate_{mode}")
        if re.get("loss"):
            row["realism_loss_seconds"] = re["loss"].get("seconds_total")
    for key in QUALITY_COLUMNS:
        row[key] = q.get(key)
    tr = summary.get("train", {})
    row["final_loss"] = tr.get("final_loss")
    row["global_step"] = tr.get("global_step")
    mit = summary.get("mitigation", {})
    row["captions_changed"] = mit.get("captions_changed")
    row["wen_skipped"] = mit.get("wen_skipped")
    row["near_duplicates_removed"] = mit.get("near_duplicates_removed")
    ctl = summary.get("controls", {})
    row["stopped_at"] = ctl.get("stop_step")
    row["excluded"] = len(ctl.get("excluded", [])) if ctl else None
    row["wall_time_s"] = round(wall, 2)
    return row


def finished_row(run_dir: Path) -> dict | None:
    """The table row of a setting that finished (training, scoring and quality), else None."""
    return RunDirectory(run_dir).summary.get("compare") if (run_dir / "summary.json").exists() else None


def _shared_autoencoder(train_cfg: DictConfig, directory: Path) -> str:
    import lightning.pytorch as pl

    from lightning_modules.data import SolidMarkDataModule

    from .train import train_autoencoder

    pl.seed_everything(train_cfg.seed, workers=True)
    dm = SolidMarkDataModule(train_cfg.data, seed=train_cfg.seed)  # the unmitigated data
    directory.mkdir(parents=True, exist_ok=True)
    train_autoencoder(train_cfg, dm, directory)
    return str(directory / "autoencoder")


# ---- the comparison ---------------------------------------------------------------------------
@dataclass
class _Job:
    """One run of the comparison: a setting at one seed, trained, or (``base``) evaluated on the
    model another job trained."""

    setting: object
    seed: int
    name: str  # its directory under OUT and its row's name
    base: str | None = None  # the training job whose model an inference-time setting evaluates
    cfg: DictConfig | None = None


def jobs_of(cfg: DictConfig) -> list[_Job]:
    """Every (setting, seed) run, in table order; with several seeds directories are NAME-seedK."""
    seeds = [int(s) for s in cfg.seeds] or [int(cfg.seed)]
    many = len(seeds) > 1

    def name(setting_name: str, seed: int) -> str:
        return f"{setting_name}-seed{seed}" if many else setting_name

    return [_Job(setting=s, seed=seed, name=name(s.name, seed), base=name(s.model_of, seed) if s.model_of else None)
            for s in cfg.settings for seed in seeds]


def _single_thread() -> None:
    """Worker initializer: parallel runs share the cores, one thread each."""
    import os

    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


def _execute(job: _Job, out: Path, delta: str, quality_cfg, ladder_cfg) -> dict:
    """Train (or evaluate) one job, score it, and record its row in its summary."""
    from . import train

    run_dir = out / job.name
    started = time.perf_counter()
    if job.base is None:
        train.run(job.cfg)
        summary_extra = {}
        model_dir = None
    else:
        base = out / job.base
        train.evaluate(job.cfg, base / "checkpoints" / "last.ckpt")
        base_summary = RunDirectory(base).summary
        summary_extra = {k: base_summary[k] for k in ("train", "mitigation") if k in base_summary}  # the model's own training
        model_dir = base / "model"
    wall = time.perf_counter() - started
    model = query_model(job.cfg, model_dir or run_dir / "model")
    q = quality(job.cfg, quality_cfg, model) if quality_cfg.enabled else {}
    row = _row(job.name, {**summary_extra, **RunDirectory(run_dir).summary}, delta, wall, q)
    row.update(ladder_scores(job.cfg, model, ladder_cfg, float(delta)))
    row = {"setting": row.pop("setting"), "seed": job.seed, "model_of": job.base, **row}
    RunDirectory(run_dir).update_summary("compare", row)  # marks the job finished (resume=true keeps it)
    return row


def run(cfg: DictConfig) -> Path:
    """Train and score every setting at every seed (inference-time settings: evaluate the model
    their ``model_of`` setting trained); returns the comparison directory."""
    from . import train

    out = Path(cfg.out or f"runs/compare-{cfg.name}").resolve()
    base = [f if Path(f).is_absolute() else ROOT / f for f in cfg.base]
    by_name = {s.name: s for s in cfg.settings}
    jobs = jobs_of(cfg)

    def overrides_of(job: _Job):
        own = [*job.setting.overrides]
        if job.setting.model_of:  # the trained setting's own overrides first, then the query-time ones
            own = [*by_name[job.setting.model_of].overrides, *own]
        return [
            *cfg.overrides, *own, f"seed={job.seed}", f"run.dir={out / job.name}", f"run.name={job.name}",
            f"logging.wandb.group={cfg.name}",
        ]

    for job in jobs:  # every run validated before any trains
        job.cfg = train.load_config(base, overrides_of(job))
    delta = f"{float(cfg.delta):g}"
    for job in jobs:
        c = job.cfg
        if c.solidmark.enabled and delta not in {f"{float(d):g}" for d in c.solidmark.deltas}:
            raise ConfigError(f"delta={cfg.delta} is not one of setting {job.setting.name!r}'s solidmark.deltas {list(c.solidmark.deltas)}: "
                              "pick one of them or add it to solidmark.deltas")
    done = {j.name: finished_row(out / j.name) for j in jobs} if cfg.resume else {}
    done = {k: v for k, v in done.items() if v is not None}
    selected = set(cfg.only) | {by_name[n].model_of for n in cfg.only if by_name[n].model_of}
    to_run = [j for j in jobs if not cfg.only or j.setting.name in selected]
    existing = [n for n in [j.name for j in to_run] + ["shared"] if (out / n).exists() and n not in done]
    if cfg.resume and "shared" in existing and (out / "shared" / "autoencoder").exists():
        existing.remove("shared")  # a finished shared autoencoder is reused as it is
    if existing and not (cfg.overwrite or cfg.resume):
        raise ConfigError(f"{out} already holds runs {existing}: a comparison starts from fresh runs "
                          "(set resume=true to keep finished settings, or overwrite=true to replace them all)")
    for name in existing:
        shutil.rmtree(out / name)
    out.mkdir(parents=True, exist_ok=True)
    first = jobs[0].cfg
    if cfg.share_autoencoder and first.model.space == "latent" and not (first.model.pretrained or first.model.vae.pretrained):
        # One autoencoder for every setting, trained before any of them: fairer and cheaper.
        shared = out / "shared"
        shared_vae = str(shared / "autoencoder") if (shared / "autoencoder").exists() else _shared_autoencoder(first, shared)
        for job in jobs:
            if not (job.cfg.model.pretrained or job.cfg.model.vae.pretrained):
                job.cfg.model.vae.pretrained = shared_vae
    rows = dict(done)

    def table() -> list[dict]:
        return [rows[j.name] for j in jobs if j.name in rows]

    # training runs first, then the inference-time settings on the models they trained
    for phase in ([j for j in to_run if j.base is None], [j for j in to_run if j.base is not None]):
        todo = [j for j in phase if j.name not in done]
        if int(cfg.workers) <= 1 or len(todo) <= 1:
            for job in todo:
                rows[job.name] = _execute(job, out, delta, cfg.quality, cfg.ladder)
                write_outputs(out, table(), cfg)  # partial results survive a crash of a later setting
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor, as_completed

            with ProcessPoolExecutor(max_workers=int(cfg.workers), mp_context=multiprocessing.get_context("spawn"),
                                     initializer=_single_thread) as pool:
                futures = {pool.submit(_execute, job, out, delta, cfg.quality, cfg.ladder): job for job in todo}
                for future in as_completed(futures):
                    rows[futures[future].name] = future.result()
                    write_outputs(out, table(), cfg)
    write_outputs(out, table(), cfg)
    return out


def done_message(path: Path) -> str:
    return f"comparison: {path / 'report.md'}"


def console_summary(path: Path):
    from .compare_report import console_summary as summary

    return summary(path)


def settings_text(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)
