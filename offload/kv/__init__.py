"""The KV manager: page tables, the paged KV over the tiers, placement, read-ahead, CUDA fetch-ahead, DocCache."""
