"""The one neighbour engine: the k nearest gallery items by squared L2, ties to the lower index
(docs/search.md, "Ranking, ties and the run's Precision@1"). faiss ``hnsw`` / ``ivf``
(:func:`build_faiss`) propose candidates, as pytorch-metric-learning's ``FaissKNN``.

The ranking key of a query q and a gallery item x (both taken as float32) is
``key = sum_d (q_d - x_d)^2`` in float64, set to exactly 0 when it is at most
``SNAP (||q||^2 + ||x||^2)``: below what a float expansion can tell from 0, so the rows of
a collapsed network, equal up to a few ulps, tie. Equal keys go to the lower gallery index.
"""
from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Tuple

import numpy as np

__all__ = ["KINDS", "SNAP", "MAX_SQ_NORM", "knn", "build_faiss", "recall_at_k", "check_matrix"]

KINDS = ("flat", "hnsw", "ivf")
SNAP = 1e-10           # keys at or below SNAP (||q||^2 + ||x||^2) are 0 (module docstring)
_U64 = 2.0 ** -53
_WIDE = 128            # k above it: float64 keys (knn's docstring)
# Squared norms whose float32 keys |q|^2 + |x|^2 - 2 q.x could overflow (also float64 keys).
MAX_SQ_NORM = float(np.finfo(np.float32).max) / 8
_BLOCK = 1 << 22       # values per block of the NumPy pass and of the re-ranking gathers


