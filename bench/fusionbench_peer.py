"""FusionBench 0.2.33's merge implementations, loaded file by file (its package import pulls in
far more than these functions need), wrapped to take the same task vectors as submerge.

Install the peer's files (no dependencies) where the benchmark finds them:

    /work/main/.venv/bin/pip install --no-deps --target bench/peers/fusion_bench_0.2.33 fusion-bench==0.2.33

``bench/peers/`` is ignored by git (``bench/.gitignore``); carry it to a machine without network.
The wrappers follow what FusionBench's algorithm classes do around these functions
(``method/ties_merging/ties_merging.py``, ``method/tall_mask/task_arithmetic.py``,
``method/task_singular_vector/TSVM.py``, ``method/isotropic_merging/iso.py``,
``method/task_arithmetic/task_arithmetic.py``), minus model loading and the final θ_0 + αΔ.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import sys
import types
from pathlib import Path
from typing import Mapping, Sequence

import torch

VERSION = "0.2.33"
DEFAULT_DIR = Path(__file__).resolve().parent / "peers" / f"fusion_bench_{VERSION}"

# the methods the peer implements, by submerge name
METHODS = ("ta", "ties", "consensus", "tsv_m", "iso_c", "iso_cts")


class PeerMissing(RuntimeError):
    pass


def _package(name: str, path: Path | None = None) -> types.ModuleType:
    mod = sys.modules.get(name)
    if mod is None:
        mod = types.ModuleType(name)
        mod.__path__ = [str(path)] if path else []  # a package, so relative imports resolve
        sys.modules[name] = mod
    return mod


def _load(name: str, file: Path) -> types.ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, file)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


class Peer:
    """The peer's modules, loaded by file from ``root`` (the ``--target`` of the pip install)."""

    def __init__(self, root: str | Path = DEFAULT_DIR):
        pkg = Path(root) / "fusion_bench"
        if not (pkg / "method" / "ties_merging" / "ties_merging_utils.py").is_file():
            raise PeerMissing(f"FusionBench {VERSION} not found under {root}; install it with "
                              f"pip install --no-deps --target {root} fusion-bench=={VERSION}")
        _package("fusion_bench", pkg)
        utils = _package("fusion_bench.utils", pkg / "utils")
        _load("fusion_bench.utils.type", pkg / "utils" / "type.py")
        params = _load("fusion_bench.utils.parameters", pkg / "utils" / "parameters.py")
        utils.state_dict_to_vector = params.state_dict_to_vector
        utils.vector_to_state_dict = params.vector_to_state_dict
        utils.timeit_context = lambda *a, **k: contextlib.nullcontext()  # a timer that prints
        self.arith = _load("fusion_bench.utils.state_dict_arithmetic", pkg / "utils" / "state_dict_arithmetic.py")
        self.params = params
        self.ties_utils = _load("fusion_bench.method.ties_merging.ties_merging_utils",
                                pkg / "method" / "ties_merging" / "ties_merging_utils.py")
        self.tall_utils = _load("fusion_bench.method.tall_mask.utils", pkg / "method" / "tall_mask" / "utils.py")
        self.tsvm_utils = _load("fusion_bench.method.task_singular_vector.utils.TSVM_utils",
                                pkg / "method" / "task_singular_vector" / "utils" / "TSVM_utils.py")
        self.iso_utils = _load("fusion_bench.method.isotropic_merging.iso_utils",
                               pkg / "method" / "isotropic_merging" / "iso_utils.py")

    def _unflatten(self, vector: torch.Tensor, like: Mapping[str, torch.Tensor]) -> dict:
        """``vector_to_state_dict`` writes into its reference's tensors (FusionBench passes θ_0,
        which it then replaces): give it fresh ones, not a task vector."""
        reference = {k: torch.empty_like(v) for k, v in like.items()}
        return dict(self.params.vector_to_state_dict(vector, reference))

    # ------------------------------------------------------------------ merges (Δ, without α)

    def ta(self, tvs: Sequence[Mapping[str, torch.Tensor]], base=None, device=None) -> dict:
        """TaskArithmeticAlgorithm.run: a running ``state_dict_add`` over the task vectors."""
        total = None
        for tv in tvs:
            total = dict(tv) if total is None else self.arith.state_dict_add(total, tv)
        return dict(total)

    def ties(self, tvs, base=None, device=None, k: float = 20, merge_func: str = "mean") -> dict:
        """TiesMergingAlgorithm.run: flattened, stacked task vectors, ``ties_merging``."""
        flat = torch.vstack([self.params.state_dict_to_vector(tv) for tv in tvs])
        merged = self.ties_utils.ties_merging(flat, reset_thresh=k, merge_func=merge_func)
        del flat
        return self._unflatten(merged, tvs[0])

    def consensus(self, tvs, base, device=None, lam: float = 0.4, k: int = 2) -> dict:
        """TaskArithmeticWithTALL / consensus: TALL masks in weight space on flattened vectors
        (``generate_task_masks``), kept where >= k masks agree, times the TA sum."""
        flat_tv = torch.vstack([self.params.state_dict_to_vector(tv) for tv in tvs])
        flat_ptm = self.params.state_dict_to_vector(base)
        flat_ft = flat_tv + flat_ptm
        tv_sum = flat_tv.sum(0)
        masks = self.tall_utils.generate_task_masks(flat_tv, flat_ft, flat_ptm, tv=tv_sum,
                                                    tall_mask_lambda=lam)
        del flat_ft
        consensus = masks.float().sum(0) >= k
        return self._unflatten(tv_sum * consensus, tvs[0])

    def tsv_m(self, tvs, base=None, device="cpu") -> dict:
        return dict(self.tsvm_utils.compute_and_sum_svd_mem_reduction(list(tvs), exclude_keys=[],
                                                                       accelerator=device))

    def iso_c(self, tvs, base=None, device="cpu") -> dict:
        return dict(self.iso_utils.iso_c(list(tvs), accelerator=device))

    def iso_cts(self, tvs, base=None, device="cpu", common_space_fraction: float = 0.8) -> dict:
        return dict(self.iso_utils.iso_cts(list(tvs), common_space_fraction, accelerator=device))

    def run(self, method: str, tvs, base, device) -> dict:
        """``method`` (one of :data:`METHODS`), the peer's prints swallowed."""
        with contextlib.redirect_stdout(io.StringIO()):
            return getattr(self, method)(tvs, base=base, device=device)
