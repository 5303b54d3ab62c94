"""The page pool: N pages of B token slots each, shared by every request, with prefix reuse.

A request's page table maps its positions to slots (`page * B + position % B`); the runner writes each new
token's latent at its slot and reads a sequence's context back through its page table. Pages are reference
counted so that a full block of tokens (a shared system prompt, a chat history) is held once by every request
that starts with it. A full block is found by its hash, which chains the previous block's hash and the block's
token ids, so equal hashes mean equal prefixes, not only equal blocks (nano-vllm's block_manager.py; vLLM's
automatic prefix caching). A freed page keeps its hash until it is handed out again, so a finished request's
prefix stays reusable while the pool has other free pages."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence


def block_hash(previous: bytes, tokens: Sequence[int]) -> bytes:
    """The hash of a full block given the hash of the block before it (b"" for the first)."""
    return hashlib.blake2b(previous + b"".join(t.to_bytes(4, "little") for t in tokens), digest_size=16).digest()


class PagePool:
    def __init__(self, num_pages: int, page_size: int):
        self.num_pages, self.page_size = num_pages, page_size
        self.refs = [0] * num_pages
        self.hash_of: list[bytes | None] = [None] * num_pages
        self.by_hash: dict[bytes, int] = {}
        # Free pages in the order they are handed out: pages without a hash first, then cached blocks, oldest first.
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_pages))

    @property
    def used(self) -> int:
        """Pages held by at least one request."""
        return self.num_pages - len(self.free)

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def match(self, tokens: Sequence[int]) -> tuple[list[int], list[bytes]]:
        """Pages and hashes of the longest run of cached full blocks that starts `tokens`. The last token is never
        matched: the runner must compute at least one token to give the next token's logits."""
        pages, hashes, h, b = [], [], b"", self.page_size
        for i in range((len(tokens) - 1) // b):
            h = block_hash(h, tokens[i * b:(i + 1) * b])
            page = self.by_hash.get(h)
            if page is None:
                break
            pages.append(page)
            hashes.append(h)
        return pages, hashes

    def can_take(self, cached: list[int], fresh: int) -> bool:
        """Whether `cached` pages (from match) and `fresh` new ones can be held; a cached page that no request
        holds is on the free list, so holding it uses up a free page too."""
        return fresh + sum(self.refs[p] == 0 for p in cached) <= len(self.free)

    def take(self, cached: list[int], fresh: int) -> list[int]:
        """Hold `cached` pages and `fresh` new ones (check can_take first); returns them in that order."""
        assert self.can_take(cached, fresh), "take() beyond the free pages"
        for p in cached:
            if self.refs[p] == 0:
                del self.free[p]
            self.refs[p] += 1
        new = []
        for _ in range(fresh):
            p, _ = self.free.popitem(last=False)
            if self.hash_of[p] is not None:  # its old block is about to be overwritten
                del self.by_hash[self.hash_of[p]]
                self.hash_of[p] = None
            self.refs[p] = 1
            new.append(p)
        return cached + new

    def release(self, pages: list[int]) -> None:
        """Drop one hold on each page; pages nobody holds return to the free list."""
        for p in reversed(pages):  # a sequence's tail blocks are the least likely to be shared: hand them out first
            self.refs[p] -= 1
            assert self.refs[p] >= 0, f"page {p} released twice"
            if self.refs[p] == 0:
                self.free[p] = None
                if self.hash_of[p] is None:
                    self.free.move_to_end(p, last=False)

    def publish(self, tokens: Sequence[int], pages: list[int], hashes: list[bytes], computed: int) -> None:
        """Register the full blocks among the first `computed` tokens (their latents are written) for reuse;
        `hashes` holds the hashes of the blocks already registered and is extended."""
        b = self.page_size
        for i in range(len(hashes), computed // b):
            h = block_hash(hashes[-1] if hashes else b"", tokens[i * b:(i + 1) * b])
            hashes.append(h)
            if h not in self.by_hash and self.hash_of[pages[i]] is None:
                self.by_hash[h] = pages[i]
                self.hash_of[pages[i]] = h
