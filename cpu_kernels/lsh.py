"""SimHash tables over keys and their retrieval by a query, on the CPU (Numba).

MagicPIG (Chen et al., ICLR 2025) samples attention instead of choosing pages: every key is
hashed at prefill by ``tables`` SimHash functions of ``bits`` random hyperplanes each (the key
minus its head's mean key, as MagicPIG centres them); at decode the query is hashed by the same
planes, and a key is a candidate when its code equals the query's in at least ``min_hits``
tables. ``cpu_kernels.lsh_attention`` then attends the candidates, each weighted by the inverse
of its probability of being retrieved, an importance-sampling estimate of the full attention.

Storage, per KV head and table (``LshTables``)::

    codes of the built tokens, bucketed:   ids     [num_kv_heads, tables, built] uint16
        segment s holds tokens s*SEGMENT_TOKENS .. : their ids are offsets within the segment,
        sorted by code; offsets [num_segments, num_kv_heads, tables, 2**bits + 1] uint16
        (counting sort: bucket c of segment s is ids[h, t, start + off[c] : start + off[c+1]])
    codes of tokens appended since:        tail    [num_kv_heads, tables, capacity] uint16
        scanned linearly (a question's prompt and its decode tokens: never folded into the
        buckets, which a prefill or a DocCache restore builds whole)

A table costs ``2 * (1 + 2**bits / SEGMENT_TOKENS)`` bytes per token and KV head: at the
default 10 bits and 150 tables about 310 bytes per token and head, beside 2 * head_dim * 2
bytes of its K and V in bf16 (512 for head_dim 128).

Retrieval walks the query's bucket in each table (``tables * built / 2**bits`` ids on average
for keys unrelated to the query), counting hits per token in a byte per token; candidates are
the tokens reaching ``min_hits`` inside ``[lo, hi)`` (the sampled region: sink, window and tail
pages are attended exactly elsewhere). Each query head is retrieved separately (a KV group's
heads then read the union of their rows). ``thin`` caps what a step reads without bias: at most
so many distinct rows per KV head in memory and so many DISK pages (read whole, a page being
the unit of I/O), each a uniform subset (the smallest of a hash salted per step), the kept
candidates' weights multiplied by distinct / kept.
"""
from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
from numba import njit

__all__ = ["LshTables", "Candidates", "Demand", "SEGMENT_TOKENS", "hash_planes", "simhash_codes", "query_codes",
           "demand", "thin"]

SEGMENT_TOKENS = 32768  # tokens whose ids share one uint16 offset table (offsets reach 32768)
MAX_BITS = 16  # codes are uint16
_HASH_BLOCK = 4096  # tokens projected per matrix product (bounds its [block, tables * bits] scratch)
_TAIL_GROW = 256  # tail capacity step (tokens)


def hash_planes(seed: int, num_kv_heads: int, head_dim: int, bits: int, tables: int) -> np.ndarray:
    """[num_kv_heads, tables * bits, head_dim] float32 Gaussian hyperplanes drawn from ``seed``
    (plane ``t * bits + b`` is bit b of table t)."""
    rng = np.random.Generator(np.random.PCG64(seed))
    return rng.standard_normal((num_kv_heads, tables * bits, head_dim), dtype=np.float32)


@njit(cache=True, nogil=True)
def _pack_codes_nb(proj, bits, out):
    """proj [rows, tables * bits] float32 -> out [tables, rows] uint16: bit b of table t set
    when plane t * bits + b sees the row on its positive side."""
    rows, tables = proj.shape[0], out.shape[0]
    for r in range(rows):
        for t in range(tables):
            code = 0
            for b in range(bits):
                if proj[r, t * bits + b] > 0.0:
                    code |= 1 << b
            out[t, r] = code


