"""A fixed-size, page-fault-free block arena (and preallocated pools on top of it).

The region is mapped once, prefaulted and (when the memlock limit allows) locked, and never
grown; blocks of any size and power-of-two alignment are handed out in O(1) by a two-level
segregated-fit allocator whose metadata lives inside the mapping, so a file-backed arena is one
allocator shared by several processes. See docs/architecture.md.
"""

from ._arena import Arena, ArenaStats, Block, CheckReport, LeakedBlock, LockPolicy
from ._cli import error_line, open_error
from ._errors import (
    ArenaClosed,
    ArenaError,
    ArenaExhausted,
    ArenaExists,
    BadArenaFile,
    BadBlock,
    DoubleFree,
    ForeignBlock,
    InvalidArgument,
    InvalidType,
    MemlockError,
    PoolEmpty,
    PoolForkError,
    StaleBlock,
)
from ._osmem import memlock_limit, mlockall, munlockall
from ._pool import Pool, PoolStats

__all__ = [
    "Arena",
    "ArenaClosed",
    "ArenaError",
    "ArenaExhausted",
    "ArenaExists",
    "ArenaStats",
    "BadArenaFile",
    "BadBlock",
    "Block",
    "CheckReport",
    "DoubleFree",
    "ForeignBlock",
    "InvalidArgument",
    "InvalidType",
    "LeakedBlock",
    "LockPolicy",
    "MemlockError",
    "Pool",
    "PoolEmpty",
    "PoolForkError",
    "PoolStats",
    "StaleBlock",
    "memlock_limit",
    "mlockall",
    "error_line",
    "munlockall",
    "open_error",
]
