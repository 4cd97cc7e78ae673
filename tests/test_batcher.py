"""The batcher with fake handlers: flush rules, ordering, errors, cancellation, deadlines."""

from __future__ import annotations

import asyncio
import time

import pytest

from resnet_serve.batcher import Batcher
from resnet_serve.errors import DeadlineExceeded, InferenceFailed, NotReady, Overloaded


class FakeModel:
    """Records each batch it sees; answers item * 10, optionally slowly or by raising."""

    def __init__(self, delay: float = 0.0, fail_on: int | None = None) -> None:
        self.batches: list[list[int]] = []
        self.delay = delay
        self.fail_on = fail_on
        self.started = asyncio.Event()

    async def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        self.started.set()
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail_on is not None and self.fail_on in items:
            raise RuntimeError("boom")
        return [i * 10 for i in items]


def make(model: FakeModel, **overrides: object) -> Batcher[int, int]:
    options: dict[str, object] = dict(max_batch_size=4, max_wait_ms=50, max_queue=100, dispatch="wait")
    options.update(overrides)
    return Batcher(model, **options)  # type: ignore[arg-type]


async def test_full_batch_dispatches_without_waiting_for_the_window() -> None:
    model = FakeModel()
    batcher = make(model, max_wait_ms=10_000)
    start = time.monotonic()
    pending = [batcher.submit(i, timeout_s=30) for i in range(4)]
    results = await asyncio.gather(*(p.future for p in pending))
    assert results == [0, 10, 20, 30]
    assert model.batches == [[0, 1, 2, 3]]
    assert time.monotonic() - start < 5  # far below the 10 s window
    await batcher.close()


async def test_partial_batch_flushes_when_the_window_ends() -> None:
    model = FakeModel()
    batcher = make(model, max_wait_ms=80)
    start = time.monotonic()
    pending = [batcher.submit(i, timeout_s=30) for i in range(2)]
    assert await asyncio.gather(*(p.future for p in pending)) == [0, 10]
    waited = time.monotonic() - start
    assert model.batches == [[0, 1]]
    assert waited >= 0.075
    assert pending[0].queue_ms >= 75
    await batcher.close()


async def test_items_beyond_max_batch_size_go_to_the_next_batch() -> None:
    model = FakeModel()
    batcher = make(model, max_batch_size=3, max_wait_ms=20)
    pending = [batcher.submit(i, timeout_s=30) for i in range(7)]
    assert await asyncio.gather(*(p.future for p in pending)) == [i * 10 for i in range(7)]
    assert model.batches == [[0, 1, 2], [3, 4, 5], [6]]
    assert batcher.stats.batch_sizes == {3: 2, 1: 1}
    await batcher.close()


async def test_eager_dispatch_sends_a_lone_request_at_once() -> None:
    model = FakeModel()
    batcher = make(model, dispatch="eager", max_wait_ms=10_000)
    start = time.monotonic()
    pending = batcher.submit(7, timeout_s=30)
    assert await pending.future == 70
    assert time.monotonic() - start < 5  # far below the 10 s window
    assert model.batches == [[7]]
    await batcher.close()


async def test_eager_dispatch_fills_batches_while_the_model_is_busy() -> None:
    model = FakeModel(delay=0.05)
    batcher = make(model, dispatch="eager", max_batch_size=4, max_wait_ms=10_000)
    first = batcher.submit(0, timeout_s=30)
    await model.started.wait()  # the model is now busy with [0]
    rest = [batcher.submit(i, timeout_s=30) for i in range(1, 9)]
    results = await asyncio.gather(first.future, *(p.future for p in rest))
    assert results == [i * 10 for i in range(9)]
    assert model.batches == [[0], [1, 2, 3, 4], [5, 6, 7, 8]]
    await batcher.close()


async def test_each_future_gets_its_own_result_under_concurrency() -> None:
    model = FakeModel(delay=0.001)
    batcher = make(model, dispatch="eager", max_batch_size=4, max_queue=1000)

    async def one(i: int) -> int:
        await asyncio.sleep((i % 7) / 1000)
        return await batcher.submit(i, timeout_s=30).future

    assert await asyncio.gather(*(one(i) for i in range(200))) == [i * 10 for i in range(200)]
    assert max(len(b) for b in model.batches) <= 4
    await batcher.close()


