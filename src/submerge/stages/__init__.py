"""The workflow's stages as plain functions (paths and recipe objects in, files out).

One module per rule file of ``workflow/rules/``: :mod:`.checkpoints`, :mod:`.taskvectors`,
:mod:`.spectra`, :mod:`.merge`, :mod:`.evaluate`, :mod:`.report`; the helpers they share are in
:mod:`.common`. Each script in ``scripts/`` unpacks ``snakemake.input/output/params`` and calls
one function here, so every stage also runs (and is tested) without Snakemake. The math lives in
:mod:`submerge.merging`, :mod:`submerge.boosting` and :mod:`submerge.hogsvd`; files are read and
written only through :mod:`submerge.io`; the config is read only through :mod:`submerge.recipe`.
"""
