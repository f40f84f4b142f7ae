"""BlockPool: which KV cache blocks are held, free or cached. Bookkeeping only, no tensors.

The paged KV cache (slots.py) is a pool of fixed-size blocks of `block_size` token positions. A
sequence holds a list of blocks, its block table: position p of the sequence lives at offset
p % block_size of block table[p // block_size]. A sequence takes blocks as it grows and gives them
back when it ends, so the cache holds memory in proportion to the tokens in use, not to
max_model_len for every slot.

Prefix caching (prefix_cache.py, as vLLM v1's `BlockPool` and SGLang's radix cache do it): a full
block whose contents are known can be registered under its key; a later sequence that starts with
the same blocks finds them (`lookup`) and holds them too (`share`) instead of computing them again.
Blocks are reference-counted. A block nobody holds is free: plainly (never registered, or a
duplicate of a registered one), or still cached and evictable, in least-recently-released order.
`take` hands out plain free blocks first, then evicts cached ones, oldest first; a held block is
never evicted. Both kinds count as `free`, so admission and its watermark see cached blocks as
room. Every block but the scratch block is always exactly one of: held, plain free, or evictable.

Block 0 is never handed out: it is the scratch block that every write with nowhere to go lands in
(the pad positions of a prefill, the rows of a decode step that are not live). Nothing reads it
as part of a sequence.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

SCRATCH_BLOCK = 0


def blocks_for(tokens: int, block_size: int) -> int:
    """Blocks that hold `tokens` positions."""
    return -(-tokens // block_size)


class BlockPool:
    """Reference counts over blocks 1..num_blocks-1 (block 0 is the scratch block), with a prefix cache
    of registered full blocks by key."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 2:
            raise ValueError("the KV cache needs at least two blocks (one is the scratch block)")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.reset()

    @property
    def capacity(self) -> int:
        """Blocks a sequence can ever hold: all but the scratch block."""
        return self.num_blocks - 1

    @property
    def free(self) -> int:
        """Blocks nobody holds: plain free ones and evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def cached(self) -> int:
        """Blocks registered under a key (held or evictable)."""
        return len(self._block_of)

    def refs(self, block: int) -> int:
        """How many sequences hold `block`."""
        return self._refs[block]

    def take(self, count: int) -> list[int]:
        """`count` blocks nobody holds, now held once each: plain free ones first (lowest ids first, which
        keeps a lightly used cache compact), then the least recently released cached ones, evicted from
        the cache. Raises MemoryError (taking none) when fewer are free."""
        if count > self.free:
            raise MemoryError(f"{count} KV cache blocks wanted, {self.free} free")
        taken = []
        for _ in range(max(count, 0)):
            if self._free:
                block = self._free.pop()
            else:
                block, _ = self._evictable.popitem(last=False)
                del self._block_of[self._key_of.pop(block)]
            self._refs[block] = 1
            taken.append(block)
        return taken

    def give_back(self, blocks: Sequence[int]) -> None:
        """Release one hold on each of `blocks`. One nobody holds any more is free: evictable if cached,
        else plain free. A sequence's later blocks are released first, so they are evicted first (a
        longer prefix is less likely to be asked for again than its start)."""
        for block in reversed(blocks):
            self._refs[block] -= 1
            assert self._refs[block] >= 0, f"block {block} released more often than held"
            if self._refs[block] == 0:
                if block in self._key_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)

    def lookup(self, keys: Sequence[bytes]) -> list[int]:
        """The cached blocks of the longest run of leading `keys` (the keys of a sequence's first blocks,
        in order); holds none of them (`share` does)."""
        found = []
        for key in keys:
            block = self._block_of.get(key)
            if block is None:
                break
            found.append(block)
        return found

    def cost(self, blocks: Sequence[int]) -> int:
        """How many of `blocks` are free now, i.e. how far `share(blocks)` lowers `free`."""
        return sum(1 for block in blocks if self._refs[block] == 0)

    def share(self, blocks: Sequence[int]) -> None:
        """Hold each of `blocks` (cached ones, from `lookup`) once more; free ones stop being evictable."""
        for block in blocks:
            if self._refs[block] == 0:
                del self._evictable[block]
            self._refs[block] += 1

    def register(self, block: int, key: bytes) -> bool:
        """Cache `block` (held, full, its contents final) under `key`. False where the key is cached
        already (another sequence computed the same block): this one stays a plain block."""
        assert self._refs[block] > 0, "only a held block is registered"
        if key in self._block_of or block in self._key_of:
            return False
        self._block_of[key] = block
        self._key_of[block] = key
        return True

    def reset(self) -> None:
        """Every block free again and nothing cached (after a failed step: no sequence holds any, and
        nothing on the device can be trusted)."""
        # Popped from the end: the lowest ids first.
        self._free = list(range(self.num_blocks - 1, SCRATCH_BLOCK, -1))
        self._refs = [0] * self.num_blocks
        self._evictable: OrderedDict[int, None] = OrderedDict()  # least recently released first
        self._block_of: dict[bytes, int] = {}
        self._key_of: dict[int, bytes] = {}
