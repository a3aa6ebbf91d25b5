"""Evaluation metrics for embeddings: retrieval quality, triplet accuracy, collapse check.

Pure NumPy (no MXNet, no Horovod) so that it can be tested and run anywhere, on the
embeddings of the test set gathered on the main rank.

Retrieval metrics follow Musgrave, Belongie, Lim, "A Metric Learning Reality Check",
ECCV 2020, Sec. 3.2 -- the same quantities as pytorch-metric-learning's
``AccuracyCalculator`` with the query excluded from its own neighbours:

* Precision@1: 1 if the nearest other sample has the query's class, else 0.
* R-Precision: with ``R`` the number of *other* samples of the query's class, the share
  of same-class samples among the ``R`` nearest neighbours.
* MAP@R: ``(1/R) * sum_{k=1..R} P(k) * rel(k)``, where ``rel(k)`` is 1 if the k-th
  neighbour has the query's class and ``P(k)`` is the precision of the first k.

The seed article measured "triplet accuracy" as the share of test triplets whose
margin-0 triplet loss is 0. That number is 100% for a network that maps every input to
one point, which is why :func:`is_collapsed` and :func:`evaluate_embeddings` exist.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

__all__ = [
    "retrieval_metrics",
    "triplet_accuracy",
    "embedding_spread",
    "is_collapsed",
    "evaluate_embeddings",
]

# Squared distances below this fraction of ||q||^2 + ||x||^2 are set to exactly 0. The
# expansion ||q||^2 + ||x||^2 - 2 q.x in float64 has a rounding error of about
# D * 1.1e-16 times that sum, so smaller values cannot be told from 0; snapping them makes
# exact duplicates (a collapsed embedding) tie exactly, and the tie rule then decides.
_ZERO_RTOL = 1e-10

METHODS = ("auto", "fast", "exact")
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


def _workers() -> int:
    """Threads for the fast path: the cores this process may run on (at most 4)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


def _check_embeddings(embeddings, name: str = "embeddings") -> np.ndarray:
    emb = np.asarray(embeddings)
    if emb.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {emb.shape}")
    if not np.issubdtype(emb.dtype, np.number):
        raise ValueError(f"{name} must be numeric, got dtype {emb.dtype}")
    return emb


def _exact_sq_dist(dot, scale) -> np.ndarray:
    """The ranking key: ``scale - 2 dot`` in float64, snapped, rounded to float32.

    ``scale = ||q||^2 + ||x||^2``. Values at or below ``_ZERO_RTOL * scale`` (the
    expansion's rounding error; also the small negatives) become exactly 0, non-finite
    values +inf (ranked last; :func:`is_collapsed` reports them). Rounding to float32, the
    precision of the embeddings, makes duplicate points tie exactly instead of differing
    in float64 rounding noise.
    """
    d = scale - 2.0 * dot
    d[d <= _ZERO_RTOL * scale] = 0.0
    d[~np.isfinite(d)] = np.inf
    return d.astype(np.float32)


def _block_sq_dist(q: np.ndarray, q_norm: np.ndarray, x: np.ndarray,
                   x_norm: np.ndarray) -> np.ndarray:
    """Ranking keys of ``block`` queries against all rows: (Bq, N) float32 from float64
    inputs (see :func:`_exact_sq_dist`); the reference ("exact") path."""
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite rows: ranked last
        return _exact_sq_dist(q @ x.T, q_norm[:, None] + x_norm[None, :])


def _top_k_lowest_index_ties(d: np.ndarray, k: int, self_cols: np.ndarray) -> np.ndarray:
    """The k nearest columns of each row of ``d`` (B, N), ordered, ties by lower index.

    ``self_cols`` (B,) int: the column of each row's query, which is never returned.
    Returns (B, k) int64. Requires 1 <= k <= N - 1.

    ``argpartition`` alone picks an arbitrary subset of the columns tied with the k-th
    value, so the k-th value ``t`` is found first and the set is rebuilt exactly: all
    columns with ``d < t`` plus the lowest-index columns with ``d == t`` until k are taken.
    """
    b, n = d.shape
    rows = np.arange(b)
    d = d.copy()
    d[rows, self_cols] = np.inf  # the query is never its own neighbour
    not_self = np.ones((b, n), dtype=bool)
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


