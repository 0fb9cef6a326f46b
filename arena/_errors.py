"""Every exception the ``arena`` package raises.

One root, :class:`ArenaError`; each leaf also subclasses the builtin a caller would naturally
catch (``MemoryError`` for exhaustion, ``ValueError`` for a bad argument, ``TypeError`` for a
wrong type), so ``except MemoryError`` and ``except ArenaError`` both work.

Rule: an operation that raises one of these has changed nothing.
"""

from __future__ import annotations


class ArenaError(Exception):
    """Root of every error raised by the ``arena`` package."""


class InvalidArgument(ArenaError, ValueError):
    """An argument has the right type but an unusable value (a size <= 0, an alignment that is
    not a power of two, a watermark above the pool size...). The message names the argument,
    the value given and what is accepted. Fix the call; nothing was changed."""


class InvalidType(ArenaError, TypeError):
    """An argument has the wrong type (a float size, a non-Block passed to ``free``).
    Nothing was changed."""


class ArenaExhausted(ArenaError, MemoryError):
    """No free run in the arena can hold the request. The message gives the size and alignment
    asked and the free bytes and largest free run at that moment. The arena never grows: free
    blocks, or create a larger arena at start-up (see docs/operations.md, sizing)."""


class BadBlock(ArenaError, ValueError):
    """``free`` (or another block operation) was given a block this arena cannot accept."""


class DoubleFree(BadBlock):
    """The block was already freed. Freeing it again is refused, so nothing is corrupted."""


class ForeignBlock(BadBlock):
    """The block belongs to another arena (or another pool)."""


class StaleBlock(BadBlock):
    """The block handle does not match a live allocation: it was forged, or it is an old handle
    whose memory has since been freed and handed out again."""


class MemlockError(ArenaError, OSError):
    """``lock="require"`` was asked but the kernel refused to lock the arena in memory, usually
    because RLIMIT_MEMLOCK is below the arena size. The message gives the size asked, the limit
    and how to raise it (``ulimit -l``, systemd ``LimitMEMLOCK=``, limits.conf, or
    CAP_IPC_LOCK). ``lock="auto"`` warns instead and carries on unlocked."""


class BadArenaFile(ArenaError, OSError):
    """A shared arena file was refused on ``open``: not a regular file, a symbolic link, owned by
    another user, writable by group or others, too small, or its header (magic, version, sizes)
    does not validate. Shared data is never trusted before it is validated."""


class ArenaExists(ArenaError, FileExistsError):
    """``Arena.create`` found its path taken (a file, a symlink, a directory): nothing was
    changed. ``Arena.open`` attaches to an existing arena file."""


class ArenaClosed(ArenaError, ValueError):
    """The arena (or pool) was closed; its memory is no longer mapped."""


class PoolEmpty(ArenaError, LookupError):
    """``Pool.get()`` found the pool empty and the pool was made with ``on_empty="raise"``.
    Raise the pool size or lower the replenish delay, or choose ``on_empty="create"`` to take
    the counted slow path instead."""


class PoolForkError(ArenaError, RuntimeError):
    """The pool was used in a child process after ``fork`` in a way it cannot support (see
    :class:`arena.Pool`)."""
