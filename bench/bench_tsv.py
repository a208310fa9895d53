"""TSV-M on one layer: each task's top ⌊d/T⌋ triplets from the float64 Gram matrix
(``submerge.spectral.top_svd_gram``, the default for matrices with min side >= 256) against the
full float32 SVD, time (CPU seconds, one thread) and distance of the merged layer to the float64
full-SVD result. Inputs: T tasks, each a shared and an own rank-16 part plus noise.

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python bench/bench_tsv.py
"""

from __future__ import annotations

import time

import torch

from submerge.merging.tsv import tsv_m_key


def main() -> None:
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    print("| shape | T | full SVD s | Gram (float64) s | error full float32 | error Gram |")
    print("|---|--:|--:|--:|--:|--:|")
    for m, n in [(768, 768), (3072, 768), (768, 3072)]:
        for t in (8, 20):
            shared = torch.randn(m, 16, generator=gen) @ torch.randn(16, n, generator=gen)
            tvs = [(shared + torch.randn(m, 16, generator=gen) @ torch.randn(16, n, generator=gen)) / 16 * 1e-3
                   + 1e-3 * torch.randn(m, n, generator=gen) for _ in range(t)]
            exact = tsv_m_key([x.double() for x in tvs], truncated=False)
            row = []
            for truncated in (False, True):
                start = time.process_time()
                out = tsv_m_key(tvs, truncated=truncated)
                row.append((time.process_time() - start,
                            float((out.double() - exact).norm() / exact.norm())))
            print(f"| {m}x{n} | {t} | {row[0][0]:.2f} | {row[1][0]:.2f} | {row[0][1]:.1e} | {row[1][1]:.1e} |",
                  flush=True)


if __name__ == "__main__":
    main()
