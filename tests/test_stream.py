"""Streaming merges: every rule read one parameter of every expert at a time from the task
vectors' HDF5 files gives bitwise the in-memory result; TIES' thresholds recorded at extraction
equal the computed ones; the merge stage holds one parameter of each expert at a time."""

from __future__ import annotations

import json
import weakref

import pytest
import torch

from submerge.errors import CheckpointError
from submerge.hogsvd import hogsvd
from submerge.io import hdf5
from submerge.io.hogsvd_cache import HOGSVDEntry, write_hogsvd_cache
from submerge.layers import LayerInfo
from submerge.merging import lines_alpha, merge, tall_masks
from submerge.merging.source import InMemorySource, TaskVectorSource
from submerge.merging.ties import TABLE_PERCENTS, threshold_table, trim_thresholds
from submerge.recipe import Boost, Lines, Method
from submerge.stages import merge as merge_stage

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

INFO = {"a.in_proj": LayerInfo(0, "attn", 3), "a.out": LayerInfo(0, "attn"),
        "m.fc1": LayerInfo(1, "mlp"), "m.fc2": LayerInfo(1, "mlp"), "ln": LayerInfo(1, "norm"),
        "emb": LayerInfo(None, "embed"), "bias": LayerInfo(0, "other")}
SHAPES = {"a.in_proj": (24, 8), "a.out": (8, 8), "m.fc1": (16, 8), "m.fc2": (8, 16), "ln": (8,),
          "emb": (2, 3, 4), "bias": (24,)}
CASES = [("task_arithmetic", {}), ("ties", {"k": 20}), ("ties", {"k": 37.5, "merge": "dis-sum"}),
         ("ties", {"k": 100}), ("consensus", {"lambdas": [0.3, 0.5, 0.2, 0.6]}),
         ("consensus", {"lambdas": 0.4, "k": 1, "base": "ties"}), ("tsv_m", {}), ("iso_c", {}),
         ("iso_cts", {}), ("iso_cts", {"common_space_fraction": 0.5}), ("hogsvd", {})]


def make_tvs(n, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{k: (torch.randn(*s, generator=g, dtype=torch.float64) * (1 + i)).to(dtype)
             for k, s in SHAPES.items()} for i in range(n)]


def write(tmp_path, tvs, stats=True):
    paths = []
    for i, tv in enumerate(tvs):
        path = tmp_path / f"tv{i}.h5"
        hdf5.write_state_dict(path, tv, INFO, {"expert": f"e{i}"},
                              stats={hdf5.TIES_THRESHOLDS: threshold_table(tv)} if stats else None)
        paths.append(path)
    return paths


