"""Decode family: calls with few queries (decoding over a KV cache, speculative verification,
chunked prefill) as one packed query tile per kv head, KV split over programs and merged through
the log-sum-exp (flash-decoding), visiting only the blocks the spec keeps."""
