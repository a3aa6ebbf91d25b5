"""Nearest-neighbour search by squared L2 that feeds the retrieval metrics.

:mod:`dist_triplet.metrics` defines Precision@1, R-Precision and MAP@R from the *ranked
relevance* of each query's neighbours (is the k-th nearest gallery item of the query's
class?); this module computes that relevance. Pure NumPy, plus faiss for the optional
approximate search of very large galleries.

The exact order is: squared Euclidean distance ascending, **ties broken by lower gallery
index first**. The ranking key of a (query q, gallery x) pair is
``||q||^2 + ||x||^2 - 2 q.x`` computed in float64, values at or below
``1e-10 * (||q||^2 + ||x||^2)`` (the expansion's rounding error) set to exactly 0, then
rounded to float32 so that duplicate points tie exactly (:func:`exact_keys`).

Engines (all give the same exact relevance; the choice is speed only):

* ``"exact"``: the reference -- float64 GEMM for every key, then the top k by
  ``partition`` with the tie rule rebuilt exactly (:func:`top_k_lowest_index_ties`).
* ``"fast"``: float32 GEMM with a rigorous error bound; only neighbours whose order the
  bound cannot certify, and whose swap could change a metric, get the exact key and the
  tie rule (:class:`_FastSearch`). 8-bit images (raw pixels) take an exact-integer GEMM.
* ``"auto"``: ``"fast"``, but tiles whose re-check would be large (a collapsed
  embedding, where everything ties) and data float32 cannot hold run ``"exact"``.

:meth:`NeighbourSearch.nearest_relevance` answers the first rank only (Precision@1) with
one GEMM and one pass of minima per query tile, certified the same way: it is several
times cheaper than the R nearest that R-Precision and MAP@R need.

:class:`ApproximateSearch` (faiss ``IndexIVFFlat``) ranks by float32 distances without
the tie rule, for galleries beyond the exact engines' budget; :func:`approximate_recall`
measures its recall@k against the exact top k.
"""
from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import numpy as np

__all__ = [
    "METHODS",
    "exact_keys",
    "top_k_lowest_index_ties",
    "exact_top_k",
    "NeighbourSearch",
    "ApproximateSearch",
    "approximate_recall",
    "benchmark",
]

METHODS = ("auto", "fast", "exact")

# Squared distances below this fraction of ||q||^2 + ||x||^2 are set to exactly 0. The
# expansion ||q||^2 + ||x||^2 - 2 q.x in float64 has a rounding error of about
# D * 1.1e-16 times that sum, so smaller values cannot be told from 0; snapping them makes
# exact duplicates (a collapsed embedding) tie exactly, and the tie rule then decides.
_ZERO_RTOL = 1e-10

_U32 = 2.0 ** -24            # unit roundoff of float32 (round to nearest)
# 8-bit images (data.load_split: bytes / 255). With c = byte - 128 in [-128, 127] as
# float32, every partial sum of a dot product over at most 1023 dimensions is an integer
# of magnitude below 1023 * 128**2 < 2**24, so float32 GEMM computes it exactly, in any
# summation order.
_GRID = 255
_GRID_CHUNK = (2 ** 24 - 1) // (128 * 128)  # 1023
_SAMPLE = 1024               # columns sampled to estimate each query's threshold
# An ulp of 0 is a subnormal: the relevance bit moves 0 by up to 1.4e-45, covered by this.
_TINY = float(np.finfo(np.float32).tiny)
_BINS = 4096                 # value bins per query, to find re-checked neighbours
_QUERY_TILE = 256            # queries per fast-path tile: keeps (tile, N) in cache
_TILE_VALUES = 2 ** 23       # at most this many float32 distances per tile (32 MiB), for big galleries