def assert_same(got, want):
    assert list(got) == list(want)
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        assert torch.equal(got[key], want[key]), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("name,kwargs", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_streamed_merge_equals_in_memory(tmp_path, name, kwargs, dtype):
    tvs = make_tvs(4, dtype)
    want = merge(name, tvs, INFO, **kwargs)
    with hdf5.TaskVectorFiles(write(tmp_path, tvs)) as source:
        got = merge(name, source, INFO, **kwargs)
        assert lines_alpha(source, got) == lines_alpha(tvs, want)
    assert_same(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_recorded_thresholds_equal_computed_ones(dtype):
    tv = make_tvs(1, dtype, seed=3)[0]
    table = threshold_table(tv)
    assert sorted(int(k) for k in table) == list(TABLE_PERCENTS)
    for k in TABLE_PERCENTS:
        want = trim_thresholds([tv], k)[0]
        assert table[str(k)] == float(want), k
    # and an independent reading: the threshold keeps int(d*k/100) entries or more (ties)
    flat = torch.cat([v.double().abs().reshape(-1) for _, v in sorted(tv.items())])
    kept = int((flat >= table["20"]).sum())
    assert kept >= int(flat.numel() * 0.2) and int((flat > table["20"]).sum()) < int(flat.numel() * 0.2) + 1


def test_ties_uses_recorded_thresholds_and_falls_back(tmp_path):
    tvs = make_tvs(3)
    recorded = tmp_path / "rec"
    recorded.mkdir()
    with hdf5.TaskVectorFiles(write(recorded, tvs)) as source:
        assert source.ties_thresholds(37.5) is None  # not tabulated: computed
        thr = source.ties_thresholds(20)
        assert [float(t) for t in thr] == [float(t) for t in trim_thresholds(tvs, 20)]
        before = source.reads
        merge("ties", source, INFO, k=20)
        assert source.reads - before == 2 * len(tvs) * len(SHAPES)  # elect + merge, no flattening
    plain = tmp_path / "plain"
    plain.mkdir()
    with hdf5.TaskVectorFiles(write(plain, tvs, stats=False)) as source:
        assert source.ties_thresholds(20) is None
        before = source.reads
        assert_same(merge("ties", source, INFO, k=20), merge("ties", tvs, INFO, k=20))
        assert source.reads - before == 3 * len(tvs) * len(SHAPES)  # + one task at a time


def test_damaged_recorded_thresholds_are_refused(tmp_path):
    tv = make_tvs(1)[0]
    table = threshold_table(tv)
    table["50"], table["51"] = table["51"] * 0 + 1e9, table["50"]  # increasing in k
    path = tmp_path / "bad.h5"
    hdf5.write_state_dict(path, tv, INFO, {"expert": "e"}, stats={hdf5.TIES_THRESHOLDS: table})
    with pytest.raises(CheckpointError, match="bad.h5.*TIES thresholds"):
        hdf5.TaskVectorFiles([path])
    del table["50"]
    hdf5.write_state_dict(path, tv, INFO, {"expert": "e"}, stats={hdf5.TIES_THRESHOLDS: table})
    with pytest.raises(CheckpointError, match="bad.h5.*incomplete"):
        hdf5.TaskVectorFiles([path])


def test_changed_stats_fail_the_manifest_checksum(tmp_path):
    import h5py

    tv = make_tvs(1)[0]
    path = write(tmp_path, [tv])[0]
    with h5py.File(path, "r+") as f:
        manifest = json.loads(f[hdf5.MANIFEST].asstr()[()])
        manifest["stats"][hdf5.TIES_THRESHOLDS]["20"] *= 0.5
        del f[hdf5.MANIFEST]
        f.create_dataset(hdf5.MANIFEST, data=json.dumps(manifest), dtype=h5py.string_dtype("utf-8"))
    with pytest.raises(CheckpointError, match="corrupt manifest"):
        hdf5.TaskVectorFiles([path])


def test_files_that_disagree_are_named(tmp_path):
    a, b = make_tvs(2)
    b["ln"] = torch.zeros(9)
    paths = write(tmp_path, [a, b])
    with pytest.raises(CheckpointError, match=r"tv1\.h5, key 'ln'.*tv0\.h5"):
        hdf5.TaskVectorFiles(paths)
    del b["ln"]
    hdf5.write_state_dict(paths[1], b, INFO, {})
    with pytest.raises(CheckpointError, match=r"differ in key\(s\) \['ln'\]"):
        hdf5.TaskVectorFiles(paths)


class CountingSource(InMemorySource):
    """Hands out fresh copies and records, at every read, how many tensors of earlier reads
    of other keys are still alive (held by the merge rule)."""

    def __init__(self, tvs):
        super().__init__(tvs)
        self.alive: dict[int, str] = {}
        self.max_other_alive = 0
        self.reads = 0

    def _track(self, key, tensor):
        others = sum(1 for k in self.alive.values() if k != key)
        self.max_other_alive = max(self.max_other_alive, others)
        self.reads += 1
        copy = tensor.clone()
        ident = id(copy)
        self.alive[ident] = key
        weakref.finalize(copy, self.alive.pop, ident, None)
        return copy

    def read(self, key):
        return [self._track(key, tv[key]) for tv in self.task_vectors]

    def read_one(self, index, key):
        return self._track(key, self.task_vectors[index][key])


@pytest.mark.parametrize("name,kwargs", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_rules_hold_one_parameter_of_the_experts_at_a_time(name, kwargs):
    tvs = make_tvs(4)
    source = CountingSource(tvs)
    got = merge(name, source, INFO, **kwargs)
    lines_alpha(source, got)
    assert source.reads >= len(tvs) * len(SHAPES)
    # no tensor of another key is alive when a key is read
    assert source.max_other_alive == 0
    assert_same(got, merge(name, tvs, INFO, **kwargs))


class LazyCountingSource(CountingSource):
    """Like :class:`CountingSource`, but hands a key out as the files' source does: a
    :class:`~submerge.merging.source.KeyTensors` that reads one task's tensor per access."""

    def read(self, key):
        return TaskVectorSource.read(self, key)

    def _track(self, key, tensor):
        self.max_alive = max(getattr(self, "max_alive", 0), len(self.alive))
        return super()._track(key, tensor)


@pytest.mark.parametrize("name,kwargs", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_rules_hold_a_few_experts_tensors_at_a_time(tmp_path, name, kwargs):
    """Read lazily, every rule holds at most 3 expert tensors at any read (the first task's,
    the last one read and the one being read), not all 7: memory flat in the number of
    experts. The HO-GSVD itself needs every expert's matrix at once (here without a cache);
    with a cache, the Higher-Order merge reads one expert at a time too."""
    n = 7
    tvs = make_tvs(n)
    if name == "consensus" and isinstance(kwargs["lambdas"], list):
        kwargs = {**kwargs, "lambdas": [0.3, 0.5, 0.2, 0.6, 0.1, 0.4, 0.7]}
    if name == "hogsvd":
        from submerge.io.hogsvd_cache import read_hogsvd_cache

        kwargs = {"cache": read_hogsvd_cache(hogsvd_cache(tmp_path, tvs), with_basis=True)}
    source = LazyCountingSource(tvs)
    got = merge(name, source, INFO, **kwargs)
    lines_alpha(source, got)
    assert source.max_other_alive == 0
    assert source.max_alive <= 3, source.max_alive
    assert_same(got, merge(name, tvs, INFO, **kwargs))


def test_hogsvd_merge_with_lazily_read_bases(tmp_path):
    """The merge stage reads the cache's bases key by key (``with_basis="lazy"``): the same
    merge, bitwise; a basis damaged after the cache was opened is refused naming the file."""
    import h5py

    from submerge.io.hogsvd_cache import read_hogsvd_cache

    tvs = make_tvs(3)
    path = hogsvd_cache(tmp_path, tvs)
    want = merge("hogsvd", tvs, INFO, cache=read_hogsvd_cache(path, with_basis=True))
    lazy = read_hogsvd_cache(path, with_basis="lazy")
    assert_same(merge("hogsvd", tvs, INFO, cache=lazy), want)
    with h5py.File(path, "r+") as f:
        f["m.fc2/0/V"][0, 0] = f["m.fc2/0/V"][0, 0] + 1
    with pytest.raises(CheckpointError, match=r"hogsvd\.h5.*m\.fc2/0.*sha256"):
        merge("hogsvd", tvs, INFO, cache=lazy)


def test_hogsvd_without_a_cache_reads_each_expert_once_per_key():
    """The HO-GSVD needs every expert's matrix at once: read once per key (not per row block)."""
    tvs = make_tvs(3)
    source = LazyCountingSource(tvs)
    got = merge("hogsvd", source, INFO)
    assert source.reads == len(tvs) * len(SHAPES)
    assert_same(got, merge("hogsvd", tvs, INFO))


def hogsvd_cache(tmp_path, tvs, pi=0.01):
    from submerge.boosting import boost_targets

    entries = []
    for key, blocks in boost_targets(INFO).items():
        for b in range(blocks):
            res = hogsvd([tv[key].chunk(blocks, 0)[b] for tv in tvs], pi=pi)
            entries.append(HOGSVDEntry(key=key, row_block=b, kind=INFO[key].kind, block=INFO[key].block,
                                       V=res.V, sigma=res.sigma, eigvals=res.eigvals,
                                       transposed=res.transposed, seconds=0.0))
    path = tmp_path / "hogsvd.h5"
    write_hogsvd_cache(path, [f"e{i}" for i in range(len(tvs))], entries, {"pi": pi, "layers": "both"})
    return path


METHODS = [
    Method(name="ta_sb", merge="task_arithmetic", boost=Boost()),
    Method(name="ties_lines", merge="ties", hyper={"top_k_percent": 20, "aggregate": "dis-mean"},
           lines=Lines()),
    Method(name="cons", merge="consensus", hyper={"min_votes": 2, "combine": "ta"}),
    Method(name="tsv", merge="tsv_m", boost=Boost(layers="mlp")),
    Method(name="isocts", merge="iso_cts", hyper={"common_space_fraction": 0.8}, lines=Lines(scale=0.7)),
    Method(name="ho", merge="hogsvd", boost=Boost()),
]


@pytest.mark.parametrize("method", METHODS, ids=[m.name for m in METHODS])
def test_merge_group_equals_the_in_memory_merge(tmp_path, method):
    tvs = make_tvs(3)
    experts = [f"e{i}" for i in range(3)]
    paths = write(tmp_path, tvs)
    extra = {}
    lam_path = tmp_path / "lambdas.json"
    lam_path.write_text(json.dumps({"lambdas": {"e0": 0.2, "e1": 0.5, "e2": 0.4}}))
    extra = {"tall_lambdas": lam_path, "hogsvd": hogsvd_cache(tmp_path, tvs)}
    extra = {k: v for k, v in extra.items() if k in method.needs}
    out = tmp_path / "merged.h5"
    merge_stage.merge_group(experts, paths, method, out, extra_paths=extra, device="cpu")
    dense, factors, _, attrs = hdf5.read_factored(out)
    # the computation before streaming: every task vector in memory
    mem = [hdf5.read_state_dict(p)[0] for p in paths]
    info = hdf5.read_state_dict(paths[0])[1]
    delta, want_attrs = merge_stage.merged_task_vector(
        method, mem, info, merge_stage.extra_merge_inputs(method, experts, extra))
    want_factors = merge_stage.boost_factors(method, delta, info)
    assert_same(dense, {k: v for k, v in delta.items() if k not in want_factors})
    assert list(factors) == list(want_factors)
    for key in want_factors:
        for got_block, want_block in zip(factors[key], want_factors[key]):
            for g, w in zip(got_block, want_block):
                assert torch.equal(g, w), key
    for name, value in want_attrs.items():
        assert attrs[name] == value


def test_merge_group_leaves_only_its_output(tmp_path):
    """LiNeS at a fixed slope with the norm-based scale holds the unscaled keys in a temporary
    store next to the output: gone afterwards; the output's attributes are complete."""
    tvs = make_tvs(3)
    (tmp_path / "in").mkdir()
    paths = write(tmp_path / "in", tvs)
    out = tmp_path / "out" / "merged.h5"
    out.parent.mkdir()
    method = METHODS[1]  # TIES + LiNeS (norm scale, fixed slope)
    merge_stage.merge_group(["e0", "e1", "e2"], paths, method, out, device="cpu")
    assert sorted(p.name for p in out.parent.iterdir()) == ["merged.h5", "merged.h5.json"]
    _, _, _, attrs = hdf5.read_factored(out)
    assert {"lines_scale", "lines_slope", "experts", "method", "merge"} <= set(attrs)


@pytest.mark.parametrize("method", [METHODS[0], METHODS[1]], ids=["ta_sb", "ties_lines"])
def test_a_failing_streamed_merge_leaves_nothing(tmp_path, method):
    """A task vector damaged in a key read late (after earlier keys were written): the merge
    stage fails naming the file and leaves neither an output nor a temporary file."""
    tvs = make_tvs(3)
    (tmp_path / "in").mkdir()
    paths = write(tmp_path / "in", tvs)
    import h5py

    with h5py.File(paths[2], "r+") as f:  # the last key in sorted order, data changed behind the manifest
        f["m.fc2"][0, 0] = f["m.fc2"][0, 0] + 1
    out = tmp_path / "out" / "merged.h5"
    out.parent.mkdir()
    with pytest.raises(CheckpointError, match="tv2.h5"):
        merge_stage.merge_group(["e0", "e1", "e2"], paths, method, out, device="cpu")
    assert list(out.parent.iterdir()) == []


def test_tall_masked_deltas_equal_the_in_memory_masks(tmp_path):
    tvs = make_tvs(3, torch.bfloat16)
    with hdf5.TaskVectorFiles(write(tmp_path, tvs)) as source:
        mtl, ta = merge_stage._tall_sums(source)
        for lam in (0.2, 0.5):
            masks = tall_masks(tvs, [lam] * 3)
            want_ta = merge("task_arithmetic", tvs, INFO)
            for i in range(3):
                got = merge_stage._tall_masked(source, i, lam, mtl, ta)
                assert_same(got, {k: want_ta[k] * masks[i][k] for k in sorted(want_ta)})


# ------------------------------------------------- TSV-M's truncated decomposition (top_svd)

def known_svd(m, n, s, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = len(s)
    u = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))[0]
    s = torch.tensor(s, dtype=torch.float64)
    return ((u * s) @ v.T).to(dtype), u, s, v


@pytest.mark.parametrize("m,n", [(40, 12), (12, 40)])
def test_gram_path_gives_the_known_top_triplets(m, n):
    from submerge.spectral import top_svd_gram

    spectrum = [10.0 / (i + 1) for i in range(12)]
    a, u, s, v = known_svd(m, n, spectrum)
    got_u, got_s, got_vh = top_svd_gram(a, 5)
    torch.testing.assert_close(got_s, s[:5], rtol=1e-12, atol=0)
    signs = torch.sign((got_u * u[:, :5]).sum(0))  # vectors are defined up to sign
    torch.testing.assert_close(got_u * signs, u[:, :5], rtol=0, atol=1e-10)
    torch.testing.assert_close(got_vh * signs[:, None], v[:, :5].T, rtol=0, atol=1e-10)
    assert [t.shape for t in top_svd_gram(a, 0)] == [(m, 0), (0,), (0, n)]


def diagonal(spectrum, m=30, n=20):
    a = torch.zeros(m, n, dtype=torch.float64)
    a[range(len(spectrum)), range(len(spectrum))] = torch.tensor(spectrum, dtype=torch.float64)
    return a


@pytest.mark.parametrize("a,why", [
    (diagonal([5.0, 4.0, 3.0, 3.0, 1.0]), "equal singular values at the cut"),
    (diagonal([5.0, 4.0, 0.0, 0.0, 0.0]), "rank below r"),
    (known_svd(30, 20, [1.0, 0.5, 1e-7, 1e-8, 1e-9])[0], "too ill-conditioned for the Gram matrix"),
])
def test_gram_path_refuses_and_top_svd_falls_back_to_the_full_svd(a, why):
    from submerge.spectral import svd, top_svd, top_svd_gram

    assert top_svd_gram(a, 3) is None, why
    u, s, vh = svd(a)
    for got, want in zip(top_svd(a, 3, truncated=True, method="gram"), (u[:, :3], s[:3], vh[:3])):
        assert torch.equal(got, want)


def tsv_inputs(m, n, t, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(m, 8, generator=g) @ torch.randn(8, n, generator=g)
    return [((shared + torch.randn(m, 8, generator=g) @ torch.randn(8, n, generator=g)) / 8
             + 0.1 * torch.randn(m, n, generator=g)).to(dtype) for _ in range(t)]


@pytest.mark.parametrize("seed", [0])
@pytest.mark.parametrize("m,n", [(300, 260), (260, 520)])
def test_tsv_m_truncated_equals_full_svd_within_tolerance(m, n, seed):
    """float64 input: the two agree to 1e-11; float32: to 2e-4 (relative Frobenius), and the
    Gram path (float64 inside) is no farther from the float64 result than the float32 SVD."""
    from submerge.merging.tsv import tsv_m_key
    from submerge.spectral import top_svd_gram

    exact = tsv_m_key(tsv_inputs(m, n, 4, torch.float64, seed), truncated=False)
    for dtype, tol in ((torch.float32, 2e-4), (torch.float64, 1e-11)):
        tvs = tsv_inputs(m, n, 4, dtype, seed)
        assert all(top_svd_gram(x, min(m, n) // 4) is not None for x in tvs)  # the Gram path ran
        fast, full = tsv_m_key(tvs, truncated=True, method="gram"), tsv_m_key(tvs, truncated=False)
        assert float((fast - full).norm() / full.norm()) < tol
        if dtype == torch.float32:
            err_fast = float((fast.double() - exact).norm() / exact.norm())
            err_full = float((full.double() - exact).norm() / exact.norm())
            assert err_fast <= err_full * 1.2
        # the default takes the truncated path at this size (min side >= 256, r <= min side / 4)
        assert torch.equal(tsv_m_key(tvs), tsv_m_key(tvs, truncated=True))
        assert not torch.equal(tsv_m_key(tvs), full)


def test_tsv_m_small_matrices_keep_the_full_svd():
    from submerge.merging.tsv import tsv_m_key

    tvs = tsv_inputs(40, 30, 3, torch.float32)
    assert torch.equal(tsv_m_key(tvs), tsv_m_key(tvs, truncated=False))


def test_job_threads_cap_intra_and_inter_op_threads():
    import subprocess
    import sys

    code = ("import torch; from submerge.logs import setup_logging; setup_logging(None, 1); "
            "print(torch.get_num_threads(), torch.get_num_interop_threads())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={k: v for k, v in __import__("os").environ.items()
                              if not k.endswith("_NUM_THREADS")})
    assert out.stdout.split() == ["1", "1"]


def test_a_rule_written_for_lists_runs_on_a_file_source(tmp_path):
    """A merge rule that indexes ``task_vectors[i][key]`` (docs/extending.md) gets the same
    result from the files (each task vector is a read-on-access mapping)."""
    def mean_rule(task_vectors, layer_info):
        keys = sorted(task_vectors[0])
        return {k: sum(tv[k] for tv in task_vectors) / len(task_vectors) for k in keys}

    tvs = make_tvs(3)
    with hdf5.TaskVectorFiles(write(tmp_path, tvs)) as source:
        assert_same(mean_rule(source, INFO), mean_rule(tvs, INFO))
        with pytest.raises(KeyError):
            source[0]["nope"]
        with pytest.raises(IndexError):
            source[3]


def test_every_registered_rule_streams_its_keys():
    """Every merge function of the registry has a ``<function>_items`` companion (what the merge
    stage writes key by key), giving the same keys in sorted order and the same tensors."""
    import sys

    from submerge import merges
    from submerge.merging import merge_items

    tvs = make_tvs(3)
    for spec in merges.MERGES.values():
        fn = spec.function()
        assert hasattr(sys.modules[fn.__module__], fn.__name__ + "_items"), spec.name
        kwargs = {"lambdas": 0.4} if spec.name == "consensus" else {}
        items = list(merge_items(spec.name, tvs, INFO, **kwargs))
        assert [k for k, _ in items] == sorted(SHAPES)
        assert_same(dict(items), merge(spec.name, tvs, INFO, **kwargs))


def test_files_source_gives_freed_memory_back_after_each_key(tmp_path, monkeypatch):
    """The files source trims the heap once per key it hands out (glibc keeps freed blocks of a
    parameter's size mapped: without this the merge stage's RSS grows key by key)."""
    calls = []
    monkeypatch.setattr(hdf5, "trim_heap", lambda: calls.append(1))
    tvs = make_tvs(2)
    with hdf5.TaskVectorFiles(write(tmp_path, tvs)) as source:
        got = merge("task_arithmetic", source, INFO)
    assert len(calls) == len(SHAPES)
    assert_same(got, merge("task_arithmetic", tvs, INFO))