def simhash_codes(x: np.ndarray, planes: np.ndarray, bits: int, mean: np.ndarray | None = None) -> np.ndarray:
    """SimHash codes of vectors per KV head.

    Args:
        x: [num_kv_heads, n, head_dim] float32 keys.
        planes: ``hash_planes`` [num_kv_heads, tables * bits, head_dim].
        mean: [num_kv_heads, head_dim] subtracted first (None: nothing).

    Returns:
        [num_kv_heads, tables, n] uint16.
    """
    num_kv_heads, n, _ = x.shape
    tables = planes.shape[1] // bits
    out = np.empty((num_kv_heads, tables, n), dtype=np.uint16)
    for h in range(num_kv_heads):
        for a in range(0, n, _HASH_BLOCK):
            b = min(n, a + _HASH_BLOCK)
            block = x[h, a:b] if mean is None else x[h, a:b] - mean[h]
            codes = np.empty((tables, b - a), dtype=np.uint16)
            _pack_codes_nb(np.ascontiguousarray(block @ planes[h].T), bits, codes)
            out[h, :, a:b] = codes
    return out


def query_codes(q: np.ndarray, planes: np.ndarray, bits: int) -> np.ndarray:
    """q [num_heads, head_dim] float32 (query head g uses KV head g // group's planes) ->
    codes [num_heads, tables] uint16. Queries are not centred: a constant q . mean shifts
    every score of a head alike."""
    num_heads = q.shape[0]
    group = num_heads // planes.shape[0]
    tables = planes.shape[1] // bits
    proj = np.empty((num_heads, planes.shape[1]), dtype=np.float32)  # one product per KV group
    for h in range(planes.shape[0]):
        np.matmul(q[h * group:(h + 1) * group], planes[h].T, out=proj[h * group:(h + 1) * group])
    out = np.empty((num_heads, tables), dtype=np.uint16)
    _pack_codes_nb(proj, bits, out.T)
    return out


@njit(cache=True, nogil=True)
def _bucket_nb(codes, offsets, ids):
    """Counting sort of codes [nkv, tables, n] into offsets [nseg, nkv, tables, 2**bits + 1]
    and ids [nkv, tables, n] (segment-local)."""
    num_kv_heads, tables, n = codes.shape
    num_buckets = offsets.shape[3] - 1
    for it in range(num_kv_heads * tables):  # serial: a parallel kernel cost seconds to compile, this ms to run
        h, t = it // tables, it % tables
        fill = np.empty(num_buckets, dtype=np.int64)
        for s in range(offsets.shape[0]):
            a = s * SEGMENT_TOKENS
            b = min(n, a + SEGMENT_TOKENS)
            off = offsets[s, h, t]
            off[:] = 0
            for i in range(a, b):
                off[codes[h, t, i] + 1] += 1
            for c in range(num_buckets):
                off[c + 1] += off[c]
            for c in range(num_buckets):
                fill[c] = off[c]
            for i in range(a, b):
                c = codes[h, t, i]
                ids[h, t, a + fill[c]] = i - a
                fill[c] += 1


@njit(cache=True, nogil=True)
def _retrieve_nb(qc, offsets, ids, tail, tail_count, built, lo, hi, min_hits, hits, cand, count):
    """Per query head g (KV head g // group): tokens in [lo, hi) whose code equals qc[g, t] in at
    least min_hits tables, in cand[g, :count[g]]; hits [num_heads, tokens] uint8 scratch
    (zero on entry and on return). Returns the bucket ids walked."""
    num_heads, tables = qc.shape
    group = num_heads // ids.shape[0]
    scanned = 0
    for g in range(num_heads):
        h = g // group
        hg = hits[g]
        m = 0
        for sweep in range(2):  # 0: count and collect; 1: walk the same buckets to zero the counts
            for s in range(offsets.shape[0]):
                base = s * SEGMENT_TOKENS
                for t in range(tables):
                    c = qc[g, t]
                    a, b = offsets[s, h, t, c], offsets[s, h, t, c + 1]
                    scanned += (b - a) * (1 - sweep)
                    for j in range(a, b):
                        tok = base + ids[h, t, base + j]
                        if sweep == 1:
                            hg[tok] = 0
                        elif hg[tok] < 255:
                            hg[tok] += 1
                            if hg[tok] == min_hits and lo <= tok < hi:
                                cand[g, m] = tok
                                m += 1
        for i in range(tail_count):
            tok = built + i
            if tok < lo or tok >= hi:
                continue
            got = 0
            for t in range(tables):
                if tail[h, t, i] == qc[g, t]:
                    got += 1
            if got >= min_hits:
                cand[g, m] = tok
                m += 1
        count[g] = m
    return scanned


