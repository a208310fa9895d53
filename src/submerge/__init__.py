"""submerge: subspace-boosted model merging (Skorobogat et al., arXiv 2506.16506).

Pure merging math lives in :mod:`submerge.merging`, :mod:`submerge.boosting`,
:mod:`submerge.hogsvd` and :mod:`submerge.spectral`; files are touched only by
:mod:`submerge.io`.
"""

__version__ = "0.1.0"
