"""Report stage: tables, figures and their provenance.

* :mod:`submerge.report.tables` — table builders on the pipeline's frames (scores,
  selection, timing) and :func:`~submerge.report.tables.write_table` (CSV + Markdown +
  LaTeX booktabs).
* :mod:`submerge.report.figures` — one function per figure, each writing PDF + PNG
  (deterministic bytes, colour-blind-safe palette).
* :mod:`submerge.report.provenance` — JSON sidecars (inputs, config, versions, git,
  command, time) and :func:`~submerge.report.provenance.audit`.

Typical use in a report script::

    from submerge.report import figures, provenance, tables
    paths = tables.write_table(tables.main_results(scores, methods), out_stem)
    provenance.write_sidecar(paths, inputs=[scores_csv], config={"methods": methods})

The submodules are imported on demand (``submerge audit`` needs neither pandas nor
matplotlib).
"""

__all__ = ["figures", "provenance", "tables"]
