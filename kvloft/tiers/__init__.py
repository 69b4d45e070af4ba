"""Tiers: where a session's K/V rows live and how many bytes they take.

Floor 2 of the house (../DESIGN.md): below the retrievers and the scheduler, above the kernels.
`chunked` holds host rows in fixed-size chunks (pinned when CUDA is present, spilled to disk by
policy into a session's SpillDir); `packed` keeps host rows 8-bit (codes + a scale per row and
head, CacheConfig.host_dtype) behind the same interface; `kvcache` holds a session's tiers, one
`layer_tiers` per layer: its static tier (sinks and the window ring) over a host tier of
`host_store` rows, with marks and rollback in `ring_marks`; `host_budget` counts the host bytes
of a token and plans the disk spill; `block_summary` keeps the mean key of every block
of host rows (sparse prefill); `dense` is the dense baseline's store (every token on the device).
"""
