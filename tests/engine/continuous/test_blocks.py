"""The block pool alone: reference counts, the prefix cache's index, LRU eviction of cached blocks
nobody holds, never a held block, and every block accounted for under churn."""

from __future__ import annotations

import random

import pytest

from engine.continuous.blocks import SCRATCH_BLOCK, BlockPool


def key(n: int) -> bytes:
    return n.to_bytes(32, "little")


def test_a_released_cached_block_stays_findable_until_its_memory_is_taken() -> None:
    pool = BlockPool(5, 4)  # blocks 1..4
    a = pool.take(2)
    assert a == [1, 2] and pool.free == 2
    assert pool.register(a[0], key(1)) and pool.register(a[1], key(2))
    assert not pool.register(pool.take(1)[0], key(1))  # the key is cached already: that block stays plain
    pool.give_back([3])
    pool.give_back(a)
    assert pool.free == 4 and pool.cached == 2  # cached, nobody holds them: free, and still findable
    assert pool.lookup([key(1), key(2), key(3)]) == [1, 2] and pool.lookup([key(2)]) == [2]
    assert pool.lookup([key(9), key(1)]) == []  # only a leading run
    # Plain free blocks go first; then the cached ones, the last released (the chain's start) last.
    assert pool.take(2) == [3, 4] and pool.cached == 2
    assert pool.take(1) == [2] and pool.lookup([key(1), key(2)]) == [1]
    assert pool.take(1) == [1] and pool.cached == 0 and pool.free == 0
    with pytest.raises(MemoryError):
        pool.take(1)


def test_shared_blocks_are_held_once_per_sequence_and_never_evicted_while_held() -> None:
    pool = BlockPool(4, 4)  # blocks 1..3
    first = pool.take(2)
    pool.register(first[0], key(1))
    pool.give_back(first)  # block 1 evictable, block 2 plain free
    found = pool.lookup([key(1)])
    assert pool.cost(found) == 1  # sharing it takes it out of the free ones
    pool.share(found)
    pool.share(found)  # a second sequence
    assert pool.refs(1) == 2 and pool.free == 2
    assert sorted(pool.take(2)) == [2, 3]  # never block 1
    with pytest.raises(MemoryError):
        pool.take(1)
    pool.give_back(found)
    assert pool.refs(1) == 1 and pool.free == 0  # still held by the other
    pool.give_back(found)
    assert pool.free == 1 and pool.lookup([key(1)]) == [1]
    pool.reset()
    assert pool.free == 3 and pool.cached == 0


def test_eviction_is_least_recently_released_first() -> None:
    pool = BlockPool(7, 4)  # blocks 1..6
    blocks = pool.take(6)
    for i, block in enumerate(blocks):
        pool.register(block, key(i))
    pool.give_back(blocks[:3])  # one sequence: its blocks 3, 2, 1 in that order
    pool.give_back(blocks[3:])  # a later one: 6, 5, 4
    pool.share(pool.lookup([key(0)]))  # block 1 is used again, then released last
    pool.give_back([1])
    assert [pool.take(1)[0] for _ in range(6)] == [3, 2, 6, 5, 4, 1]


def test_churn_keeps_every_block_accounted_for_and_never_evicts_a_held_one() -> None:
    """Sequences come and go at random, share cached prefixes, register their blocks and release them;
    after every operation the pool agrees with a model of who holds what."""
    rng = random.Random(7)
    pool = BlockPool(41, 4)
    holds: dict[int, list[int]] = {}  # live sequence -> its blocks (shared ones included)
    registered: dict[bytes, int] = {}  # key -> block, as far as the test knows (evictions remove entries)
    for step in range(3000):
        if holds and (rng.random() < 0.45 or pool.free < 8):
            sequence = rng.choice(list(holds))
            pool.give_back(holds.pop(sequence))
        else:
            chain = rng.randrange(4)  # a few prompt families, so prefixes are shared
            keys = [key(chain * 100 + i) for i in range(rng.randrange(1, 7))]
            found = pool.lookup(keys)
            for known, block in zip(keys, found):
                assert registered[known] == block
            pool.share(found)
            fresh_wanted = min(len(keys) - len(found) + rng.randrange(3), pool.free)
            before = {b: pool.refs(b) for b in range(1, pool.num_blocks)}
            fresh = pool.take(fresh_wanted)
            assert all(before[b] == 0 for b in fresh), "a held block was handed out"
            assert SCRATCH_BLOCK not in fresh
            for k, block in zip(keys[len(found):], fresh):
                if pool.register(block, k):
                    registered[k] = block
            holds[step] = found + fresh
        # Evicted keys are gone from the index; the ones left still name their blocks.
        registered = {k: b for k, b in registered.items() if pool.lookup([k]) == [b]}
        held = [b for blocks in holds.values() for b in blocks]
        assert all(pool.refs(b) == held.count(b) for b in range(1, pool.num_blocks))
        assert pool.free == pool.capacity - len(set(held))
        assert pool.cached == len(registered)
    for blocks in holds.values():
        pool.give_back(blocks)
    assert pool.free == pool.capacity and all(pool.refs(b) == 0 for b in range(pool.num_blocks))
