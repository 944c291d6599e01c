"""The workflows: what each command does, as ``run(cfg) -> Path`` over a typed config.

``train`` (one training run), ``compare`` (mitigations on equal footing), ``sweep``
(hyperparameter search), ``protect`` (+ ``mimicry``: protective perturbations and their
evaluation) and ``imitate`` (single-example imitation audit). Each module exposes ``Schema``,
``load_config(files, overrides)``, ``run(cfg)`` and ``done_message(path)``; the entry scripts
are a few lines over :mod:`workflows.cli`. Every run directory goes through
:class:`workflows.rundir.RunDirectory`.
"""