def workers() -> int:
    """Threads for the fast path: the cores this process may run on (at most 4)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


def check_matrix(values, name: str = "embeddings") -> np.ndarray:
    """``values`` as a 2-D numeric array; ValueError naming ``name`` otherwise."""
    arr = np.asarray(values)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
    return arr


def exact_keys(dot, scale) -> np.ndarray:
    """The ranking key: ``scale - 2 dot`` in float64, snapped, rounded to float32.

    ``dot`` = q.x and ``scale = ||q||^2 + ||x||^2``, float64 arrays of one shape. Values at
    or below ``_ZERO_RTOL * scale`` (the expansion's rounding error; also the small
    negatives) become exactly 0, non-finite values +inf (ranked last). Rounding to
    float32, the precision of the embeddings, makes duplicate points tie exactly instead
    of differing in float64 rounding noise. Modifies nothing it is given.
    """
    d = scale - 2.0 * dot
    d[d <= _ZERO_RTOL * scale] = 0.0
    d[~np.isfinite(d)] = np.inf
    return d.astype(np.float32)


def _block_keys(q: np.ndarray, q_norm: np.ndarray, x: np.ndarray,
                x_norm: np.ndarray) -> np.ndarray:
    """Ranking keys of ``block`` queries against all rows: (Bq, N) float32 from float64
    inputs (see :func:`exact_keys`); the reference ("exact") path."""
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite rows: ranked last
        return exact_keys(q @ x.T, q_norm[:, None] + x_norm[None, :])


def top_k_lowest_index_ties(d: np.ndarray, k: int,
                            self_cols: Optional[np.ndarray] = None) -> np.ndarray:
    """The k nearest columns of each row of ``d`` (B, N), ordered, ties by lower index.

    ``self_cols`` (B,) int or None: the column of each row's query (leave-one-out), which
    is never returned. Returns (B, k) int64. Requires 1 <= k <= N (N - 1 with
    ``self_cols``).

    ``argpartition`` alone picks an arbitrary subset of the columns tied with the k-th
    value, so the k-th value ``t`` is found first and the set is rebuilt exactly: all
    columns with ``d < t`` plus the lowest-index columns with ``d == t`` until k are taken.
    """
    b, n = d.shape
    rows = np.arange(b)
    d = d.copy()
    not_self = np.ones((b, n), dtype=bool)
    if self_cols is not None:
        d[rows, self_cols] = np.inf  # the query is never its own neighbour
        not_self[rows, self_cols] = False
    # The query's +inf is the row maximum, and each row has >= k other columns, so the
    # k-th smallest of the row is the k-th smallest among the other columns.
    t = np.partition(d, k - 1, axis=1)[:, k - 1]
    below = (d < t[:, None]) & not_self
    equal = (d == t[:, None]) & not_self
    need = k - below.sum(axis=1)  # >= 1, since t itself is one of the k smallest
    chosen = below | (equal & (np.cumsum(equal, axis=1) <= need[:, None]))
    # Exactly k per row; nonzero() walks row-major, so each row's columns come ascending.
    cols = np.nonzero(chosen)[1].reshape(b, k)
    # A stable sort of ascending-index columns keeps lower indices first among ties.
    order = np.argsort(np.take_along_axis(d, cols, axis=1), axis=1, kind="stable")
    return np.take_along_axis(cols, order, axis=1)


def exact_top_k(query, gallery, k: int, *, leave_one_out: bool = False,
                block: int = 1024) -> np.ndarray:
    """Indices of the k nearest gallery rows of each query, exact, ties by lower index.

    The reference for :func:`approximate_recall`. ``query`` (Q, D), ``gallery`` (N, D)
    numeric; with ``leave_one_out`` the query set *is* the gallery (pass the same array)
    and row i never returns i. Returns (Q, k) int64. Memory O(block * N) float64.

    Raises:
        ValueError: if k is outside [1, N] ([1, N - 1] leaving one out).
    """
    q = check_matrix(query, "query").astype(np.float64)
    g = check_matrix(gallery, "gallery").astype(np.float64)
    limit = g.shape[0] - (1 if leave_one_out else 0)
    if not 1 <= k <= limit:
        raise ValueError(f"k must lie in [1, {limit}], got {k}")
    qn = np.einsum("ij,ij->i", q, q)
    gn = np.einsum("ij,ij->i", g, g)
    out = np.empty((q.shape[0], k), np.int64)
    for s in range(0, q.shape[0], block):
        rows = np.arange(s, min(s + block, q.shape[0]))
        d = _block_keys(q[rows], qn[rows], g, gn)
        out[rows] = top_k_lowest_index_ties(d, k, rows if leave_one_out else None)
    return out


def as_grid(emb: np.ndarray):
    """The bytes ``v`` (N, D) float32 if ``emb`` is 8-bit image data, else None.

    8-bit data are uint8 arrays, or float32 arrays equal to ``float32(v) / 255`` for
    integers v in [0, 255] (what :func:`dist_triplet.data.load_split` returns).
    """
    if emb.dtype == np.uint8:
        return emb.astype(np.float32)
    if emb.dtype != np.float32:
        return None
    head = emb[:64]                      # embeddings fail here already: skip the full pass
    if not np.array_equal(np.rint(head * np.float32(_GRID)) / np.float32(_GRID), head):
        return None
    v = np.rint(emb * np.float32(_GRID))
    if v.size and (v.min() < 0 or v.max() > _GRID):
        return None
    # float32 division is correctly rounded, as the division that made the data.
    if not np.array_equal(v / np.float32(_GRID), emb):
        return None
    return v


class _Side:
    """One set of rows (the queries or the gallery) as the fast path needs them."""

    def __init__(self, emb: np.ndarray, grid, cuts, centre):
        if grid is not None:
            c = grid - np.float32(128)                   # exact, in [-128, 127]
            self.chunks = [np.ascontiguousarray(c[:, a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
            norms = np.einsum("ij,ij->i", c, c, dtype=np.float64)         # exact integers
            # Norms in the bound: of c and of the bytes (the representation term).
            self.byte_norm = np.einsum("ij,ij->i", grid, grid, dtype=np.float64)
            self.e_norm = norms + self.byte_norm
        else:
            # Centred: distances do not change, but the bound scales with the norms, so a
            # clumped embedding (early training: a small cap of the sphere) stays cheap.
            x32 = np.ascontiguousarray(emb.astype(np.float64) - centre, dtype=np.float32)
            self.chunks = [x32]
            norms = np.einsum("ij,ij->i", x32, x32, dtype=np.float64)
            self.byte_norm = None
            self.e_norm = norms
        self.norm32 = norms.astype(np.float32)
        # The exact re-check reads the caller's values: float32 and uint8 rows are
        # gathered as they are and multiplied in float64 (products exact), like the exact
        # path's float64 copy; other dtypes are cast once.
        self.exact_rows = emb if emb.dtype in (np.float32, np.uint8) else emb.astype(np.float64)
        self.exact_norms = np.einsum("ij,ij->i", self.exact_rows, self.exact_rows,
                                     dtype=np.float64)
        # The key strays from the true distance by its float64 expansion's rounding and
        # the snap to 0, both relative to the *uncentred* norms (in A's units).
        self.key_norm = self.byte_norm if grid is not None else self.exact_norms


class _FastSearch:
    """Ranked relevance from float32 GEMM distances with a certified exact re-check.

    Approximate squared distances ``A`` come from float32 GEMM (BLAS). Each satisfies
    ``|A - key| <= E`` where ``key`` is the exact path's ranking key and ``E`` a rigorous
    bound. Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed., Sec. 3.1: a
    D-term dot product in precision u errs by at most gamma_D * sum_k |q_k x_k|,
    gamma_D = D u / (1 - D u), in any summation order, with or without FMA. Hence:

    * float data, centred on the gallery's mean (distances do not change; the bound
      shrinks with the norms, which keeps a clumped early-training embedding cheap):
      ``E = (gamma_D + 14 u) (||q||^2 + ||x||^2)`` of the centred rows, since
      ``2 sum |q_k x_k| <= ||q||^2 + ||x||^2``; the 14 u cover rounding the norms, the two
      additions, the centred rows' rounding to float32 and the key's rounding.
    * 8-bit images (v = bytes, x = float32(v / 255)): with c = v - 128 every partial sum
      of ``c_v . c_w`` over <= 1023 dimensions is an integer below 2**24, so float32 GEMM
      gets the dot products exactly; ``||v - w||^2 = ||c_v||^2 + ||c_w||^2 - 2 c_v . c_w``
      then adds integers below 2**26, rounding by at most 2 per addition: ``A`` is within
      4 of the exact integer. Only x's representation of v / 255 separates that from the
      key (:meth:`_byte_bound`): a few byte units, where neighbours lie thousands apart.
      (With m > 1 chunks: ``(m + 6) u (||c_v||^2 + ||v||^2 + ...)``.)
    * both: the key strays from the true distance by its own float64 rounding and its
      snap to 0, ``key_coef (||q||^2 + ||x||^2)`` of the uncentred rows (``key_coef`` =
      1e-10 + (D + 4) 2**-53), added to E.

    Per tile of queries: the R_i-th smallest value of each row is estimated from a
    sample of the columns, and every column within that value plus ``2 E`` is kept -- a
    superset of the true top R_i, checked after sorting (rows that fail are redone with
    the exact R_i-th value). The kept values, with the relevance bit in the lowest
    mantissa bit (a 1-ulp change, within the tolerance), are sorted with NumPy's SIMD
    float32 sort. Consecutive values closer than ``2 E`` (plus ulps) are *linked*: only
    along links can the true order differ. P@1, R-Precision and MAP@R depend only on the
    sequence of relevance bits, so only runs of links ("clusters") that mix relevant
    and irrelevant neighbours and reach the first R_i ranks can matter. Their members are
    found again (value bins per query), their exact keys computed in float64 by the exact
    path's formula, and they are re-ordered by (key, index) -- the lower-index tie rule.
    Everything else keeps the float32 order, which is then provably the exact one up to
    swaps of equally relevant neighbours.

    ``query`` None: leave-one-out, the queries are the gallery's rows and each query's
    own column is excluded.
    """

    def __init__(self, gallery: np.ndarray, gallery_codes: np.ndarray,
                 query: Optional[np.ndarray] = None, query_codes: Optional[np.ndarray] = None):
        with np.errstate(invalid="ignore", over="ignore"):  # see usable()
            self._setup(gallery, gallery_codes, query, query_codes)

    def _setup(self, gallery, gallery_codes, query, query_codes):
        n, dim = gallery.shape
        self.n = n
        self.loo = query is None
        grid = as_grid(gallery)
        q_grid = grid if self.loo else (as_grid(query) if grid is not None else None)
        if q_grid is None:
            grid = None
        cuts = centre = None
        if grid is not None:
            m = max(1, -(-dim // _GRID_CHUNK))
            cuts = np.linspace(0, dim, m + 1).round().astype(int)
            self.coef = (m + 6) * _U32
            self.triangle = False  # ||c||^2 + ||v||^2 varies little across images
            # One chunk: the dot products are exact and every later step adds integers
            # below 2**26, so A is within 4 of the exact ||v - w||^2 (byte units).
            self.grid_exact = m == 1
            self.is_grid = True
        else:
            centre = gallery.astype(np.float64).mean(axis=0) if n else 0.0
            self.coef = dim * _U32 / (1.0 - dim * _U32) + 14 * _U32
            self.triangle = True
            self.grid_exact = False
            self.is_grid = False
        self.g = _Side(gallery, grid, cuts, centre)
        self.q = self.g if self.loo else _Side(query, q_grid, cuts, centre)
        self.gcodes = gallery_codes
        self.qcodes = gallery_codes if self.loo else query_codes
        g = self.g
        self.e_max = float(g.e_norm.max()) if n else 0.0
        self.byte_max = float(g.byte_norm.max()) if (grid is not None and n) else 0.0
        # Columns whose values estimate each query's threshold (every stride-th one).
        self.sample = np.arange(0, n, max(1, n // _SAMPLE))
        # Wide rows: the sample is read from the tile's own distances (one strided pass);
        # narrow rows: a small GEMM of its own is cheaper than that pass.
        self.sample_from_tile = dim > 256
        self.sample_chunks = [np.ascontiguousarray(x[self.sample]) for x in g.chunks]
        self.key_coef = _ZERO_RTOL + (dim + 4) * 2.0 ** -53
        self.key_max = float(g.key_norm.max()) if n else 0.0
        self._by_class = None  # class-sorted copy of the gallery, for nearest_relevance
        self._by_class_lock = threading.Lock()

    def usable(self) -> bool:
        """False if float32 cannot hold the data (overflow, NaN, inf): use the exact path."""
        with np.errstate(invalid="ignore", over="ignore"):
            sides = (self.g,) if self.loo else (self.g, self.q)
            return bool(all(np.isfinite(s.norm32).all() and np.isfinite(s.exact_norms).all()
                            and (s.e_norm.size == 0 or
                                 (np.isfinite(s.e_norm.max())
                                  and s.e_norm.max() * 16 < np.finfo(np.float32).max))
                            for s in sides)
                        and np.isfinite(self.e_max))

    def _approx(self, q_idx: np.ndarray, cols=None, chunks=None, norm32=None,
                self_cols=None) -> np.ndarray:
        """(B, N) float32 ``A``: approximate squared distances, +inf at the query itself.

        With ``cols`` (must be ``self.sample``): (B, len(cols)) for the sampled columns,
        the query not set to +inf. ``chunks``/``norm32``/``self_cols``: another column
        order of the gallery (the class-sorted copy) and the queries' columns in it."""
        b = len(q_idx)
        if chunks is None:
            chunks = self.g.chunks if cols is None else self.sample_chunks
            norm32 = self.g.norm32 if cols is None else self.g.norm32[cols]
            self_cols = q_idx
        a = np.empty((b, chunks[0].shape[0]), np.float32)
        tmp = np.empty_like(a) if len(chunks) > 1 else None
        for i, x in enumerate(chunks):
            np.matmul(self.q.chunks[i][q_idx], x.T, out=tmp if i else a)
            if i:
                a += tmp
        a *= np.float32(-2.0)                      # exact
        a += norm32[None, :]
        a += self.q.norm32[q_idx, None]
        if cols is None and self.loo:
            a[np.arange(b), self_cols] = np.inf
        return a

    def _errors(self, q_idx, coef: Optional[float] = None):
        """(e_key, e_max): (B,) float64 bounds on |key - true| and on |A - key|; ``coef``
        replaces ``self.coef`` (the augmented GEMM's)."""
        e_key = self.key_coef * (self.q.key_norm[q_idx] + self.key_max)  # snap, float64
        coef = self.coef if coef is None else coef
        return e_key, coef * (self.q.e_norm[q_idx] + self.e_max) + e_key

    def ranked_relevance(self, q_idx: np.ndarray, r: np.ndarray, max_recheck: float,
                         exact_t: bool = False):
        """(B, K) bool relevance of each query's neighbours in exact rank order, or None.

        ``q_idx`` (B,) query rows, ``r`` (B,) the ranks needed, each >= 1 (R_i). Columns
        past a row's ``r`` may be padding (False). None when more than ``max_recheck`` of
        the B * N pairs would need the exact re-check (near-collapsed embeddings): the
        caller then runs the exact path. ``exact_t``: take the exact R_i-th value as
        threshold instead of a sample's.
        """
        n, b = self.n, len(q_idx)
        rows_b = np.arange(b)
        a = self._approx(q_idx)
        e_key, e_max = self._errors(q_idx)

        # --- threshold T_i ~ the R_i-th smallest A of the row, from a sample of columns
        if exact_t:
            t = np.empty(b, np.float32)
            for rv in np.unique(r):
                sel = np.flatnonzero(r == rv)
                t[sel] = np.partition(a[sel], rv - 1, axis=1)[:, rv - 1]
        else:
            sample = np.sort(a[:, self.sample] if self.sample_from_tile
                             else self._approx(q_idx, self.sample), axis=1)  # (B, ~_SAMPLE)
            ns = sample.shape[1]
            expect = r * (ns / n)
            # ~2 standard deviations above the expected rank of the R_i-th value
            j = np.minimum(ns - 1, np.ceil(1.05 * expect + 2.0 * np.sqrt(expect) + 2).astype(int))
            t = sample[rows_b, j]
        if not np.isfinite(t).all():  # ran into the query's own +inf: all finite values
            bad = np.flatnonzero(~np.isfinite(t))
            t[bad] = np.where(np.isfinite(a[bad]), a[bad], -np.inf).max(axis=1)
        # Kept values V = A clipped at 0, within e of the key. If >= R_i kept values are
        # <= t_chk (checked after sorting), those R_i have key <= t_chk + e, and a column
        # with A > tau = t_chk + 2 e has key > t_chk + e: it is not in the top R_i.
        t = np.maximum(t.astype(np.float64), 0.0)
        t_chk = t + 2.0 ** -22 * t + _TINY              # + the 1-ulp relevance bit
        if self.grid_exact:
            # |A - ||v - w||^2| <= 4; the representation bound holds for keys <= w, and
            # kept keys are <= tau + e <= w. Any squared distance is <= 2 (||v||^2 +
            # ||w||^2), which gives a first e.
            nq = self.q.byte_norm[q_idx]
            w_max = 2.0 * (nq + self.byte_max)
            e_max = np.minimum(e_max, 4.0 + self._byte_bound(q_idx, w_max))
            w = np.minimum(w_max, t_chk + 3.0 * e_max)
            e_max = np.minimum(e_max, 4.0 + self._byte_bound(q_idx, w))
        tau = t_chk + 2.0 * e_max
        tau32 = np.nextafter((tau + 2.0 ** -22 * np.abs(tau)).astype(np.float32),
                             np.float32(np.inf))
        mask = a <= tau32[:, None]
        counts = np.count_nonzero(mask, axis=1)
        if max_recheck < 1 and counts.max() > max(64, n // 2):
            return None                                # near-collapse: the exact path is cheaper
        flat = np.flatnonzero(mask)
        del mask
        rows = np.repeat(rows_b, counts)
        cols = flat - rows * n
        vals = a.ravel()[flat]
        del a
        np.maximum(vals, 0, out=vals)                  # keys are >= 0: clipping only helps

        # --- sort the kept values, the relevance bit in the lowest mantissa bit
        rel = self.gcodes[cols] == np.repeat(self.qcodes[q_idx], counts)
        enc = ((vals.view(np.uint32) & np.uint32(0xFFFFFFFE)) | rel).view(np.float32)
        k = int(counts.max())
        s = np.full((b, k), np.inf, np.float32)
        s[np.arange(k)[None, :] < counts[:, None]] = enc   # row-major, as enc
        s.sort(axis=1)                                 # SIMD float32 sort, values only
        rel_s = (s.view(np.uint32) & np.uint32(1)).astype(bool)   # +inf padding: 0
        # The kept set holds the true top R_i if >= R_i kept values are <= t_chk (then
        # any column with A > t_chk + 2 E is farther than those R_i); else redo the row.
        short = np.flatnonzero(~(s[rows_b, np.minimum(r, k) - 1] <= t_chk) | (counts < r))
        if short.size:
            if exact_t:  # pragma: no cover - the exact R_i-th value always suffices
                raise AssertionError("exact threshold did not bracket R_i")
            redo = self.ranked_relevance(q_idx[short], r[short], max_recheck, True)
            if redo is None:
                return None
        else:
            redo = None

        # --- links: neighbours whose true order is uncertain; mixed ones matter
        if self.grid_exact:
            e_row = e_max  # keys of kept columns are <= tau + e_max <= w above
        else:
            # A kept column x has ||x|| <= ||q|| + sqrt(key), key <= tau + E.
            qn = self.q.e_norm[q_idx]
            xn_bound = self.e_max
            if self.triangle:
                xn_bound = np.minimum(xn_bound,
                                      (np.sqrt(qn) + np.sqrt(np.maximum(tau + e_max, 0))) ** 2)
            e_row = (self.coef * (qn + xn_bound) + e_key) * (1 + 2.0 ** -20)
        tol = (2.0 * e_row + 2.0 ** -21 * np.abs(tau) + _TINY) * (1 + 2.0 ** -20)  # + 2 ulps
        tol32 = np.nextafter(tol.astype(np.float32), np.float32(np.inf))
        with np.errstate(invalid="ignore"):            # inf - inf in the padding: no link
            link = np.diff(s, axis=1) <= tol32[:, None]
        mixed = link & (rel_s[:, 1:] != rel_s[:, :-1])
        if mixed.any():
            # Each mixed link's cluster runs from the break before it to the break after
            # it (or the row's ends); breaks found by binary search in the flat list.
            lr, lp = np.nonzero(mixed)                  # link between lp and lp + 1
            at = lr * (k - 1) + lp
            # flat (row, j) where j and j + 1 are not linked, between two sentinels
            brk = np.concatenate(([-1], np.flatnonzero(~link), [b * (k - 1)]))
            i = np.searchsorted(brk, at)                # brk[i - 1] < at < brk[i]
            before, after = brk[i - 1], brk[i]
            left = np.where(before >= lr * (k - 1), before - lr * (k - 1) + 1, 0)
            right = np.where(after < (lr + 1) * (k - 1), after - lr * (k - 1), k - 1)
            _, first = np.unique(lr * k + left, return_index=True)   # one per cluster, sorted
            first = first[left[first] < r[lr[first]]]  # clusters reaching the first R_i ranks
            c_row, c_lo, c_hi = lr[first], left[first], right[first]
            size = c_hi - c_lo + 1
            if size.sum() > max_recheck * b * n:
                return None
            if size.size:
                self._rerank(rel_s, s, q_idx, counts, cols, enc, tau32, c_row, c_lo, size)
        if redo is not None:
            out = np.zeros((b, max(k, redo.shape[1])), bool)
            out[:, :k] = rel_s
            out[short] = False
            out[short, :redo.shape[1]] = redo
            rel_s = out
        return rel_s

    def _byte_bound(self, q_idx: np.ndarray, w: np.ndarray) -> np.ndarray:
        """(B,) bound on |exact bytes distance - 255**2 key| for keys <= ``w`` (byte units).

        With x = float32(v / 255) = (v / 255)(1 + e), |e| <= u, 255**2 ||x - y||^2 differs
        from ||v - w||^2 by <= 2 u sqrt(d) (||v|| + ||w||) + O(u**2); rounding the key and
        the kept value to float32 add u d each; the key's float64 expansion and its snap
        to 0 add ``key_coef (||v||^2 + ||w||^2)`` (byte units: 255**2 times x's norms).
        """
        w = np.maximum(w, 0.0)
        nq = self.q.byte_norm[q_idx]
        nmax = self.byte_max
        e = (2 * _U32 * np.sqrt(w) * (np.sqrt(nq) + np.sqrt(nmax)) + 2 * _U32 * w
             + 2 * self.key_coef * (nq + nmax))
        return e * (1 + 2.0 ** -10) + 4 * _U32 ** 2 * (nq + nmax)

    def _pair_keys(self, qg: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Exact keys of the pairs (query qg[i], gallery cols[i]), as the exact path."""
        dot = np.einsum("ij,ij->i", self.q.exact_rows[qg], self.g.exact_rows[cols],
                        dtype=np.float64)
        return exact_keys(dot, self.q.exact_norms[qg] + self.g.exact_norms[cols])

    def _rerank(self, rel_s, s, q_idx, counts, cols, enc, tau32, c_row, c_lo, size):
        """Re-order the clusters (c_row, c_lo .. c_lo + size - 1) of ``rel_s`` exactly.

        ``counts`` (B,), ``cols`` and ``enc`` (sum(counts),): the kept columns and their
        encoded values, row-major, as before sorting."""
        b = rel_s.shape[0]
        lo = s[c_row, c_lo]
        hi = s[c_row, c_lo + size - 1]
        # Find the clusters' columns among the kept ones: _BINS value bins over [0, tau_i]
        # per query narrow the search (the same monotone float32 arithmetic for bounds and
        # values), then the exact value interval decides.
        scale = (_BINS / np.maximum(tau32, np.finfo(np.float32).tiny)).astype(np.float32)

        def bin_of(v, sc):
            out = (v * sc).astype(np.int32)
            return np.minimum(out, _BINS - 1, out=out)

        b_lo = bin_of(lo, scale[c_row]).astype(np.int64)
        span = bin_of(hi, scale[c_row]) - b_lo + 1
        off = np.arange(span.sum()) - np.repeat(np.cumsum(span) - span, span)
        table = np.zeros(b * _BINS, bool)
        table[np.repeat(c_row * _BINS + b_lo, span) + off] = True
        bins = bin_of(enc, np.repeat(scale, counts))
        bins += np.repeat(np.arange(0, b * _BINS, _BINS, dtype=np.int32), counts)
        cand = np.flatnonzero(table[bins])
        rows = np.repeat(np.arange(b), counts)
        m_row, m_col, m_enc = rows[cand], cols[cand], enc[cand]
        key = (m_row.astype(np.int64) << 32) | m_enc.view(np.uint32).astype(np.int64)
        lo_key = (c_row.astype(np.int64) << 32) | lo.view(np.uint32).astype(np.int64)
        cl = np.searchsorted(lo_key, key, side="right") - 1
        ok = cl >= 0
        cl[~ok] = 0
        ok &= (c_row[cl] == m_row) & (m_enc <= hi[cl])
        cl, m_row, m_col = cl[ok], m_row[ok], m_col[ok]
        if not np.array_equal(np.bincount(cl, minlength=len(c_row)), size):  # pragma: no cover
            raise AssertionError("re-check lost track of a cluster's members")
        # Exact keys, computed as the exact path computes them, and the lower-index rule.
        qg = q_idx[m_row]
        exact = self._pair_keys(qg, m_col)
        order = np.lexsort((m_col, exact, cl))
        within = np.arange(size.sum()) - np.repeat(np.cumsum(size) - size, size)
        pos = np.repeat(c_lo, size) + within           # each cluster's positions
        rel_s[np.repeat(c_row, size), pos] = (self.gcodes[m_col] == self.qcodes[qg])[order]

    # ----------------------------------------------------------------- first rank only

    def _class_sorted(self):
        """The gallery's chunks in class order, each class's column range, the inverse."""
        with self._by_class_lock:
            if self._by_class is None:
                self._by_class = self._sort_by_class()
        return self._by_class

    def _sort_by_class(self):
        order = np.argsort(self.gcodes, kind="stable")
        ncodes = int(max(self.gcodes.max(initial=-1), self.qcodes.max(initial=-1))) + 1
        bounds = np.searchsorted(self.gcodes[order], np.arange(ncodes + 1))
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        return (order, inverse, bounds,
                [np.ascontiguousarray(x[order]) for x in self.g.chunks], self.g.norm32[order])

    def nearest_relevance(self, q_idx: np.ndarray, max_recheck: float):
        """(B,) bool: is the nearest neighbour (tie rule) of each query of its class? Or None.

        ``q_idx`` must be sorted by query class. One GEMM against the class-sorted gallery,
        then per query the smallest ``A`` among same-class columns (one contiguous range)
        and among the others: when they differ by more than ``2 E`` the answer is
        certain (``|A - key| <= E``); otherwise the columns within ``2 E`` of the row's
        minimum get their exact keys and the lowest (key, index) decides. None when more
        than ``max_recheck`` of the B * N pairs would need that (near-collapse).
        """
        order, inverse, bounds, chunks, norm32 = self._class_sorted()
        b = len(q_idx)
        a = self._approx(q_idx, chunks=chunks, norm32=norm32,
                         self_cols=inverse[q_idx] if self.loo else None)
        qc = self.qcodes[q_idx]
        m_same = np.full(b, np.inf)
        m_other = np.full(b, np.inf)
        cut = np.flatnonzero(np.diff(qc)) + 1
        for r0, r1 in zip(np.r_[0, cut], np.r_[cut, b]):   # rows of one class: contiguous
            lo, hi = bounds[qc[r0]], bounds[qc[r0] + 1]
            if hi > lo:
                m_same[r0:r1] = a[r0:r1, lo:hi].min(axis=1)
            if lo > 0:
                m_other[r0:r1] = a[r0:r1, :lo].min(axis=1)
            if hi < self.n:
                m_other[r0:r1] = np.minimum(m_other[r0:r1], a[r0:r1, hi:].min(axis=1))
        return self._decide_first(q_idx, m_same, m_other, lambda u: (a[u], order), max_recheck)

    def _decide_first(self, q_idx, m_same, m_other, rows_of, max_recheck, coef=None):
        """(B,) bool from each query's smallest same-class and other-class ``A``, or None.

        Certain where the two differ by more than ``2 E`` (+ ulps): then the smaller side
        holds the nearest neighbour. The other queries re-check the columns within
        ``2 E`` of their minimum by exact keys; ``rows_of(u)`` gives those queries' ``A``
        rows (U, N) and the gallery index of each column. None when more than
        ``max_recheck`` of the B * N pairs would need the re-check (near-collapse).
        ``coef``: the bound's coefficient of the minima, if not ``self.coef``; it must be
        >= ``self.coef``, since the re-checked rows come from :meth:`_approx`.
        """
        b = len(q_idx)
        _, e_max = self._errors(q_idx, coef)
        low = np.minimum(m_same, m_other)
        tol = (2.0 * e_max + 2.0 ** -21 * np.maximum(low, 0.0) + _TINY) * (1 + 2.0 ** -20)
        out = m_same < m_other
        with np.errstate(invalid="ignore"):                # inf - inf: only one class present
            unsure = np.flatnonzero(~(np.abs(m_same - m_other) > tol))
        if unsure.size > max(64, max_recheck * b):
            return None
        lim = np.nextafter((low[unsure] + tol[unsure]).astype(np.float32), np.float32(np.inf))
        for s in range(0, unsure.size, _QUERY_TILE):
            u = unsure[s:s + _QUERY_TILE]
            a, col_of = rows_of(u)
            u_row, pos = np.nonzero(a <= lim[s:s + _QUERY_TILE, None])
            if u_row.size > max(64, max_recheck * b * self.n):
                return None
            cols = col_of[pos]
            qg = q_idx[u][u_row]
            keys = self._pair_keys(qg, cols)
            best = np.lexsort((cols, keys, u_row))         # per row: lowest key, then index
            first = np.r_[0, np.flatnonzero(np.diff(u_row[best])) + 1]
            win = best[first]
            out[u[u_row[win]]] = self.gcodes[cols[win]] == self.qcodes[qg[win]]
        return out

    def nearest_relevance_all(self, max_recheck: float, threads: int, tile: int = 1024):
        """(N,) bool :meth:`nearest_relevance` of every row, leaving one out, or None.

        The distance matrix is symmetric, so half of it is computed: the rows in class
        order, tiles (i, j >= i) of ``tile`` x ``tile``; each gives row minima to tile i
        and column minima to tile j, split into same-class and other-class columns
        (contiguous ranges, the rows being sorted by class). Half the GEMM of the
        per-query path, with the same certificate and re-check.

        Float data take one *augmented* GEMM per tile, ``[q, ||q||^2, 1] . [-2 x, 1,
        ||x||^2]``, which yields ``A`` without three passes of additions. Its error
        (Higham Sec. 3.1, D + 2 terms): ``gamma_{D+2} (2 sum |q_k x_k| + ||q||^2 +
        ||x||^2) <= 2 gamma_{D+2} (1 + u) (||q||^2 + ||x||^2)`` with the norms' rounding;
        the 14 u of the plain bound cover the rest as there, so the coefficient is
        ``2 gamma_{D+2} (1 + u) + 14 u``. (8-bit images keep the plain GEMM: their exact
        integer products would not survive the norms' addition inside it.)
        """
        if not self.loo:
            raise ValueError("nearest_relevance_all needs leave-one-out (no query set)")
        order, inverse, bounds, chunks, norm32 = self._class_sorted()
        n = self.n
        codes = self.gcodes[order]
        coef = None
        if not self.is_grid:                                  # float data: augmented GEMM
            x, ones = chunks[0], np.ones((n, 1), np.float32)
            q_aug = np.hstack([x, norm32[:, None], ones])
            g_aug = np.hstack([np.float32(-2.0) * x, ones, norm32[:, None]])   # -2x exact
            dim = x.shape[1] + 2
            coef = 2.0 * (dim * _U32 / (1.0 - dim * _U32)) * (1.0 + _U32) + 14 * _U32
        starts = list(range(0, n, tile))
        m_same = np.full(n, np.inf)
        m_other = np.full(n, np.inf)
        lock = threading.Lock()

        def segments(s, e):
            """(lo, hi, same_lo, same_hi) per class run in [s, e), relative to s; the run's
            class's whole range relative to s (may reach outside [0, e - s))."""
            c = codes[s:e]
            cut = np.flatnonzero(np.diff(c)) + 1
            return [(r0, r1, bounds[c[r0]] - s, bounds[c[r0] + 1] - s)
                    for r0, r1 in zip(np.r_[0, cut], np.r_[cut, e - s])]

        def mins(block, lo, hi, axis):
            """Minima of ``block`` along ``axis`` inside [lo, hi) (same) and outside (other)."""
            size = block.shape[axis]
            lo, hi = min(max(lo, 0), size), min(max(hi, 0), size)   # clip into the block
            take = (lambda a, b: block[a:b]) if axis == 0 else (lambda a, b: block[:, a:b])
            same = take(lo, hi).min(axis=axis) if hi > lo else None
            other = None
            for a, b in ((0, lo), (hi, size)):
                if b > a:
                    part = take(a, b).min(axis=axis)
                    other = part if other is None else np.minimum(other, part)
            return same, other

        def fold(target, sl, values):
            if values is not None:
                np.minimum(target[sl], values, out=target[sl])

        def run(i):
            s0, e0 = starts[i], min(starts[i] + tile, n)
            rows = np.arange(s0, e0)
            q_chunks = [x[s0:e0] for x in chunks]
            row_same = np.full(e0 - s0, np.inf, np.float32)
            row_other = np.full(e0 - s0, np.inf, np.float32)
            row_segs = segments(s0, e0)
            for s1 in starts[i:]:
                e1 = min(s1 + tile, n)
                if coef is not None:
                    a = np.matmul(q_aug[s0:e0], g_aug[s1:e1].T)
                else:
                    a = np.matmul(q_chunks[0], chunks[0][s1:e1].T)
                    for qc, gc in zip(q_chunks[1:], chunks[1:]):
                        a += np.matmul(qc, gc[s1:e1].T)
                    a *= np.float32(-2.0)                      # exact
                    a += norm32[None, s1:e1]
                    a += norm32[s0:e0, None]
                if s1 == s0:
                    a[np.arange(e0 - s0), np.arange(e0 - s0)] = np.inf   # the query itself
                for r0, r1, lo, hi in row_segs:             # same-class columns in this tile
                    same, other = mins(a[r0:r1], lo - (s1 - s0), hi - (s1 - s0), 1)
                    fold(row_same, slice(r0, r1), same)
                    fold(row_other, slice(r0, r1), other)
                if s1 != s0:
                    col_same = np.full(e1 - s1, np.inf, np.float32)
                    col_other = np.full(e1 - s1, np.inf, np.float32)
                    for c0, c1, lo, hi in segments(s1, e1):  # same-class rows of tile i
                        same, other = mins(a[:, c0:c1], lo + (s1 - s0), hi + (s1 - s0), 0)
                        fold(col_same, slice(c0, c1), same)
                        fold(col_other, slice(c0, c1), other)
                    with lock:
                        fold(m_same, slice(s1, e1), col_same)
                        fold(m_other, slice(s1, e1), col_other)
            with lock:
                fold(m_same, slice(s0, e0), row_same)
                fold(m_other, slice(s0, e0), row_other)
            return rows

        # Early row tiles pair with more column tiles: many tasks keep the threads even.
        if threads > 1:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(run, range(len(starts))))
        else:
            for i in range(len(starts)):
                run(i)
        # Back to dataset order; re-checked rows are recomputed against every column.
        ms, mo = np.empty(n), np.empty(n)
        ms[order], mo[order] = m_same, m_other
        everyone = np.arange(n)
        return self._decide_first(everyone, ms, mo,
                                  lambda u: (self._approx(u), everyone), max_recheck, coef)


class NeighbourSearch:
    """Exact ranked relevance of gallery neighbours, for the retrieval metrics.

    Args:
        gallery: (N, D) float (float32 expected) or uint8, the items searched.
        gallery_codes: (N,) int class codes of the gallery.
        query: (Q, D) like ``gallery``, or None: leave-one-out (the queries are the
            gallery's rows and a query is never its own neighbour).
        query_codes: (Q,) int class codes in the gallery's code space (None with ``query``).
        method: ``"auto"``, ``"fast"`` or ``"exact"`` (module docstring); results do not
            depend on it.
        block: queries per exact-path block, >= 1; results do not depend on it.

    Threads: the fast path runs tiles of <= 256 queries on a thread per core (at most 4;
    NumPy releases the GIL), memory O(threads * 256 * N) float32, capped at 32 MiB a tile.
    """

    def __init__(self, gallery, gallery_codes, query=None, query_codes=None, *,
                 method: str = "auto", block: int = 1024):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.gallery = gallery
        self.query = gallery if query is None else query
        self.gcodes = np.asarray(gallery_codes)
        self.qcodes = self.gcodes if query is None else np.asarray(query_codes)
        self.loo = query is None
        self.method = method
        self.block = int(block)
        self.n = gallery.shape[0]
        self._fast = None
        if method != "exact" and self.n and self.query.shape[0]:
            fast = _FastSearch(gallery, self.gcodes, None if self.loo else query, self.qcodes)
            self._fast = fast if fast.usable() else None
        self._exact = {}  # float64 copies, made on first use (near-collapse, method="exact")
        self._lock = threading.Lock()
        # auto: re-check at most 1/16 of a tile's pairs, beyond that the exact path is cheaper.
        self.max_recheck = 1.0 if method == "fast" else 1.0 / 16

    def _exact_keys(self, q_idx):
        with self._lock:
            if not self._exact:
                g64 = self.gallery.astype(np.float64)
                self._exact["g"] = g64
                self._exact["gn"] = np.einsum("ij,ij->i", g64, g64)
                if self.loo:
                    self._exact["q"], self._exact["qn"] = g64, self._exact["gn"]
                else:
                    q64 = self.query.astype(np.float64)
                    self._exact["q"], self._exact["qn"] = q64, np.einsum("ij,ij->i", q64, q64)
        x = self._exact
        return _block_keys(x["q"][q_idx], x["qn"][q_idx], x["g"], x["gn"])

    def _exact_relevance(self, q_idx, r):
        nn = top_k_lowest_index_ties(self._exact_keys(q_idx), int(r.max()),
                                     q_idx if self.loo else None)          # (Bq, max r)
        return self.gcodes[nn] == self.qcodes[q_idx][:, None]

    def _tiles(self, q_idx):
        if self._fast is None:
            step = self.block
        else:
            step = max(1, min(self.block, _QUERY_TILE, _TILE_VALUES // max(self.n, 1)))
        return [q_idx[i:i + step] for i in range(0, len(q_idx), step)]

    def _run(self, tiles, fn):
        # Tiles are independent, so results do not depend on the tiling or the threads.
        count = min(len(tiles), workers()) if self._fast is not None else 1
        if count > 1:
            with ThreadPoolExecutor(count) as pool:
                list(pool.map(fn, tiles))
        else:
            for tile in tiles:
                fn(tile)

    def ranked_relevance(self, q_idx: np.ndarray, r: np.ndarray,
                         on_tile: Callable[[np.ndarray, np.ndarray, np.ndarray], None]) -> None:
        """Feed ``on_tile(rows, r_rows, rel)`` the relevance of each query's neighbours.

        ``q_idx`` (Q,) int query rows, ``r`` (Q,) int >= 1 ranks needed per query (R_i).
        ``rows`` are positions into ``q_idx``; ``rel`` (B, K >= max r_rows) bool,
        ``rel[i, j]``: the (j+1)-th nearest gallery item of query ``q_idx[rows[i]]`` has
        its class, in exact order (columns past ``r_rows[i]`` are not meaningful).
        ``on_tile`` may run on several threads at once, for disjoint ``rows``.
        """
        r = np.asarray(r)
        pos = np.arange(len(q_idx))

        def run(rows):
            qi, rr = q_idx[rows], r[rows]
            rel = None
            if self._fast is not None:
                rel = self._fast.ranked_relevance(qi, rr, self.max_recheck)
            if rel is None:
                rel = self._exact_relevance(qi, rr)
            on_tile(rows, rr, rel)

        self._run(self._tiles(pos), run)

    def nearest_relevance(self, q_idx: np.ndarray) -> np.ndarray:
        """(Q,) bool: is each query's nearest gallery item (ties: lower index) of its class?

        The first column of :meth:`ranked_relevance`, from one GEMM and one pass of minima
        per tile instead of the R nearest (see :meth:`_FastSearch.nearest_relevance`);
        leaving one out with most rows as queries, from half the GEMM
        (:meth:`_FastSearch.nearest_relevance_all`).
        """
        q_idx = np.asarray(q_idx)
        if self._fast is not None and self.loo and 2 * len(q_idx) > self.n:
            # Most rows are queries: half the symmetric distance matrix serves them all.
            got = self._fast.nearest_relevance_all(self.max_recheck, workers())
            if got is not None:
                return got[q_idx]
        out = np.zeros(len(q_idx), bool)
        by_class = np.lexsort((q_idx, self.qcodes[q_idx]))    # tiles of few classes each

        def run(rows):
            qi = q_idx[rows]
            got = None
            if self._fast is not None:
                got = self._fast.nearest_relevance(qi, self.max_recheck)
            if got is None:
                got = self._exact_relevance(qi, np.ones(len(qi), np.int64))[:, 0]
            out[rows] = got

        self._run(self._tiles(by_class), run)
        return out


class ApproximateSearch:
    """Approximate k nearest gallery items by faiss ``IndexIVFFlat`` (squared L2, float32).

    For galleries beyond the exact engines' budget. The coarse quantiser has ``nlist``
    cells (default ``sqrt(N)``, capped so that each cell gets >= 39 training points, the
    minimum faiss accepts without a warning), trained by k-means on at most ``64 nlist``
    gallery rows drawn with ``seed``; a search visits ``nprobe`` cells. (faiss's own
    guideline, ``4 sqrt(N)`` cells, built 4x slower here -- 35 s for the 60,000 training
    embeddings of Fashion-MNIST -- for an index used once per evaluation.) Distances are
    float32 without the tie rule: order among near ties is arbitrary, so results may
    change with the faiss build and thread count. Measure its recall with
    :func:`approximate_recall`. Raises ImportError naming faiss-cpu when it is absent.
    """

    def __init__(self, gallery, *, nlist: int = 0, nprobe: int = 32, seed: int = 0):
        import faiss
        g = np.ascontiguousarray(check_matrix(gallery, "gallery"), dtype=np.float32)
        n, dim = g.shape
        if n == 0:
            raise ValueError("gallery is empty (N == 0)")
        nlist = int(nlist) or int(np.sqrt(n))
        nlist = max(1, min(nlist, n // 39))
        self.nlist, self.nprobe = nlist, int(max(1, min(nprobe, nlist)))
        quantizer = faiss.IndexFlatL2(dim)
        self.index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_L2)
        rng = np.random.RandomState(seed)
        train = g if n <= 64 * nlist else g[np.sort(rng.choice(n, 64 * nlist, replace=False))]
        self.index.cp.seed = int(seed)
        self.index.train(train)
        self.index.add(g)
        self.index.nprobe = self.nprobe
        self._quantizer = quantizer  # faiss does not own it from Python: keep it alive
        self.n = n

    def search(self, query, k: int, *, exclude: Optional[np.ndarray] = None,
               batch: int = 1024) -> np.ndarray:
        """(Q, k) int64 gallery indices, nearest first; -1 where fewer than k were found.

        ``exclude`` (Q,) int or None: a gallery index per query never returned (the query
        itself, leaving one out).
        """
        q = np.ascontiguousarray(check_matrix(query, "query"), dtype=np.float32)
        extra = 1 if exclude is not None else 0
        kk = min(self.n, k + extra)
        out = np.full((q.shape[0], k), -1, np.int64)
        for s in range(0, q.shape[0], batch):
            _, idx = self.index.search(q[s:s + batch], kk)
            if exclude is not None:
                keep = idx != np.asarray(exclude)[s:s + batch, None]
                # Drop the excluded index, else the last column: k per row remain.
                keep[np.flatnonzero(keep.all(axis=1)), -1] = False
                idx = idx[keep].reshape(len(idx), kk - 1)
            out[s:s + batch, :idx.shape[1]] = idx[:, :k]
        return out


def approximate_recall(query, gallery, k: int, *, leave_one_out: bool = False,
                       nlist: int = 0, nprobe: int = 32, seed: int = 0) -> dict:
    """Recall@k of :class:`ApproximateSearch` against the exact top k.

    recall@k = |approximate top k  intersect  exact top k| / k, averaged over queries
    (the usual ANN-benchmarks definition). The exact top k is :func:`exact_top_k` (tie
    rule: lower index); a tie at the k-th distance can make a correct answer count as a
    miss, so on data with many exact ties the value is a lower bound.

    Args:
        query: (Q, D) float; with ``leave_one_out`` the gallery itself (same array).
        gallery: (N, D) float.
        k: neighbours compared, 1 <= k < N.
        nlist, nprobe, seed: as :class:`ApproximateSearch`.

    Returns:
        dict with ``recall`` (float in [0, 1]), ``k``, ``queries``, ``nlist``, ``nprobe``,
        ``build_s`` and ``search_s`` (seconds).
    """
    t0 = time.perf_counter()
    index = ApproximateSearch(gallery, nlist=nlist, nprobe=nprobe, seed=seed)
    t1 = time.perf_counter()
    q = check_matrix(query, "query")
    got = index.search(q, k, exclude=np.arange(q.shape[0]) if leave_one_out else None)
    t2 = time.perf_counter()
    want = exact_top_k(q, gallery, k, leave_one_out=leave_one_out)
    hits = sum(len(np.intersect1d(a[a >= 0], b)) for a, b in zip(got, want))
    return {"recall": hits / (k * max(len(q), 1)), "k": int(k), "queries": int(len(q)),
            "nlist": index.nlist, "nprobe": index.nprobe, "build_s": t1 - t0,
            "search_s": t2 - t1}


def benchmark(embeddings=None, labels=None, *, repeats: int = 3, mxnet: bool = True) -> dict:
    """Seconds of the evaluation options on real data; for ``benchmarks/`` (no test times it).

    Defaults to a fixed 128-D embedding of the Fashion-MNIST test set: 10,000 rows of
    ``dist_triplet.data.load_dataset("fashion_mnist", train=False)`` through a randomly
    initialised (seed 0) default MLP ([256, 128], final ReLU), which has the trained
    embedding's sparsity pattern; pass ``embeddings`` (N, D) and ``labels`` (N,) to time
    others. Each timing is the best of ``repeats``. Keys (seconds unless noted):

    * ``embed_s``: the MLP forward pass over the test set (MXNet, batch 2048).
    * ``precision_at_1_s``: exact P@1 alone (:meth:`NeighbourSearch.nearest_relevance`).
    * ``retrieval_full_s``: exact P@1, R-Precision, MAP@R ("auto"); ``retrieval_exact_s``:
      the same by the float64 reference path.
    * ``triplet_accuracy_s``: the seed's accuracy on the 9,990 test triplets.
    * ``evaluate_epoch_s``: a per-epoch evaluation after embedding (P@1, triplet accuracy,
      collapse check: ``evaluate_embeddings(..., metrics=("precision_at_1",))``).
    * ``raw_precision_at_1_s``, ``raw_full_s``: the raw-pixel baseline (784-D bytes / 255).
    * ``gemm_numpy_s``, ``gemm_mxnet_s``: the (N, D) x (D, N) float32 GEMM alone, NumPy
      and MXNet ``FullyConnected`` (the latter only with ``mxnet``), the bulk of any
      exact search.
    * ``n``, ``dim``, ``threads`` (count), ``load_1min`` (the machine's load average).
    * ``cpu``: the same keys, in CPU seconds of this process (all threads) of the fastest
      repeat: comparable across runs when other jobs share the cores.
    """
    from .metrics import evaluate_embeddings, retrieval_metrics, triplet_accuracy  # (cycle)

    def cpu_s():
        return time.process_time()        # this process's CPU seconds, all threads

    def best(fn):
        times = []
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), cpu_s()
            fn()
            times.append((time.perf_counter() - t0, cpu_s() - c0))
        return min(times)

    def timed(key, fn):
        out[key], cpu_out[key] = best(fn)

    out = {}
    cpu_out = {}
    test = None
    if embeddings is None:
        import mxnet as mx

        from .data import load_dataset
        from .model import build_embedding_net, embed, initialize
        test = load_dataset("fashion_mnist", train=False)
        net = build_embedding_net(test.images.shape[1], [256, 128])
        initialize(net, 0.01, [mx.cpu()], 0)
        timed("embed_s", lambda: embed(net, test.images, mx.cpu(), 2048))
        embeddings, labels = embed(net, test.images, mx.cpu(), 2048), test.labels
    emb = check_matrix(embeddings)
    labels = np.asarray(labels)
    out.update(n=int(emb.shape[0]), dim=int(emb.shape[1]), threads=workers(),
               load_1min=os.getloadavg()[0])
    timed("precision_at_1_s", lambda: retrieval_metrics(emb, labels,
                                                        metrics=("precision_at_1",)))
    timed("retrieval_full_s", lambda: retrieval_metrics(emb, labels))
    timed("retrieval_exact_s", lambda: retrieval_metrics(emb, labels, method="exact"))
    from .triplets import create_pairs
    trip = create_pairs(labels, seed=0)
    timed("triplet_accuracy_s", lambda: triplet_accuracy(emb[trip[:, 0]], emb[trip[:, 1]],
                                                         emb[trip[:, 2]]))
    timed("evaluate_epoch_s", lambda: evaluate_embeddings(emb, labels, trip,
                                                          metrics=("precision_at_1",)))
    x32 = np.ascontiguousarray(emb, dtype=np.float32)
    timed("gemm_numpy_s", lambda: x32 @ x32.T)
    if mxnet:
        import mxnet as mx
        xm = mx.nd.array(x32)
        timed("gemm_mxnet_s", lambda: mx.nd.FullyConnected(
            xm, xm, no_bias=True, num_hidden=x32.shape[0]).wait_to_read())
    if test is not None:
        timed("raw_precision_at_1_s", lambda: retrieval_metrics(
            test.images, test.labels, metrics=("precision_at_1",)))
        timed("raw_full_s", lambda: retrieval_metrics(test.images, test.labels))
    out["cpu"] = cpu_out
    return out
