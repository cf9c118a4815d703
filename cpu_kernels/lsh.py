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
        scanned linearly; folded into the buckets by ``rebuild`` when they grow

A table costs ``2 * (1 + 2**bits / SEGMENT_TOKENS)`` bytes per token and KV head: at the
default 10 bits and 150 tables about 310 bytes per token and head, beside 2 * head_dim * 2
bytes of its K and V in bf16 (512 for head_dim 128).

Retrieval walks the query's bucket in each table (``tables * built / 2**bits`` ids on average
for keys unrelated to the query), counting hits per token in a byte per token; candidates are
the tokens reaching ``min_hits`` inside ``[lo, hi)`` (the sampled region: sink, window and tail
pages are attended exactly elsewhere). A KV group's query heads are retrieved separately and
their union (the rows read) is capped: above ``cap`` rows, a uniform subset of ``cap`` is kept
(the ``cap`` smallest of a per-token hash salted per step), each kept candidate's weight
multiplied by ``union / cap``.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
from numba import njit, prange

__all__ = ["LshTables", "Candidates", "SEGMENT_TOKENS", "hash_planes", "simhash_codes", "query_codes",
           "token_hash"]

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
    out = np.empty((num_heads, tables), dtype=np.uint16)
    for g in range(num_heads):
        _pack_codes_nb(np.ascontiguousarray(q[g:g + 1] @ planes[g // group].T), bits, out[g:g + 1].T)
    return out


@njit(cache=True, nogil=True, parallel=True)
def _bucket_nb(codes, offsets, ids):
    """Counting sort of codes [nkv, tables, n] into offsets [nseg, nkv, tables, 2**bits + 1]
    and ids [nkv, tables, n] (segment-local)."""
    num_kv_heads, tables, n = codes.shape
    num_buckets = offsets.shape[3] - 1
    for it in prange(num_kv_heads * tables):
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


@njit(cache=True, nogil=True, parallel=True)
def _retrieve_nb(qc, offsets, ids, tail, tail_count, built, lo, hi, min_hits, hits, cand, count):
    """Per query head g (KV head g // group): tokens in [lo, hi) whose code equals qc[g, t] in at
    least min_hits tables, in cand[g, :count[g]]; hits [num_heads, tokens] uint8 scratch
    (zero on entry and on return)."""
    num_heads, tables = qc.shape
    group = num_heads // ids.shape[0]
    for g in prange(num_heads):
        h = g // group
        hg = hits[g]
        m = 0
        for sweep in range(2):  # 0: count and collect; 1: walk the same buckets to zero the counts
            for s in range(offsets.shape[0]):
                base = s * SEGMENT_TOKENS
                for t in range(tables):
                    c = qc[g, t]
                    a, b = offsets[s, h, t, c], offsets[s, h, t, c + 1]
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


@njit(cache=True, nogil=True)
def _splitmix(x):
    x = (x + np.uint64(0x9E3779B97F4A7C15)) & np.uint64(0xFFFFFFFFFFFFFFFF)
    x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & np.uint64(0xFFFFFFFFFFFFFFFF)
    x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & np.uint64(0xFFFFFFFFFFFFFFFF)
    return x ^ (x >> np.uint64(31))


@njit(cache=True, nogil=True)
def _token_hash_nb(tokens, salt, out):
    for i in range(tokens.shape[0]):
        out[i] = _splitmix(np.uint64(tokens[i]) ^ np.uint64(salt))


def token_hash(tokens: np.ndarray, salt: int) -> np.ndarray:
    """A uint64 hash per token id (splitmix64 of ``token ^ salt``): the order of the capped
    subset (``Candidates.capped``)."""
    out = np.empty(len(tokens), dtype=np.uint64)
    _token_hash_nb(np.asarray(tokens, dtype=np.int64), np.uint64(salt & 0xFFFFFFFFFFFFFFFF), out)
    return out


@njit(cache=True, nogil=True)
def _cap_nb(cand, count, group, cap, salt, mark, keep_log, unique):
    """Per KV head: the union of its query heads' candidates; above ``cap`` rows only the cap
    with the smallest token hash stay (cand/count rewritten), and keep_log[g] = log(union / cap).
    unique[h] = rows left per KV head. mark [tokens] uint8 scratch (zero on entry and return)."""
    num_heads = cand.shape[0]
    for h in range(num_heads // group):
        union = 0
        for g in range(h * group, (h + 1) * group):
            for i in range(count[g]):
                tok = cand[g, i]
                if mark[tok] == 0:
                    mark[tok] = 1
                    union += 1
        toks = np.empty(union, dtype=np.int64)
        u = 0
        for g in range(h * group, (h + 1) * group):
            for i in range(count[g]):
                tok = cand[g, i]
                if mark[tok] == 1:
                    mark[tok] = 2
                    toks[u] = tok
                    u += 1
        for i in range(union):
            mark[toks[i]] = 0
        kept = union
        if union > cap:
            keys = np.empty(union, dtype=np.uint64)
            for i in range(union):
                keys[i] = _splitmix(np.uint64(toks[i]) ^ salt)
            limit = np.sort(keys)[cap - 1]
            for i in range(union):
                if keys[i] <= limit:
                    mark[toks[i]] = 1
            for g in range(h * group, (h + 1) * group):
                m = 0
                for i in range(count[g]):
                    if mark[cand[g, i]] == 1:
                        cand[g, m] = cand[g, i]
                        m += 1
                count[g] = m
                keep_log[g] = math.log(union / cap)
            for i in range(union):
                mark[toks[i]] = 0
            kept = cap
        unique[h] = kept


@dataclasses.dataclass
class Candidates:
    """One layer's retrieval for one query.

    Attributes:
        tokens: [num_heads, max] int32; query head g's candidates are tokens[g, :count[g]].
        count: [num_heads] int32.
        keep_log: [num_heads] float32, log of the capped subset's weight (0: not capped).
        unique: [num_kv_heads] int64 rows (tokens) each KV head's group reads.
        ids_scanned: bucket ids walked (the table bytes read: 2 bytes each).
    """

    tokens: np.ndarray
    count: np.ndarray
    keep_log: np.ndarray
    unique: np.ndarray
    ids_scanned: int


class LshTables:
    """SimHash tables of one layer's keys (see the module docstring for the layout).

    Invariants: tokens 0 .. built - 1 are bucketed, built .. built + tail_count - 1 sit in the
    tail; ``mean`` and ``planes`` never change once built (appended keys are centred by the
    prefill's mean), so a token's codes never change.
    """

    def __init__(self, keys: np.ndarray, *, bits: int, tables: int, seed: int) -> None:
        """keys [num_kv_heads, n, head_dim] float32, n >= 1."""
        if not 1 <= bits <= MAX_BITS:
            raise ValueError(f"bits must be in 1..{MAX_BITS}, got {bits}")
        if tables < 1:
            raise ValueError(f"tables must be >= 1, got {tables}")
        keys = np.ascontiguousarray(keys, dtype=np.float32)
        num_kv_heads, _, head_dim = keys.shape
        self.bits, self.tables, self.seed = bits, tables, seed
        self.planes = hash_planes(seed, num_kv_heads, head_dim, bits, tables)
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

    def truncate(self, num_tokens: int) -> None:
        """Forget tokens from ``num_tokens`` on (a question's scratch tokens); only tail tokens
        can be forgotten."""
        if num_tokens < self.built:
            raise ValueError(f"cannot truncate to {num_tokens} tokens: {self.built} are bucketed")
        self.tail_count = min(self.tail_count, num_tokens - self.built)

    def retrieve(self, q: np.ndarray, *, lo: int, hi: int, min_hits: int, cap: int, salt: int) -> Candidates:
        """Candidates of query q [num_heads, head_dim] float32 among tokens [lo, hi), at most
        ``cap`` rows per KV head (see the module docstring)."""
        num_heads = q.shape[0]
        n = self.num_tokens
        if self._hits.shape[0] < num_heads or self._hits.shape[1] < n:
            self._hits = np.zeros((num_heads, max(n, 2 * self._hits.shape[1])), dtype=np.uint8)
        qc = query_codes(np.ascontiguousarray(q, dtype=np.float32), self.planes, self.bits)
        cand = np.empty((num_heads, max(1, min(n, hi) - max(0, lo))), dtype=np.int32)
        count = np.zeros(num_heads, dtype=np.int32)
        _retrieve_nb(qc, self.offsets, self.ids, self.tail, self.tail_count, self.built, lo, hi, min_hits,
                     self._hits, cand, count)
        scanned = _ids_scanned(qc, self.offsets, self.ids.shape[0])
        group = num_heads // self.ids.shape[0]
        keep_log = np.zeros(num_heads, dtype=np.float32)
        unique = np.zeros(self.ids.shape[0], dtype=np.int64)
        _cap_nb(cand, count, group, max(1, cap), np.uint64(salt & 0xFFFFFFFFFFFFFFFF), self._hits[0], keep_log,
                unique)
        return Candidates(tokens=cand, count=count, keep_log=keep_log, unique=unique, ids_scanned=scanned)


@njit(cache=True, nogil=True)
def _ids_scanned_nb(qc, offsets, num_kv_heads):
    num_heads, tables = qc.shape
    group = num_heads // num_kv_heads
    total = 0
    for g in range(num_heads):
        for s in range(offsets.shape[0]):
            for t in range(tables):
                c = qc[g, t]
                total += offsets[s, g // group, t, c + 1] - offsets[s, g // group, t, c]
    return total


def _ids_scanned(qc: np.ndarray, offsets: np.ndarray, num_kv_heads: int) -> int:
    return int(_ids_scanned_nb(qc, offsets, num_kv_heads))
