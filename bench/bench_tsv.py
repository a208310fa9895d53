"""TSV-M on one layer: each task's top ⌊d/T⌋ triplets by the full float32 SVD, by the
Rayleigh-Ritz step on a partial float32 Gram eigendecomposition (``submerge.spectral.top_svd_ritz``,
the default for matrices with min side >= 256) and by the float64 Gram eigendecomposition
(``top_svd_gram``, the default before). Per layer: CPU seconds (one thread) of the whole TSV-M
key (per-task decompositions + the two polar-factor SVDs), the per-task decomposition alone, and
the relative Frobenius distance of the merged layer to TSV-M computed with float64 full SVDs.

Inputs, T tasks each:
* ``bulk``: a shared rank-16 and an own rank-8 part plus Gaussian noise (0.1 per entry, as in
  ``bench/bench_real_shape.py``): the cut r = ⌊d/T⌋ lies in the noise bulk (~1 % gaps);
* ``power``: singular values ``i**-1`` with random singular vectors.

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python bench/bench_tsv.py
"""

from __future__ import annotations

import math
import time

import torch

from submerge.merging.tsv import tsv_m_key
from submerge.spectral import svd, top_svd_gram, top_svd_ritz


def bulk(m, n, t, gen):
    shared = torch.randn(m, 16, generator=gen) @ torch.randn(16, n, generator=gen)
    return [(0.1 * torch.randn(m, n, generator=gen)
             + (shared + torch.randn(m, 8, generator=gen) @ torch.randn(8, n, generator=gen)) / math.sqrt(24))
            * 1e-3 for _ in range(t)]


def power(m, n, t, gen):
    k = min(m, n)
    s = torch.arange(1, k + 1, dtype=torch.float64) ** -1.0
    out = []
    for _ in range(t):
        u = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64))[0]
        v = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))[0]
        out.append(((u * s) @ v.T * 1e-3).float())
    return out


def per_task_seconds(tvs, r, fn) -> tuple[float, int]:
    start = time.process_time()
    refused = sum(fn(x, r) is None for x in tvs)
    return (time.process_time() - start) / len(tvs), refused


def main() -> None:
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    print("| inputs | shape | T | TSV-M s: full SVD | Ritz | Gram f64 | per task s: full SVD | Ritz | Gram f64 "
          "| error: full f32 | Ritz | Gram f64 | Ritz refused |")
    print("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for kind, make in (("bulk", bulk), ("power", power)):
        for m, n in [(768, 768), (3072, 768), (768, 3072), (2304, 768)]:
            for t in (8, 20):
                tvs = make(m, n, t, gen)
                r = min(m, n) // t
                exact = tsv_m_key([x.double() for x in tvs], truncated=False)
                secs, errs = [], []
                for kw in ({"truncated": False}, {"method": "ritz"}, {"method": "gram"}):
                    start = time.process_time()
                    out = tsv_m_key(tvs, **kw)
                    secs.append(time.process_time() - start)
                    errs.append(float((out.double() - exact).norm() / exact.norm()))
                few = tvs[:4]
                full_s, _ = per_task_seconds(few, r, lambda x, r: (svd(x), None)[1])
                ritz_s, refused = per_task_seconds(tvs, r, top_svd_ritz)
                gram_s, _ = per_task_seconds(few, r, top_svd_gram)
                print(f"| {kind} | {m}x{n} | {t} | {secs[0]:.2f} | {secs[1]:.2f} | {secs[2]:.2f} "
                      f"| {full_s:.3f} | {ritz_s:.3f} | {gram_s:.3f} "
                      f"| {errs[0]:.1e} | {errs[1]:.1e} | {errs[2]:.1e} | {refused}/{t} |", flush=True)


if __name__ == "__main__":
    main()