@njit(cache=True, nogil=True)
def _splitmix(x):
    x = (x + np.uint64(0x9E3779B97F4A7C15)) & np.uint64(0xFFFFFFFFFFFFFFFF)
    x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & np.uint64(0xFFFFFFFFFFFFFFFF)
    x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & np.uint64(0xFFFFFFFFFFFFFFFF)
    return x ^ (x >> np.uint64(31))


@njit(cache=True, nogil=True)
def _bottom(keys, k):
    """Indices of the k smallest keys (k < len(keys); hashes: no ties in practice)."""
    return np.argsort(keys)[:k]


@njit(cache=True, nogil=True)
def _demand_nb(cand, count, group, page_size, disk_page, mark, rows, pages):
    """rows[h]: distinct tokens of KV head h's group in memory pages; returns the distinct
    pages on DISK holding any candidate (their ids in pages[:returned]). mark [tokens] uint8
    scratch, zero on entry and return."""
    num_heads = cand.shape[0]
    num_pages = 0
    for h in range(num_heads // group):
        rows[h] = 0
        for g in range(h * group, (h + 1) * group):
            for i in range(count[g]):
                tok = cand[g, i]
                if disk_page[tok // page_size]:
                    continue
                if mark[tok] == 0:
                    mark[tok] = 1
                    rows[h] += 1
        for g in range(h * group, (h + 1) * group):
            for i in range(count[g]):
                mark[cand[g, i]] = 0
    for g in range(num_heads):
        for i in range(count[g]):
            page = cand[g, i] // page_size
            if disk_page[page] and mark[page * page_size] == 0:
                mark[page * page_size] = 1
                pages[num_pages] = page
                num_pages += 1
    for i in range(num_pages):
        mark[pages[i] * page_size] = 0
    return num_pages


@njit(cache=True, nogil=True)
def _thin_nb(cand, count, log_factor, group, page_size, disk_page, rows, pages, row_caps, page_cap, salt, mark):
    """Keep at most row_caps[h] of the rows[h] distinct memory rows per KV head (the smallest
    hashes of token ^ salt) and page_cap of the distinct DISK ``pages`` (of page ^ ~salt); each
    kept candidate's log_factor gains log(distinct / kept) of its kind. mark [tokens] uint8
    scratch, zero on entry and return: 2 marks a kept DISK page at its first token, 1 a memory
    row seen, 3 a memory row kept."""
    num_heads = cand.shape[0]
    num_pages = pages.shape[0]
    if num_pages > page_cap:
        keys = np.empty(num_pages, dtype=np.uint64)
        for i in range(num_pages):
            keys[i] = _splitmix(np.uint64(pages[i]) ^ ~salt)
        for i in _bottom(keys, page_cap):
            mark[pages[i] * page_size] = 2
    else:
        for i in range(num_pages):
            mark[pages[i] * page_size] = 2
    page_log = math.log(num_pages / page_cap) if num_pages > page_cap else 0.0
    for h in range(num_heads // group):
        capped = rows[h] > row_caps[h]
        toks = np.empty(rows[h] if capped else 0, dtype=np.int64)
        row_log = 0.0
        if capped:
            u = 0
            for g in range(h * group, (h + 1) * group):
                for i in range(count[g]):
                    tok = cand[g, i]
                    if not disk_page[tok // page_size] and mark[tok] == 0:
                        mark[tok] = 1
                        toks[u] = tok
                        u += 1
            keys = np.empty(u, dtype=np.uint64)
            for i in range(u):
                keys[i] = _splitmix(np.uint64(toks[i]) ^ salt)
            for i in _bottom(keys, row_caps[h]):
                mark[toks[i]] = 3
            row_log = math.log(rows[h] / row_caps[h])
        for g in range(h * group, (h + 1) * group):
            m = 0
            for i in range(count[g]):
                tok = cand[g, i]
                page = tok // page_size
                if disk_page[page]:
                    if mark[page * page_size] != 2:
                        continue
                    log_factor[g, m] = log_factor[g, i] + page_log
                elif capped:
                    if mark[tok] != 3:
                        continue
                    log_factor[g, m] = log_factor[g, i] + row_log
                else:
                    log_factor[g, m] = log_factor[g, i]
                cand[g, m] = tok
                m += 1
            count[g] = m
        for i in range(toks.shape[0]):
            mark[toks[i]] = 0
    for i in range(num_pages):
        mark[pages[i] * page_size] = 0


@dataclasses.dataclass
class Candidates:
    """One layer's retrieval for one query (``LshTables.retrieve``), thinned in place by
    ``thin``.

    Attributes:
        tokens: [num_heads, max] int32; query head g's candidates are tokens[g, :count[g]].
        count: [num_heads] int32.
        log_factor: [num_heads, max] float32, log of each candidate's thinning weight (0: kept
            with certainty).
        ids_scanned: bucket ids walked (the table bytes read: 2 bytes each).
    """

    tokens: np.ndarray
    count: np.ndarray
    log_factor: np.ndarray
    ids_scanned: int


@dataclasses.dataclass(frozen=True)
class Demand:
    """What candidates would read: ``rows`` [num_kv_heads] int64, the distinct memory rows of
    each KV head's group; ``pages`` int64, the distinct DISK pages holding one (read whole)."""

    rows: np.ndarray
    pages: np.ndarray


def demand(cand: Candidates, *, group: int, page_size: int, disk_page: np.ndarray, scratch: np.ndarray) -> Demand:
    """``Demand`` of the candidates (``thin``'s arguments)."""
    rows = np.zeros(cand.tokens.shape[0] // group, dtype=np.int64)
    pages = np.empty(int(cand.count.sum()) + 1, dtype=np.int64)
    num = _demand_nb(cand.tokens, cand.count, group, page_size, disk_page, scratch, rows, pages)
    return Demand(rows=rows, pages=pages[:num])


def thin(cand: Candidates, *, group: int, page_size: int, disk_page: np.ndarray, row_caps: np.ndarray,
         page_cap: int, salt: int, scratch: np.ndarray, need: Demand | None = None) -> Demand:
    """Cap the rows read in place, unbiasedly: at most ``row_caps[h]`` distinct memory rows
    (tokens of pages where ``disk_page`` is False) per KV head h, and ``page_cap`` distinct
    DISK pages (read whole), each kept as a uniform subset (the smallest splitmix64 hashes of
    ``token ^ salt``, of ``page ^ ~salt``) whose candidates' weights gain ``distinct / kept``.

    Args:
        disk_page: [num_pages] bool, per page id of the layer.
        row_caps: [num_kv_heads] int64 (>= 1); page_cap >= 1.
        scratch: [>= tokens] uint8, zero (and left zero).
        need: the candidates' ``demand`` when the caller computed it to set the caps.

    Returns:
        The demand before thinning.
    """
    if need is None:
        need = demand(cand, group=group, page_size=page_size, disk_page=disk_page, scratch=scratch)
    _thin_nb(cand.tokens, cand.count, cand.log_factor, group, page_size, disk_page, need.rows, need.pages,
             np.maximum(np.asarray(row_caps, dtype=np.int64), 1), max(1, page_cap),
             np.uint64(salt & 0xFFFFFFFFFFFFFFFF), scratch)
    return need


class LshTables:
    """SimHash tables of one layer's keys (see the module docstring for the layout).

    Invariants: tokens 0 .. built - 1 are bucketed, built .. built + tail_count - 1 sit in the
    tail; ``mean`` and ``planes`` never change once built (appended keys are centred by the
    prefill's mean), so a token's codes never change.
    """

    def __init__(self, keys: np.ndarray, *, bits: int, tables: int, seed: int,
                 planes: np.ndarray | None = None) -> None:
        """keys [num_kv_heads, n, head_dim] float32, n >= 1; ``planes``: ``hash_planes(seed, ...)``
        made already (layers hashed with one seed share them), else drawn here."""
        if not 1 <= bits <= MAX_BITS:
            raise ValueError(f"bits must be in 1..{MAX_BITS}, got {bits}")
        if tables < 1:
            raise ValueError(f"tables must be >= 1, got {tables}")
        keys = np.ascontiguousarray(keys, dtype=np.float32)
        num_kv_heads, _, head_dim = keys.shape
        self.bits, self.tables, self.seed = bits, tables, seed
        self.planes = hash_planes(seed, num_kv_heads, head_dim, bits, tables) if planes is None else planes
        if self.planes.shape != (num_kv_heads, tables * bits, head_dim):
            raise ValueError(f"planes of shape {self.planes.shape} for {num_kv_heads} KV heads, {tables} tables of "
                             f"{bits} bits, head_dim {head_dim}")
        self.mean = keys.mean(axis=1).astype(np.float32)  # [num_kv_heads, head_dim]
        self.tail = np.zeros((num_kv_heads, tables, _TAIL_GROW), dtype=np.uint16)
        self.tail_count = 0
        self.built = 0
        self._bucket(simhash_codes(keys, self.planes, bits, self.mean))
        self._hits = np.zeros((0, 0), dtype=np.uint8)

    @property
    def num_tokens(self) -> int:
        return self.built + self.tail_count

    @property
    def nbytes(self) -> int:
        """Bytes held: bucketed ids and offsets, the tail's capacity, planes and mean."""
        return self.ids.nbytes + self.offsets.nbytes + self.tail.nbytes + self.planes.nbytes + self.mean.nbytes

    def _bucket(self, codes: np.ndarray) -> None:
        num_kv_heads, tables, n = codes.shape
        num_segments = -(-n // SEGMENT_TOKENS)
        self.offsets = np.empty((num_segments, num_kv_heads, tables, (1 << self.bits) + 1), dtype=np.uint16
                                if SEGMENT_TOKENS < 65536 else np.uint32)
        self.ids = np.empty((num_kv_heads, tables, n), dtype=np.uint16)
        _bucket_nb(codes, self.offsets, self.ids)
        self.built = n

    def extend(self, keys: np.ndarray) -> None:
        """Append keys [num_kv_heads, m, head_dim] (tokens num_tokens .. num_tokens + m - 1)."""
        codes = simhash_codes(np.ascontiguousarray(keys, dtype=np.float32), self.planes, self.bits, self.mean)
        m = codes.shape[2]
        if self.tail_count + m > self.tail.shape[2]:
            grow = -(-(self.tail_count + m) // _TAIL_GROW) * _TAIL_GROW
            tail = np.zeros(self.tail.shape[:2] + (grow,), dtype=np.uint16)
            tail[:, :, :self.tail_count] = self.tail[:, :, :self.tail_count]
            self.tail = tail
        self.tail[:, :, self.tail_count:self.tail_count + m] = codes
        self.tail_count += m

    def fork(self) -> "LshTables":
        """A copy sharing the built tables (never written again) with a tail of its own."""
        twin = copy.copy(self)
        twin.tail = self.tail.copy()
        twin._hits = np.zeros((0, 0), dtype=np.uint8)
        return twin

    def truncate(self, num_tokens: int) -> None:
        """Forget tokens from ``num_tokens`` on (a question's scratch tokens); only tail tokens
        can be forgotten."""
        if num_tokens < self.built:
            raise ValueError(f"cannot truncate to {num_tokens} tokens: {self.built} are bucketed")
        self.tail_count = min(self.tail_count, num_tokens - self.built)

    def scratch(self, num_heads: int) -> np.ndarray:
        """[num_heads, >= num_tokens] uint8 zeros for ``retrieve`` (row 0 serves ``thin``),
        kept between calls (each leaves it zero)."""
        n = self.num_tokens
        if self._hits.shape[0] < num_heads or self._hits.shape[1] < n:
            self._hits = np.zeros((num_heads, max(n, 2 * self._hits.shape[1])), dtype=np.uint8)
        return self._hits

    def retrieve(self, q: np.ndarray, *, lo: int, hi: int, min_hits: int) -> Candidates:
        """Candidates of query q [num_heads, head_dim] float32 among tokens [lo, hi): tokens
        whose code equals the query's in at least ``min_hits`` tables (module docstring)."""
        num_heads = q.shape[0]
        hits = self.scratch(num_heads)
        qc = query_codes(np.ascontiguousarray(q, dtype=np.float32), self.planes, self.bits)
        cand = np.empty((num_heads, max(1, min(self.num_tokens, hi) - max(0, lo))), dtype=np.int32)
        count = np.zeros(num_heads, dtype=np.int32)
        scanned = _retrieve_nb(qc, self.offsets, self.ids, self.tail, self.tail_count, self.built, lo, hi, min_hits,
                               hits, cand, count)
        return Candidates(tokens=cand, count=count, log_factor=np.zeros(cand.shape, dtype=np.float32),
                          ids_scanned=int(scanned))
