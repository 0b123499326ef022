"""Token buckets over explicit time. Pure. (Both live in meshwg/token_bucket.py: nodes use them too.)"""

from __future__ import annotations

from meshwg.token_bucket import KeyedLimiter, TokenBucket

__all__ = ["KeyedLimiter", "TokenBucket"]
