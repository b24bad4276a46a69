"""Hold an [`AsyncSwapEngine`][kvswitch.AsyncSwapEngine]'s jobs in flight, deterministically.

On the host backend every copy ends within microseconds, so a test that issues a swap and
then does something else almost never sees the swap still running: a missing wait or a
missing ordering dependency goes unnoticed until real copy latency (a GPU) exposes it.
[`HeldEngine`][kvswitch.testing.HeldEngine] wraps an engine so that, while it holds,
submitted jobs stay queued until a test step releases them or the code under test waits
for one of them. No timers: what runs, and in which order, follows from the calls alone,
so a failing history replays exactly.

A wait releases exactly what the engine orders before the awaited job (the job and the
queued jobs it depends on, ``AsyncSwapEngine._release_held``): with a dependency missing,
the awaited job runs *before* the job it should follow, and the bytes show it. A wait for
blocks ([`wait_blocks`][kvswitch.AsyncSwapEngine.wait_blocks]) or ``synchronize()`` releases
every held job. A caller that forgets to wait releases nothing, and the job it should
have waited for is still queued when the test reads the blocks.
"""

from __future__ import annotations

from typing import Any

from kvswitch.swap import AsyncSwapEngine, SwapHandle

__all__ = ["HeldEngine", "HeldHandle"]


class HeldHandle:
    """A [`SwapHandle`][kvswitch.SwapHandle] whose ``wait()`` first releases the job (and the
    held jobs it depends on) when its engine holds jobs; everything else is the handle's."""

    __slots__ = ("_engine", "_handle")

    def __init__(self, handle: SwapHandle, engine: HeldEngine) -> None:
        self._handle = handle
        self._engine = engine

    def wait(self, *args: Any, **kwargs: Any) -> bool:
        if self._engine.holding and not self._handle.done():
            self._engine.release(self._handle.id)
        return self._handle.wait(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)


class HeldEngine:
    """An engine (workers > 0) whose jobs can be held in its queue; the engine's other
    methods and attributes are passed through. Install it on a manager with
    ``manager.engine = HeldEngine(manager.engine)`` before any job is submitted.

    For the host backend, or CUDA jobs without ``before=``: a submit with a ``before``
    stream waits for the job's dispatch, which a held job never gets.

    Raises:
        ValueError: the engine runs jobs in the calling thread (``num_workers == 0``).
    """

    def __init__(self, engine: AsyncSwapEngine) -> None:
        if not engine.num_workers:
            raise ValueError("HeldEngine: an inline engine (num_workers=0) runs each job "
                             "when it is submitted; there is nothing to hold")
        self._inner = engine
        self._held: dict[int, HeldHandle] = {}  # submitted while holding, not released
        self.holding = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    # -- holding ---------------------------------------------------------------------------

    def hold(self) -> None:
        """From now on, jobs stay queued until released, waited for, or
        [`resume`][kvswitch.testing.HeldEngine.resume]."""
        self._inner._engine._set_paused(True)
        self.holding = True

    def resume(self) -> None:
        """Stop holding: every queued job runs (this returns at once)."""
        self.holding = False
        self._held.clear()
        self._inner._engine._set_paused(False)

    @property
    def held(self) -> list[HeldHandle]:
        """Jobs submitted while holding and not yet released, in submission order."""
        return list(self._held.values())

    def release(self, job_id: int) -> list[int]:
        """Let the job ``job_id`` (0: every queued job) and the queued jobs it depends on
        run; the others stay held. Returns the ids released (empty when the job is not
        queued). Does not wait."""
        ids = self._inner._engine._release_held(job_id)
        for i in ids:
            self._held.pop(i, None)
        return ids

    # -- the engine's methods that submit or wait --------------------------------------------

    def _track(self, handle: SwapHandle) -> HeldHandle:
        held = HeldHandle(handle, self)
        if self.holding:
            self._held[handle.id] = held
        return held

    def swap_out(self, pairs: Any, **streams: Any) -> HeldHandle:
        return self._track(self._inner.swap_out(pairs, **streams))

    def swap_in(self, pairs: Any, **streams: Any) -> HeldHandle:
        return self._track(self._inner.swap_in(pairs, **streams))

    def migrate(self, pairs: Any, **streams: Any) -> HeldHandle:
        return self._track(self._inner.migrate(pairs, **streams))

    def wait_blocks(self, gpu_block_ids: Any) -> int:
        if self.holding:
            self.release(0)
        return self._inner.wait_blocks(gpu_block_ids)

    def synchronize(self) -> None:
        if self.holding:
            self.release(0)
        self._inner.synchronize()
