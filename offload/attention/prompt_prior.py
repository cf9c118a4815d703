"""The prompt's own attention per page: what a sparse decode step starts from.

A prompt's last tokens (for a question over a document, the question itself) attend every
page exactly during prefill. Their attention mass per page says which pages the answer is
about: measured on long-document QA with Gemma 3 270M at 8K tokens (``bench/selector_quality.py``),
choosing pages by it alone captured 0.78 of the live query's attention mass at F = 0.1
against 0.81 for the true top pages and 0.64 for Quest's key bounds.

While a global layer's last prefill chunk is attended (``PrefillAttention``), ``PageMass``
sees every key piece once and keeps, per query of the prompt's last ``PRIOR_QUERIES`` tokens
and per page, the log-sum-exp of the scores (streamed: a page may span two pieces). At the
end a page's prior is its share of each query's attention, maxed over heads and averaged
over the queries. It is computed only when a sparse mode will read it, and replaced by each
prefill (a question over a document replaces the document's own).
"""
from __future__ import annotations

import torch

__all__ = ["PageMass", "PRIOR_QUERIES"]

PRIOR_QUERIES = 64  # the prompt's last tokens whose attention makes the prior


class PageMass:
    """Streaming per-page attention mass of a few queries.

    Args:
        qg: the queries [num_kv_heads, group, m, head_dim] (the compute dtype).
        q_pos: their positions [m] (keys after a query's position are masked).
        scale: the softmax scale.
        page_size: tokens per page.
        num_pages: pages of the layer once the prefill's tokens are in.
    """

    def __init__(self, qg: torch.Tensor, q_pos: torch.Tensor, *, scale: float, page_size: int, num_pages: int) -> None:
        self.qg, self.q_pos, self.scale, self.page_size = qg.float(), q_pos, scale, page_size
        nkv, group, m, _ = qg.shape
        self.lse = torch.full((nkv, group, m, num_pages), float("-inf"), device=qg.device)

    def add(self, k: torch.Tensor, k0: int) -> None:
        """Keys k [num_kv_heads, K, head_dim] at positions k0 .. k0 + K - 1."""
        if k.shape[1] == 0:
            return
        s = torch.einsum("hgmd,hkd->hgmk", self.qg, k.float()) * self.scale
        k_pos = torch.arange(k0, k0 + k.shape[1], device=k.device)
        s.masked_fill_(k_pos[None, :] > self.q_pos[:, None], float("-inf"))
        top = s.amax(-1, keepdim=True).clamp_min(-1e30)  # a fully masked row stays finite
        p0, p1 = k0 // self.page_size, (k0 + k.shape[1] - 1) // self.page_size
        sums = torch.zeros((*s.shape[:3], p1 - p0 + 1), device=s.device)
        sums.index_add_(3, k_pos // self.page_size - p0, torch.exp(s - top))
        part = torch.log(sums) + top
        self.lse[..., p0:p1 + 1] = torch.logaddexp(self.lse[..., p0:p1 + 1], part)

    def shares(self) -> torch.Tensor:
        """[heads, m, num_pages] float32: each head's and query's share of attention per page."""
        share = torch.exp(self.lse - torch.logsumexp(self.lse, dim=-1, keepdim=True))
        nkv, group, m, n = share.shape
        return share.reshape(nkv * group, m, n)

    def result(self) -> torch.Tensor:
        """Per page [num_pages] float32: the share of each query's attention on the page,
        maxed over heads, averaged over the queries (a page no query sees: 0)."""
        return self.shares().amax(0).mean(0)