def _scores(rel: np.ndarray, r: np.ndarray) -> tuple:
    """Per-query P@1, R-Precision and MAP@R from ranked relevance.

    Args:
        rel: (B, K) bool, ``rel[i, k]``: the (k+1)-th nearest neighbour of query i has
            its class; K >= max(r).
        r: (B,) int >= 1, other samples of the query's class.

    Returns:
        Three (B,) float64 arrays. Cumulative sums (sequential), never ``sum`` (pairwise),
        so a row's value does not depend on K, hence not on the block size.
    """
    rows = np.arange(rel.shape[0])
    k = int(r.max())
    ranks = np.arange(1, k + 1)
    rel_r = rel[:, :k] & (ranks[None, :] <= r[:, None])  # only the first R_i ranks count
    hits = np.cumsum(rel_r, axis=1, dtype=np.int32)
    prec = hits / ranks
    prec *= rel_r
    ap = np.cumsum(prec, axis=1)
    return rel[:, 0].astype(np.float64), hits[rows, r - 1] / r, ap[rows, r - 1] / r


def _as_grid(emb: np.ndarray):
    """The bytes ``v`` (N, D) float32 if ``emb`` is 8-bit image data, else None.

    8-bit data are uint8 arrays, or float32 arrays equal to ``float32(v) / 255`` for
    integers v in [0, 255] (what :func:`dist_triplet.data.load_split` returns).
    """
    if emb.dtype == np.uint8:
        return emb.astype(np.float32)
    if emb.dtype != np.float32:
        return None
    v = np.rint(emb * np.float32(_GRID))
    if v.size and (v.min() < 0 or v.max() > _GRID):
        return None
    # float32 division is correctly rounded, as the division that made the data.
    if not np.array_equal(v / np.float32(_GRID), emb):
        return None
    return v