def check_matrix(values, name: str) -> np.ndarray:
    """``values`` as a finite 2-D float32 array; ValueError naming ``name`` otherwise."""
    arr = np.asarray(values)
    if arr.ndim != 2 or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise ValueError(f"{name} must be a 2-D numeric array (N, D), got shape {arr.shape} "
                         f"dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if bad := int(np.count_nonzero(~np.isfinite(arr))):
        raise ValueError(f"{name} hold {bad} non-finite values (NaN or infinite)")
    return arr


def _pair_keys(q, g, q_sq, g_sq, qi: np.ndarray, gi: np.ndarray) -> np.ndarray:
    """(M,) float64 keys of the pairs (q[qi], g[gi]); q_sq, g_sq: float64 squared norms."""
    out = np.empty(len(qi))
    step = max(1, _BLOCK // q.shape[1])
    for s in range(0, len(qi), step):
        a, b = qi[s:s + step], gi[s:s + step]
        diff = q[a].astype(np.float64) - g[b]
        d = np.einsum("ij,ij->i", diff, diff)
        d[d <= SNAP * (q_sq[a] + g_sq[b])] = 0.0
        out[s:s + step] = d
    return out


def _top_k_ties(keys: np.ndarray, k: int) -> np.ndarray:
    """The k smallest columns of each row of ``keys`` (B, N), ordered by (key, column):
    every column below the k-th value t, then the lowest columns equal to t (argpartition
    alone would pick any of them). Requires k finite values per row."""
    t = np.partition(keys, k - 1, axis=1)[:, k - 1:k]
    below, equal = keys < t, keys == t
    need = k - below.sum(axis=1, keepdims=True)
    cols = np.nonzero(below | (equal & (np.cumsum(equal, axis=1) <= need)))[1].reshape(-1, k)
    order = np.argsort(np.take_along_axis(keys, cols, axis=1), axis=1, kind="stable")
    return np.take_along_axis(cols, order, axis=1)


def _exact_rows(q: np.ndarray, g: np.ndarray, g_sq: np.ndarray, k: int,
                exclude: np.ndarray) -> np.ndarray:
    """Exact top k of queries ``q`` (B, D) over the whole gallery, by NumPy (see knn)."""
    out = np.empty((len(q), k), np.int64)
    g64 = g.astype(np.float64)
    step = max(1, _BLOCK // max(len(g), 1))
    for s in range(0, len(q), step):
        qb = q[s:s + step].astype(np.float64)
        q_sq = _sq(qb)
        scale = q_sq[:, None] + g_sq[None, :]
        approx = scale - 2.0 * (qb @ g64.T)
        err = 2 * (g.shape[1] + 8) * _U64 * scale
        zero = approx + err <= SNAP * (1 - 1e-9) * scale          # key certainly 0
        lo, hi = np.where(zero, 0.0, [approx - err, approx + err])
        rows, ex = np.flatnonzero(exclude[s:s + step] >= 0), exclude[s:s + step]
        lo[rows, ex[rows]] = hi[rows, ex[rows]] = np.inf
        cand = lo <= np.partition(hi, k - 1, axis=1)[:, k - 1:k]  # may reach the top k
        keys = np.where(zero & cand, 0.0, np.inf)
        r, c = np.nonzero(cand & ~zero)
        keys[r, c] = _pair_keys(q[s:s + step], g, q_sq, g_sq, r, c)
        out[s:s + step] = _top_k_ties(keys, k)
    return out


def knn(query, gallery, k: int, *, exclude: Optional[np.ndarray] = None, index=None,
        distances: bool = True, progress: Optional[str] = None
        ) -> Tuple[Optional[np.ndarray], np.ndarray]:
    """The k nearest gallery items of each query: squared L2, ties to the lower index.

    Exact (``index`` None or flat): q and x centred on the gallery's mean (same keys,
    smaller norms), one float32 GEMM per tile of ``[-2q, ||q||^2, 1] . [x, 1, ||x||^2]``
    (float64 for k > 128, where float32's bound links 910 of a raw-pixel query's 999, or
    norms beyond ``MAX_SQ_NORM``) gives each key within ``tol = 2 (D + 8) u (||q||^2 + max
    ||x||^2) + SNAP (...)``, u = 2^-24 (2^-53) (a (D + 2)-term dot product errs by at most
    gamma_{D+2} sum |terms|, Higham, "Accuracy and Stability of Numerical Algorithms",
    2nd ed., 3.1; the spare u's cover the centring's rounding). k = 1: the row minimum
    stands when the runner-up is more than 2 tol above it (symmetric upper half only,
    when the queries are the gallery left out one by one). Else the candidates are the
    items within 2 tol of the k-th smallest; sorted, where two neighbours differ by more
    than 2 tol the order across the gap is certain, so only runs linked by gaps <= 2 tol
    get exact keys, sorted by (key, index). A query with more than 4 k + 64 candidates
    (near-collapse, many ties) goes to a float64 GEMM, within 2 (D + 8) 2^-53 (...):
    pairs it puts below the snap are 0, the others that may reach the top k get exact
    keys. An approximate ``index`` has its candidates re-ranked alike (tol from the
    uncentred norms) but may miss items. Query blocks run on up to 4 threads.

    Args:
        query: (Q, D) float (taken as float32, as faiss takes it), finite.
        gallery: (N, D) like ``query``; the rows ``index`` holds, in its order.
        k: neighbours per query, 1 <= k <= N (N - 1 when anything is excluded).
        exclude: (Q,) int, a gallery index each query never gets (-1: none); leave-one-out
            over a set passes ``np.arange(Q)`` with ``query`` the gallery.
        index: a faiss index over ``gallery`` (:func:`build_faiss`), or None (exact).
        distances: also return the keys.
        progress: a tqdm bar with this title over the search (on a terminal).

    Returns:
        (sq_distances (Q, k) float64 keys or None, indices (Q, k) int64), nearest first;
        index -1 and distance inf where an approximate index found fewer than k.

    Raises:
        ValueError: shapes or widths do not fit (``exclude``, ``index`` included),
            non-finite values, k out of range.
    """
    import faiss
    from tqdm import tqdm

    q, g = check_matrix(query, "query"), check_matrix(gallery, "gallery")
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"query rows have {q.shape[1]} columns, gallery rows {g.shape[1]}")
    ex = np.full(len(q), -1, np.int64) if exclude is None else np.asarray(exclude, np.int64)
    n, room = len(g), len(g) - int((ex >= 0).any())
    if ex.shape != (len(q),) or ((ex < -1) | (ex >= n)).any():
        raise ValueError(f"exclude must be ({len(q)},) indices in [-1, {n}), got shape "
                         f"{ex.shape}, values {ex.min(initial=0)}..{ex.max(initial=0)}")
    if index is not None and index.ntotal != n:
        raise ValueError(f"the index holds {index.ntotal} items, the gallery {n} rows")
    if not 1 <= k <= room:
        raise ValueError(f"k={k} but the gallery has {n} items"
                         f"{' (one left out per query)' if room < n else ''}: use 1 <= k <= {room}")
    exact = index is None or isinstance(index, faiss.IndexFlat)
    g_sq, q_sq = _sq(g), _sq(q)
    snap = SNAP * (q_sq + g_sq.max())
    if exact:
        centre = g.mean(axis=0, dtype=np.float64)
        qc, gc = q - centre, g - centre
        big = _sq(qc).max(initial=0) + _sq(gc).max() > MAX_SQ_NORM    # float32 keys overflow
        t = np.float64 if k > _WIDE or big else np.float32
        qc, gc = qc.astype(t, copy=False), gc.astype(t, copy=False)
        qc_sq, gc_sq = _sq(qc), _sq(gc)
        qa = np.hstack([qc * t(-2), qc_sq[:, None].astype(t), np.ones((len(q), 1), t)])
        gb = np.hstack([gc, np.ones((n, 1), t), gc_sq[:, None].astype(t)])
    elif q_sq.max(initial=0) + g_sq.max() > MAX_SQ_NORM:
        raise ValueError(f"squared norms up to {g_sq.max():.3g} overflow the approximate "
                         "index's float32 distances: search exactly (flat)")
    else:
        t, qc_sq, gc_sq = np.float32, q_sq, g_sq
    tol = (q.shape[1] + 8) * np.finfo(t).eps * (qc_sq + gc_sq.max()) + snap   # eps = 2 u
    out = np.full((len(q), k), -1, np.int64)
    todo, redo = np.arange(len(q)), []
    m = min(n, k + max(8, k // 4) + int(exclude is not None))   # approximate: candidates
    step = max(1, min(4096, _BLOCK // (n if exact else m)))
    with tqdm(total=len(q), desc=progress, unit="query", leave=False,
              disable=progress is None or not sys.stderr.isatty()) as bar:
        if exact and k == 1:
            mirror = len(q) == n and np.array_equal(ex, todo) and np.array_equal(q, g)
            best, out[:, 0], runner_up = _nearest(qa, gb, ex, mirror, bar.update)
            todo = np.flatnonzero(runner_up <= _up32(best + 2 * tol))

        def block(rows):
            if exact:
                f, cand, ok = _candidates(qa[rows], gb, k, ex[rows], tol[rows])
            else:
                f, cand = index.search(q[rows], m)
                f = f.astype(np.float64)
                f[(cand < 0) | (cand == ex[rows, None])] = np.inf   # missing or excluded: last
                ok = np.ones(len(rows), bool)
            out[rows] = _rerank(q[rows], g, q_sq[rows], g_sq, f, cand, k, tol[rows])
            return rows[~ok]

        blocks = [todo[s:s + step] for s in range(0, len(todo), step)]
        with ThreadPoolExecutor(max(1, min(len(blocks), os.cpu_count() or 1, 4))) as pool:
            for rows, left in zip(blocks, pool.map(block, blocks)):
                redo.append(left)
                bar.update(0 if exact and k == 1 else len(rows))
    if (redo := np.concatenate([np.zeros(0, np.int64)] + redo)).size:
        out[redo] = _exact_rows(q[redo], g, g_sq, k, ex[redo])
    if not distances:
        return None, out
    dist = np.full((len(q), k), np.inf)
    r, c = np.nonzero(out >= 0)
    dist[r, c] = _pair_keys(q, g, q_sq, g_sq, r, out[r, c])
    return dist, out


def _sq(x: np.ndarray) -> np.ndarray:
    """(N,) float64 squared norms of the rows of ``x``."""
    x = x.astype(np.float64, copy=False)
    return np.einsum("ij,ij->i", x, x)


def _up32(x: np.ndarray) -> np.ndarray:
    """float64 ``x`` rounded up to float32 (inf beyond its range: every key within)."""
    with np.errstate(over="ignore"):
        y = x.astype(np.float32)
    return np.where(y < x, np.nextafter(y, np.float32(np.inf)), y)


def _nearest(qa, gb, ex, mirror: bool, update, tile: int = 768):
    """Each query's smallest key f = qa @ gb.T (knn), tile by tile, in qa's dtype: (best
    (Q,), its column (Q,) int64, the runner-up (Q,): the smallest of the others). With
    ``mirror`` (qa, gb from one set, ex = arange) f is symmetric: only the tiles on and
    above the diagonal are computed, each also folded into its columns'."""
    (best, runner_up), first = np.full((2, len(qa)), np.inf, qa.dtype), np.zeros_like(ex)
    for i in range(0, len(qa), tile):
        rows = slice(i, i + tile)
        for j in range(i if mirror else 0, len(gb), tile):
            f = qa[rows] @ gb[j:j + tile].T                  # (tile, tile) float32
            hit = np.flatnonzero((ex[rows] >= j) & (ex[rows] < j + f.shape[1]))
            f[hit, ex[rows][hit] - j] = np.inf
            _fold(f, 1, best[rows], first[rows], runner_up[rows], j)
            if mirror and j > i:
                _fold(f, 0, best[j:j + tile], first[j:j + tile], runner_up[j:j + tile], i)
        update(len(best[rows]))
    return best, first, runner_up


def _fold(f, axis: int, best, first, runner_up, offset: int) -> None:
    """Fold a block f (B, C) of keys of rows (columns) offset.. into its columns' (axis 0)
    or rows' (axis 1) running minimum ``best``, its index ``first`` and ``runner_up``
    (views, updated in place); a tied minimum takes any of its places (runner-up = it)."""
    line = np.arange(f.shape[1 - axis])
    c = f.argmin(axis=1) if axis else np.empty_like(line)
    if not axis:                            # argmin down the columns is 3x slower than this
        at = np.flatnonzero(f == f.min(axis=0))
        c[at % len(line)] = at // len(line)
    at = (line, c) if axis else (c, line)
    v = f[at]
    f[at] = np.inf
    np.minimum(runner_up, np.minimum(f.min(axis=axis), np.maximum(best, v)), out=runner_up)
    f[at] = v
    better = v < best
    first[better], best[better] = c[better] + offset, v[better]


def _candidates(qa, gb, k, ex, tol):
    """Exact search's candidates (knn) of queries ``qa`` (B, D + 2) in ``gb`` (N, D + 2):
    (f (B, W) float64 and items (B, W), padded with inf / -1; ok (B,) bool, False where
    more than 4 k + 64 items are within 2 tol of the k-th smallest f)."""
    f = qa @ gb.T                                   # (B, N) float32 (float64: knn)
    rows = np.flatnonzero(ex >= 0)
    f[rows, ex[rows]] = np.inf
    limit = _up32(np.partition(f, k - 1, axis=1)[:, k - 1] + 2 * tol)
    within = f <= limit[:, None]
    count = np.count_nonzero(within, axis=1)
    ok = count <= 4 * k + 64
    within &= ok[:, None]
    count[~ok] = 0
    r, c = np.divmod(np.flatnonzero(within), f.shape[1])    # 2-D nonzero: 17x slower
    pos = np.arange(len(r)) - np.repeat(np.cumsum(count) - count, count)
    width = (len(f), max(1, int(count.max())))
    fc, cand = np.full(width, np.inf), np.full(width, -1, np.int64)
    fc[r, pos], cand[r, pos] = f[r, c], c
    return fc, cand, ok


def _rerank(q, g, q_sq, g_sq, f, cand, k, tol) -> np.ndarray:
    """The top k (B, k) of one block of candidates (f (B, M) float64 keys within ``tol``,
    inf for none; items (B, M)), exactly (knn's docstring); -1 past the candidates."""
    order = np.argsort(f, axis=1, kind="stable")
    f, cand = np.take_along_axis(f, order, 1), np.take_along_axis(cand, order, 1)
    with np.errstate(invalid="ignore"):
        linked = f[:, 1:] - f[:, :-1] <= 2 * tol[:, None]        # inf - inf: not linked
    pad = np.pad(linked, ((0, 0), (1, 1)))           # pad[:, p]: p linked to p - 1
    run, top = np.cumsum(~pad[:, :-1], axis=1), min(k, f.shape[1])
    shared = (pad[:, :-1] | pad[:, 1:]) & (run <= run[:, top - 1:top])   # runs >= 2 in top k
    r, c = np.nonzero(shared)                         # row-major: each run's places in order
    items = cand[r, c]
    keys = _pair_keys(q, g, q_sq, g_sq, r, items)
    cand[r, c] = items[np.lexsort((items, keys, run[r, c], r))]     # each run by (key, index)
    out = np.full((len(f), k), -1, np.int64)
    out[:, :top] = np.where(np.isfinite(f[:, :top]), cand[:, :top], -1)
    return out


def build_faiss(x, kind: str = "flat", *, hnsw_m: int = 32, ef_search: int = 64,
                nprobe: int = 16, seed: int = 0) -> tuple:
    """(faiss index over ``x`` (N, D) float32 by squared L2, params dict), as the faiss
    wiki's "Guidelines to choose an index": ``flat`` = ``IndexFlatL2``; ``hnsw`` =
    ``IndexHNSWFlat(D, hnsw_m)``, ``efSearch = ef_search``; ``ivf`` = ``IndexIVFFlat``,
    nlist = 4 sqrt(N) capped at N / 39 (faiss wants >= 39 points a list), k-means seeded
    by ``seed`` on at most 64 nlist rows, ``nprobe`` (<= nlist) lists visited."""
    import faiss
    x = check_matrix(x, "gallery")
    n, d = x.shape
    if kind == "flat":
        index, params = faiss.IndexFlatL2(d), {}
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, hnsw_m)
        index.hnsw.efSearch = ef_search
        params = {"M": hnsw_m, "efSearch": ef_search,
                  "efConstruction": int(index.hnsw.efConstruction)}
    elif kind == "ivf":
        nlist = max(1, min(int(4 * np.sqrt(n)), n // 39))
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, nlist)
        index.cp.seed = seed
        pick = np.random.default_rng(seed).permutation(n)[:64 * nlist]
        index.train(x[np.sort(pick)])
        index.nprobe = min(nprobe, nlist)
        params = {"nlist": nlist, "nprobe": int(index.nprobe)}
    else:
        raise ValueError(f"unknown index kind {kind!r}; choose one of {', '.join(KINDS)}")
    index.add(x)
    return index, params


def recall_at_k(index, x, k: int = 10, queries: int = 1000, seed: int = 0) -> dict:
    """``{"recall_at_k", "k", "queries"}`` of ``index`` over ``x``: on up to ``queries``
    gallery rows (seeded sample), the share of the k items :func:`knn` returns through
    ``index`` whose key is at most the exact k-th key (a tie at the k-th place counts
    whichever member came back). A flat index gives 1.0."""
    x = check_matrix(x, "gallery")
    k = min(k, len(x))
    pick = np.sort(np.random.default_rng(seed).choice(len(x), min(queries, len(x)), False))
    exact, _ = knn(x[pick], x, k)
    got, _ = knn(x[pick], x, k, index=index)
    found = int(np.count_nonzero(got <= exact[:, -1:]))
    return {"recall_at_k": found / (k * len(pick)), "k": int(k), "queries": int(len(pick))}
