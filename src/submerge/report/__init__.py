"""Report stage: tables, figures and their provenance (no torch anywhere in this package).

* :mod:`submerge.report.registry` — the one list of tables and figures (name, function,
  inputs, caption); ``workflow/rules/report.smk`` reads it to declare every file.
* :mod:`submerge.report.tables` — table builders on the pipeline's frames (scores,
  selection, timing) and the run's :class:`~submerge.recipe.Recipe`, and
  :func:`~submerge.report.tables.write_table` (CSV + Markdown + LaTeX booktabs).
* :mod:`submerge.report.figures` — one function per figure, each writing PDF + PNG
  (deterministic bytes, colour-blind-safe palette).
* :mod:`submerge.report.build` — the ``tables`` and ``figures`` jobs: every registry entry
  with its sidecar.
* :mod:`submerge.report.provenance` — JSON sidecars (inputs, config, versions, git,
  command, time) and :func:`~submerge.report.provenance.audit`.

The summaries the figures draw from the torch caches (spectra, HO-GSVD) are written by
:mod:`submerge.stages.report`. Typical use::

    from submerge.recipe import parse_config
    from submerge.report import provenance, tables
    recipe = parse_config(config)
    paths = tables.write_table(tables.main_results(scores, recipe), out_stem)
    provenance.write_sidecar(paths, inputs=[scores_csv], config=config)

The submodules are imported on demand (``submerge audit`` and the registry need neither
pandas nor matplotlib).
"""

__all__ = ["build", "figures", "provenance", "registry", "tables"]