async def test_a_failing_batch_fails_only_its_own_requests() -> None:
    model = FakeModel(fail_on=2)
    batcher = make(model, max_batch_size=2, max_wait_ms=10)
    pending = [batcher.submit(i, timeout_s=30) for i in range(4)]
    outcomes = await asyncio.gather(*(p.future for p in pending), return_exceptions=True)
    assert outcomes[:2] == [0, 10]
    assert all(isinstance(o, InferenceFailed) for o in outcomes[2:])
    assert await batcher.submit(5, timeout_s=30).future == 50  # still serving
    assert batcher.stats.failed_batches == 1
    await batcher.close()


async def test_a_handler_returning_the_wrong_count_fails_the_batch() -> None:
    async def short(items: list[int]) -> list[int]:
        return items[:-1]

    batcher: Batcher[int, int] = Batcher(short, max_batch_size=2, max_wait_ms=10, max_queue=10, dispatch="wait")
    pending = [batcher.submit(i, timeout_s=30) for i in range(2)]
    outcomes = await asyncio.gather(*(p.future for p in pending), return_exceptions=True)
    assert all(isinstance(o, InferenceFailed) for o in outcomes)
    await batcher.close()


async def test_cancelled_requests_are_dropped_before_inference() -> None:
    model = FakeModel(delay=0.05)
    batcher = make(model, dispatch="eager")
    first = batcher.submit(0, timeout_s=30)
    await model.started.wait()
    gone = batcher.submit(1, timeout_s=30)
    kept = batcher.submit(2, timeout_s=30)
    gone.future.cancel()  # the client went away while queued
    assert await first.future == 0
    assert await kept.future == 20
    assert model.batches == [[0], [2]]
    assert batcher.stats.abandoned == 1
    await batcher.close()


async def test_expired_requests_get_deadline_exceeded_and_never_run() -> None:
    model = FakeModel(delay=0.1)
    batcher = make(model, dispatch="eager")
    first = batcher.submit(0, timeout_s=30)
    await model.started.wait()
    late = batcher.submit(1, timeout_s=0.01)  # expires while [0] runs
    assert await first.future == 0
    with pytest.raises(DeadlineExceeded):
        await late.future
    assert model.batches == [[0]]
    assert batcher.stats.expired == 1
    await batcher.close()


async def test_a_full_queue_refuses_at_once_with_retry_after() -> None:
    model = FakeModel(delay=0.2)
    batcher = make(model, dispatch="eager", max_batch_size=1, max_queue=2)
    running = batcher.submit(0, timeout_s=30)
    await model.started.wait()
    queued = [batcher.submit(i, timeout_s=30) for i in (1, 2)]
    with pytest.raises(Overloaded) as refused:
        batcher.submit(3, timeout_s=30)
    assert refused.value.headers["Retry-After"] == "1"
    assert batcher.stats.rejected == 1
    assert await asyncio.gather(running.future, *(p.future for p in queued)) == [0, 10, 20]
    await batcher.close()


async def test_an_idle_batcher_holds_its_next_batch_besides_the_queue() -> None:
    """A burst that lands before the task's turn (as on a busy CI host) is not refused for room
    the task was about to make: the next batch does not count against ``max_queue``."""
    model = FakeModel(delay=0.05)
    batcher = make(model, dispatch="eager", max_batch_size=2, max_queue=1)
    accepted = [batcher.submit(i, timeout_s=30) for i in range(3)]  # no await: the task has not run
    with pytest.raises(Overloaded):
        batcher.submit(3, timeout_s=30)
    assert await asyncio.gather(*(p.future for p in accepted)) == [0, 10, 20]
    assert model.batches == [[0, 1], [2]]
    await batcher.close()


async def test_close_drains_the_queue_within_the_grace_period() -> None:
    model = FakeModel(delay=0.02)
    batcher = make(model, dispatch="eager", max_batch_size=2)
    pending = [batcher.submit(i, timeout_s=30) for i in range(6)]
    await batcher.close(grace_s=5)
    assert [p.future.result() for p in pending] == [0, 10, 20, 30, 40, 50]
    with pytest.raises(NotReady):
        batcher.submit(9, timeout_s=30)