class _FastSearch:
    """Ranked relevance from float32 GEMM distances with a certified exact re-check.

    Approximate squared distances ``A`` come from float32 GEMM (BLAS). Each satisfies
    ``|A - key| <= E`` where ``key`` is the exact path's ranking key and ``E`` a rigorous
    bound. Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed., Sec. 3.1: a
    D-term dot product in precision u errs by at most gamma_D * sum_k |q_k x_k|,
    gamma_D = D u / (1 - D u), in any summation order, with or without FMA. Hence:

    * float data, centred on the mean (distances do not change; the bound shrinks with
      the norms, which keeps a clumped early-training embedding cheap):
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
    """

    def __init__(self, emb: np.ndarray):
        with np.errstate(invalid="ignore", over="ignore"):  # see usable()
            self._setup(emb)

    def _setup(self, emb: np.ndarray):
        n, dim = emb.shape
        self.n = n
        grid = _as_grid(emb)
        if grid is not None:
            m = max(1, -(-dim // _GRID_CHUNK))
            cuts = np.linspace(0, dim, m + 1).round().astype(int)
            c = grid - np.float32(128)                   # exact, in [-128, 127]
            self.chunks = [np.ascontiguousarray(c[:, a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
            norms = np.einsum("ij,ij->i", c, c, dtype=np.float64)         # exact integers
            # Norms in the bound: of c and of the bytes (the representation term).
            self.byte_norm = np.einsum("ij,ij->i", grid, grid, dtype=np.float64)
            self.e_norm = norms + self.byte_norm
            self.coef = (m + 6) * _U32
            self.triangle = False  # ||c||^2 + ||v||^2 varies little across images
            # One chunk: the dot products are exact and every later step adds integers
            # below 2**26, so A is within 4 of the exact ||v - w||^2 (byte units).
            self.grid_exact = m == 1
        else:
            # Centred: distances do not change, but the bound scales with the norms, so a
            # clumped embedding (early training: a small cap of the sphere) stays cheap.
            x64 = emb.astype(np.float64)
            x32 = np.ascontiguousarray(x64 - x64.mean(axis=0), dtype=np.float32)
            del x64
            self.chunks = [x32]
            norms = np.einsum("ij,ij->i", x32, x32, dtype=np.float64)
            self.e_norm = norms
            self.coef = dim * _U32 / (1.0 - dim * _U32) + 14 * _U32
            self.triangle = True
            self.grid_exact = False
        self.norm32 = norms.astype(np.float32)
        self.e_max = float(self.e_norm.max()) if n else 0.0
        # Columns whose values estimate each query's threshold (every stride-th one).
        self.sample = np.arange(0, n, max(1, n // _SAMPLE))
        # Wide rows: the sample is read from the tile's own distances (one strided pass);
        # narrow rows: a small GEMM of its own is cheaper than that pass.
        self.sample_from_tile = dim > 256
        self.sample_chunks = [np.ascontiguousarray(x[self.sample]) for x in self.chunks]
        # The exact re-check reads the caller's values: float32 and uint8 rows are
        # gathered as they are and multiplied in float64 (products exact), like the exact
        # path's float64 copy; other dtypes are cast once.
        self.exact_rows = emb if emb.dtype in (np.float32, np.uint8) else emb.astype(np.float64)
        self.exact_norms = np.einsum("ij,ij->i", self.exact_rows, self.exact_rows,
                                     dtype=np.float64)
        # The key itself strays from the true distance by its float64 expansion's rounding
        # and the snap to 0, both relative to the *uncentred* norms.
        self.key_coef = _ZERO_RTOL + (dim + 4) * 2.0 ** -53
        self.key_norm = self.byte_norm if grid is not None else self.exact_norms  # A's units
        self.key_max = float(self.key_norm.max()) if n else 0.0

    def usable(self) -> bool:
        """False if float32 cannot hold the data (overflow, NaN, inf): use the exact path."""
        return bool(np.isfinite(self.norm32).all() and np.isfinite(self.e_max)
                    and self.e_max * 16 < np.finfo(np.float32).max
                    and np.isfinite(self.exact_norms).all())

    def _approx(self, q_idx: np.ndarray, cols=None) -> np.ndarray:
        """(B, N) float32 ``A``: approximate squared distances, +inf at the query itself.

        With ``cols`` (must be ``self.sample``): (B, len(cols)) for the sampled columns,
        the query not set to +inf."""
        b = len(q_idx)
        a = np.empty((b, self.n if cols is None else len(cols)), np.float32)
        tmp = np.empty_like(a) if len(self.chunks) > 1 else None
        for i, x in enumerate(self.chunks):
            xc = x if cols is None else self.sample_chunks[i]
            np.matmul(x[q_idx], xc.T, out=tmp if i else a)
            if i:
                a += tmp
        a *= np.float32(-2.0)                      # exact
        a += self.norm32[None, :] if cols is None else self.norm32[None, cols]
        a += self.norm32[q_idx, None]
        if cols is None:
            a[np.arange(b), q_idx] = np.inf
        return a

    def ranked_relevance(self, q_idx: np.ndarray, r: np.ndarray, codes: np.ndarray,
                         max_recheck: float, exact_t: bool = False):
        """(B, K) bool relevance of each query's neighbours in exact rank order, or None.

        ``q_idx`` (B,) query rows, ``r`` (B,) their R_i >= 1, ``codes`` (N,) class codes.
        None when more than ``max_recheck`` of the B * N pairs would need the exact
        re-check (near-collapsed embeddings): the caller then runs the exact path.
        ``exact_t``: take the exact R_i-th value as threshold instead of a sample's.
        """
        n, b = self.n, len(q_idx)
        rows_b = np.arange(b)
        a = self._approx(q_idx)
        e_key = self.key_coef * (self.key_norm[q_idx] + self.key_max)  # snap, float64
        e_max = self.coef * (self.e_norm[q_idx] + self.e_max) + e_key  # (B,) float64

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
            nq = self.byte_norm[q_idx]
            w_max = 2.0 * (nq + float(self.byte_norm.max()))
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
        rel = codes[cols] == np.repeat(codes[q_idx], counts)
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
            redo = self.ranked_relevance(q_idx[short], r[short], codes, max_recheck, True)
            if redo is None:
                return None
        else:
            redo = None

        # --- links: neighbours whose true order is uncertain; mixed ones matter
        if self.grid_exact:
            e_row = e_max  # keys of kept columns are <= tau + e_max <= w above
        else:
            # A kept column x has ||x|| <= ||q|| + sqrt(key), key <= tau + E.
            qn = self.e_norm[q_idx]
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
                self._rerank(rel_s, s, q_idx, codes, counts, cols, enc, tau32, c_row, c_lo,
                             size)
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
        nq = self.byte_norm[q_idx]
        nmax = float(self.byte_norm.max())
        e = (2 * _U32 * np.sqrt(w) * (np.sqrt(nq) + np.sqrt(nmax)) + 2 * _U32 * w
             + 2 * self.key_coef * (nq + nmax))
        return e * (1 + 2.0 ** -10) + 4 * _U32 ** 2 * (nq + nmax)

    def _rerank(self, rel_s, s, q_idx, codes, counts, cols, enc, tau32, c_row, c_lo, size):
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
        xr = self.exact_rows
        dot = np.einsum("ij,ij->i", xr[qg], xr[m_col], dtype=np.float64)
        exact = _exact_sq_dist(dot, self.exact_norms[qg] + self.exact_norms[m_col])
        order = np.lexsort((m_col, exact, cl))
        within = np.arange(size.sum()) - np.repeat(np.cumsum(size) - size, size)
        pos = np.repeat(c_lo, size) + within           # each cluster's positions
        rel_s[np.repeat(c_row, size), pos] = (codes[m_col] == codes[qg])[order]


def retrieval_metrics(embeddings, labels, *, block: int = 1024, method: str = "auto") -> dict:
    """Precision@1, R-Precision and MAP@R of leave-one-out retrieval by squared L2.

    Definitions: Musgrave, Belongie, Lim, "A Metric Learning Reality Check", ECCV 2020,
    Sec. 3.2 (pytorch-metric-learning ``AccuracyCalculator``, query excluded). Every
    sample is a query against all *other* samples. For query i, ``R_i`` is the number of
    other samples with its label; neighbours are ranked by squared Euclidean distance,
    ascending, and **ties are broken by lower dataset index first**, so the result is
    deterministic (it matters for a collapsed embedding, where every distance ties).
    The ranking key is ``||q||^2 + ||x||^2 - 2 q.x`` computed in float64, clipped at 0,
    values below ``1e-10 * (||q||^2 + ||x||^2)`` (the expansion's rounding error) set to
    exactly 0, then rounded to float32 so that duplicate points tie exactly.

    The search is exact and blocked (``block`` queries against all N samples at a time).
    ``method``:

    * ``"exact"``: the reference -- float64 GEMM for every key, then the top ``max R_i``
      by ``partition`` with the tie rule rebuilt exactly, then a stable sort. Memory
      O(block * N).
    * ``"fast"``: float32 GEMM (BLAS) with a rigorous error bound, in tiles of <= 256
      queries on one thread per core (at most 4; memory O(threads * 256 * N)). Only
      neighbours whose order the bound cannot certify *and* whose swap could change a
      metric (a relevant and an irrelevant one, reaching the first R_i ranks) get the
      exact key and the tie rule (see :class:`_FastSearch`). The results are the exact
      path's: the re-checked keys are computed by the same float64 formula (per pair
      rather than by GEMM, so a key within one float64 rounding of a float32 rounding
      boundary could round the other way; never seen on Fashion-MNIST or in the
      randomized tests). 8-bit images (raw pixels) take an exact-integer GEMM, so they
      re-check almost nothing. On Fashion-MNIST's 10k test points, 2 shared cores:
      ~1 s for 128-D embeddings and ~2 s for raw pixels, against 6 s and 11 s exact.
    * ``"auto"`` (default): ``"fast"``, but a tile whose re-check would be large (a
      collapsed or near-collapsed embedding, where everything ties) runs ``"exact"``;
      all of it does for data float32 cannot hold (NaN, inf, overflow).

    Exact blocked NumPy rather than faiss (faiss-cpu 1.7.4 would install here): at ~10k
    test points an exhaustive search is one GEMM of 10k x 10k and takes well under a
    second, so an index buys no speed; faiss ranks by float32 distances, which cannot
    honour the tie rule (it returns an arbitrary member of a tie and orders near-ties by
    rounding noise), so its P@1/MAP@R would change with the build and the thread count;
    and it is one more native dependency to pin against numpy<1.24 on every machine that
    evaluates.

    Args:
        embeddings: (N, D) float (float32 expected) or uint8; units of the embedding.
        labels: (N,) int class labels.
        block: queries per block, >= 1; results do not depend on it.
        method: ``"auto"``, ``"fast"`` or ``"exact"``; results do not depend on it.

    Returns:
        dict with ``precision_at_1``, ``r_precision``, ``map_at_r`` (float in [0, 1],
        means over the counted queries; NaN when no query is counted), ``queries`` (int,
        queries counted) and ``excluded_queries`` (int, queries with ``R_i == 0``, i.e.
        the only sample of their class: they have no correct answer and are left out of
        every denominator).

    Non-finite embeddings give +inf distances, ranked last; check :func:`is_collapsed`.

    Raises:
        ValueError: if ``embeddings`` is not 2-D, ``labels`` is not (N,), ``block < 1``
            or ``method`` is unknown.
    """
    emb = _check_embeddings(embeddings)
    lab = np.asarray(labels)
    n = emb.shape[0]
    if lab.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {lab.shape}")
    if int(block) < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    block = int(block)

    _, codes, counts = np.unique(lab, return_inverse=True, return_counts=True)
    codes = codes.reshape(-1)
    r_all = counts[codes] - 1 if n else np.zeros(0, np.int64)  # (N,) other samples of the class
    queries = np.flatnonzero(r_all > 0)  # singleton classes have no correct answer

    # Per-query scores, averaged once at the end, so the result does not depend on block.
    p1, rp, mapr = np.zeros(n), np.zeros(n), np.zeros(n)
    fast = None
    if method != "exact" and queries.size:
        fast = _FastSearch(emb)
        if not fast.usable():
            fast = None
    exact = {}  # the float64 copy, made on first use (near-collapse, or method="exact")
    exact_lock = threading.Lock()

    def exact_relevance(q_idx, r):
        with exact_lock:
            if not exact:
                exact["x"] = emb.astype(np.float64)
                exact["n"] = np.einsum("ij,ij->i", exact["x"], exact["x"])
        x64, xn64 = exact["x"], exact["n"]
        d = _block_sq_dist(x64[q_idx], xn64[q_idx], x64, xn64)
        nn = _top_k_lowest_index_ties(d, int(r.max()), q_idx)  # (Bq, max R)
        return codes[nn] == codes[q_idx][:, None]

    # auto: re-check at most 1/16 of a block's pairs, beyond that the exact path is cheaper.
    max_recheck = 1.0 if method == "fast" else 1.0 / 16

    def run(q_idx):
        r = r_all[q_idx]
        rel = fast.ranked_relevance(q_idx, r, codes, max_recheck) if fast is not None else None
        if rel is None:
            rel = exact_relevance(q_idx, r)
        p1[q_idx], rp[q_idx], mapr[q_idx] = _scores(rel, r)

    # The fast path works in tiles of <= _QUERY_TILE queries (cache) on a thread per core
    # (NumPy releases the GIL in its loops); tiles are independent, so results are too.
    step = min(block, _QUERY_TILE) if fast is not None else block
    tiles = [queries[i:i + step] for i in range(0, queries.size, step)]
    workers = min(len(tiles), _workers()) if fast is not None else 1
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(run, tiles))
    else:
        for q_idx in tiles:
            run(q_idx)

    counted = int(queries.size)

    def mean(scores):
        return float(scores[queries].mean()) if counted else float("nan")

    return {
        "precision_at_1": mean(p1),
        "r_precision": mean(rp),
        "map_at_r": mean(mapr),
        "queries": counted,
        "excluded_queries": int(n - counted),
    }


def triplet_accuracy(anchor, positive, negative) -> dict:
    """Share of triplets whose anchor is nearer to its positive than to its negative.

    With squared Euclidean distances summed over features, as ``gluon.loss.TripletLoss``
    (MXNet 1.9 docs: ``loss = max(0, ||a - p||^2 - ||a - n||^2 + margin)``):

    * ``seed_accuracy``: share with ``||a-p||^2 - ||a-n||^2 <= 0``, i.e. whose margin-0
      TripletLoss is exactly 0 -- the seed article's "triplet accuracy". Ties count as
      correct, so a collapsed embedding (all distances 0) scores 1.0.
    * ``strict_accuracy``: share with ``||a-p|| < ||a-n||``; ties count as wrong.

    Distances are computed in float64.

    Args:
        anchor, positive, negative: (M, D) float embeddings of the same shape.

    Returns:
        dict with ``seed_accuracy``, ``strict_accuracy`` (float in [0, 1]; NaN if M == 0),
        ``correct``, ``strict_correct`` and ``total`` (int counts).

    Raises:
        ValueError: if the arrays are not 2-D or their shapes differ.
    """
    a = _check_embeddings(anchor, "anchor").astype(np.float64)
    p = _check_embeddings(positive, "positive").astype(np.float64)
    n = _check_embeddings(negative, "negative").astype(np.float64)
    if not a.shape == p.shape == n.shape:
        raise ValueError(f"anchor, positive, negative shapes differ: {a.shape}, {p.shape}, {n.shape}")
    d_ap = np.square(a - p).sum(axis=1)
    d_an = np.square(a - n).sum(axis=1)
    total = int(a.shape[0])
    correct = int((d_ap - d_an <= 0).sum())
    strict = int((d_ap < d_an).sum())
    return {
        "seed_accuracy": correct / total if total else float("nan"),
        "strict_accuracy": strict / total if total else float("nan"),
        "correct": correct,
        "strict_correct": strict,
        "total": total,
    }


def embedding_spread(embeddings) -> float:
    """Root-mean-square distance of the embeddings from their mean.

    ``sqrt(mean_i ||e_i - mean(e)||^2)``, in units of the embedding; computed in float64.
    0 for a collapsed network (every input mapped to one point); NaN or inf if any value
    is non-finite.

    Args:
        embeddings: (N, D) float, N >= 1.

    Raises:
        ValueError: if ``embeddings`` is not 2-D or N == 0.
    """
    e = _check_embeddings(embeddings).astype(np.float64)
    if e.shape[0] == 0:
        raise ValueError("embeddings is empty (N == 0)")
    centred = e - e.mean(axis=0, keepdims=True)
    return float(np.sqrt(np.square(centred).sum(axis=1).mean()))


def is_collapsed(embeddings, eps: float = 1e-6) -> bool:
    """True if the embeddings have collapsed to (about) one point or are not finite.

    A collapsed network maps every input to the same point: every squared distance is 0,
    every margin-0 triplet loss is 0 and the seed metric reports 100% accuracy for a
    useless model. This check lets callers flag such numbers instead of celebrating them.

    Args:
        embeddings: (N, D) float, N >= 1.
        eps: spread threshold, units of the embedding (see :func:`embedding_spread`);
            1e-6 is far below the spread of any trained embedding and far above float32
            rounding noise for unit-scale embeddings.

    Returns:
        ``embedding_spread(embeddings) <= eps`` or any value non-finite.

    Raises:
        ValueError: as :func:`embedding_spread`.
    """
    e = _check_embeddings(embeddings)
    if not np.all(np.isfinite(e)):
        return True
    return embedding_spread(e) <= eps


# Share of test triplets with d(a,p) == d(a,n) exactly above which the embedding counts as
# collapsed even though its spread is not ~0. Measured here: a batch-hard run whose ReLU
# units died mapped most images to the same few points; spread 0.0054, yet 98% of test
# triplets tied (seed accuracy 0.989, strict 0.011, P@1 0.106 = chance). A trained
# embedding ties almost never (seed recipe: 0 of 9,990).
TIE_COLLAPSE_SHARE = 0.5


def evaluate_embeddings(embeddings, labels, triplets, *, collapse_eps: float = 1e-6,
                        block: int = 1024) -> dict:
    """All evaluation numbers for one set of embeddings, in one flat dict.

    Args:
        embeddings: (N, D) float32, units of the embedding.
        labels: (N,) int class labels.
        triplets: (M, 3) int row indices (anchor, positive, negative) into ``embeddings``,
            as produced by the triplet sampler.
        collapse_eps: spread threshold of :func:`is_collapsed`.
        block: query block size of :func:`retrieval_metrics`.

    Returns:
        The keys of :func:`retrieval_metrics` and :func:`triplet_accuracy`, plus
        ``spread`` (float, :func:`embedding_spread`), ``tie_share`` (float, share of
        triplets with d(a,p) == d(a,n), i.e. seed minus strict accuracy), ``collapsed``
        (bool: :func:`is_collapsed`, or ``tie_share >= TIE_COLLAPSE_SHARE`` -- a partial
        collapse where many inputs share one point) and ``valid`` (bool, ``not collapsed``). When ``collapsed``
        is True the retrieval and accuracy values are still computed (with the tie rule
        they are well defined) but describe ties, not retrieval: the seed accuracy of a
        network that maps everything to one point is 1.0. Callers must not report them as
        a success; ``train`` marks the log line and metrics.json (``valid: false``).

    Raises:
        ValueError: on bad shapes, or triplet indices outside ``[0, N)``.
    """
    emb = _check_embeddings(embeddings)
    trip = np.asarray(triplets)
    if trip.ndim != 2 or trip.shape[1] != 3:
        raise ValueError(f"triplets must have shape (M, 3), got {trip.shape}")
    if not np.issubdtype(trip.dtype, np.integer):
        raise ValueError(f"triplets must be integer indices, got dtype {trip.dtype}")
    if trip.size and (trip.min() < 0 or trip.max() >= emb.shape[0]):
        raise ValueError(f"triplet indices must lie in [0, {emb.shape[0]})")
    out = retrieval_metrics(emb, labels, block=block)
    out.update(triplet_accuracy(emb[trip[:, 0]], emb[trip[:, 1]], emb[trip[:, 2]]))
    out["spread"] = embedding_spread(emb)
    total = max(out["total"], 1)
    out["tie_share"] = (out["correct"] - out["strict_correct"]) / total
    out["collapsed"] = bool(is_collapsed(emb, eps=collapse_eps)
                            or out["tie_share"] >= TIE_COLLAPSE_SHARE)
    out["valid"] = not out["collapsed"]
    return out
