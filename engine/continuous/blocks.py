"""BlockPool: which KV cache blocks are free. Bookkeeping only, no tensors.

The paged KV cache (slots.py) is a pool of fixed-size blocks of `block_size` token positions. A
sequence holds a list of blocks, its block table: position p of the sequence lives at offset
p % block_size of block table[p // block_size]. A sequence takes blocks as it grows and gives them
back when it ends, so the cache holds memory in proportion to the tokens in use, not to
max_model_len for every slot.

Block 0 is never handed out: it is the scratch block that every write with nowhere to go lands in
(the pad positions of a prefill, the rows of a decode step that are not live). Nothing reads it
as part of a sequence.
"""

from __future__ import annotations

SCRATCH_BLOCK = 0


def blocks_for(tokens: int, block_size: int) -> int:
    """Blocks that hold `tokens` positions."""
    return -(-tokens // block_size)


class BlockPool:
    """A free list over blocks 1..num_blocks-1 (block 0 is the scratch block)."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 2:
            raise ValueError("the KV cache needs at least two blocks (one is the scratch block)")
        self.num_blocks, self.block_size = num_blocks, block_size
        # Popped from the end: the lowest ids first, which keeps a lightly used cache compact.
        self._free = list(range(num_blocks - 1, SCRATCH_BLOCK, -1))

    @property
    def capacity(self) -> int:
        """Blocks a sequence can ever hold: all but the scratch block."""
        return self.num_blocks - 1

    @property
    def free(self) -> int:
        return len(self._free)

    def take(self, count: int) -> list[int]:
        """`count` free blocks; raises MemoryError (taking none) when fewer are free."""
        if count > len(self._free):
            raise MemoryError(f"{count} KV cache blocks wanted, {len(self._free)} free")
        if count <= 0:
            return []
        taken = self._free[-count:]
        del self._free[-count:]
        return taken[::-1]

    def give_back(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))

    def reset(self) -> None:
        """Every block free again (after a failed step: no sequence holds any)."""
        self._free = list(range(self.num_blocks - 1, SCRATCH_BLOCK, -1))