async def test_close_fails_what_the_grace_period_cannot_finish() -> None:
    model = FakeModel(delay=0.3)
    batcher = make(model, dispatch="eager", max_batch_size=1)
    pending = [batcher.submit(i, timeout_s=30) for i in range(4)]
    await model.started.wait()
    await batcher.close(grace_s=0.05)
    outcomes = [p.future.exception() if p.future.exception() else p.future.result() for p in pending]
    assert all(isinstance(o, NotReady) for o in outcomes)  # every future resolved, none hangs


class GatedModel:
    """Holds every batch until ``release``; records how many run at once."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.running = 0
        self.most_at_once = 0
        self.release = asyncio.Event()

    async def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        try:
            await self.release.wait()
        finally:
            self.running -= 1
        return [i * 10 for i in items]


async def until(condition: object, timeout_s: float = 5.0) -> None:
    end = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < end, "condition never held"
        await asyncio.sleep(0.001)


@pytest.mark.parametrize("slots", [1, 2, 3])
async def test_max_concurrent_batches_run_at_once_and_no_more(slots: int) -> None:
    model = GatedModel()
    batcher = make(model, dispatch="eager", max_batch_size=2, max_concurrent_batches=slots)
    pending = [batcher.submit(i, timeout_s=30) for i in range(10)]
    await until(lambda: model.running == slots)
    await asyncio.sleep(0.05)  # time for a batch beyond the slots to start, were it allowed to
    assert model.running == slots
    assert batcher.depth == 10 - 2 * slots  # the rest waits for a slot
    model.release.set()
    assert await asyncio.gather(*(p.future for p in pending)) == [i * 10 for i in range(10)]
    assert model.most_at_once == slots
    assert sorted(i for b in model.batches for i in b) == list(range(10))
    await batcher.close()


async def test_a_free_slot_takes_the_next_batch_while_another_still_runs() -> None:
    """Two slots: a slow batch does not hold up the requests behind it."""
    slow_started, slow_release = asyncio.Event(), asyncio.Event()

    async def model(items: list[int]) -> list[int]:
        if items == [0]:
            slow_started.set()
            await slow_release.wait()
        return [i * 10 for i in items]

    batcher: Batcher[int, int] = Batcher(model, max_batch_size=1, max_wait_ms=0, max_queue=100,
                                         max_concurrent_batches=2)
    slow = batcher.submit(0, timeout_s=30)
    await slow_started.wait()
    quick = [batcher.submit(i, timeout_s=30) for i in (1, 2, 3)]
    assert await asyncio.wait_for(asyncio.gather(*(p.future for p in quick)), 5) == [10, 20, 30]
    assert not slow.future.done()
    slow_release.set()
    assert await slow.future == 0
    await batcher.close()


async def test_close_fails_every_running_batch_and_frees_its_slot() -> None:
    model = GatedModel()
    batcher = make(model, dispatch="eager", max_batch_size=1, max_concurrent_batches=2)
    pending = [batcher.submit(i, timeout_s=30) for i in range(4)]
    await until(lambda: model.running == 2)
    await batcher.close(grace_s=0.05)
    for p in pending:
        assert isinstance(p.future.exception(), NotReady)  # the two running and the two queued
    assert model.running == 0


async def test_a_full_queue_counts_a_batch_for_each_free_slot() -> None:
    model = GatedModel()
    batcher = make(model, dispatch="eager", max_batch_size=2, max_queue=1, max_concurrent_batches=2)
    accepted = [batcher.submit(i, timeout_s=30) for i in range(5)]  # 2 + 2 for the free slots, 1 queued
    with pytest.raises(Overloaded):
        batcher.submit(5, timeout_s=30)
    model.release.set()
    assert await asyncio.gather(*(p.future for p in accepted)) == [0, 10, 20, 30, 40]
    await batcher.close()


@pytest.mark.parametrize("bad", [{"max_batch_size": 0}, {"max_queue": 0}, {"max_concurrent_batches": 0}])
async def test_rejects_nonsense_limits(bad: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        make(FakeModel(), **bad)
