"""The inference thread and the engine, with fake numpy backends: errors, shutdown, restarts."""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import numpy as np
import pytest

from resnet_serve import inference
from resnet_serve.errors import InferenceFailed, NotReady
from resnet_serve.inference import Engine, InferenceThread, ModelInfo
from resnet_serve.settings import Settings
from resnet_serve.spec import RESNET18
from resnet_serve.weights import WeightsInfo


class FakeBackend:
    """Doubles its input (any shape), as a backend would answer probabilities."""

    runtime, device, precision, warmup_rounds, warmup_every_size, instances = "fake", "cpu", "fp32", 1, True, 1

    def prepare_thread(self) -> None:
        pass

    def run(self, pixels: np.ndarray) -> np.ndarray:
        return pixels * 2


class Fragile(FakeBackend):
    """Raises on a batch whose first value is negative."""

    def run(self, pixels: np.ndarray) -> np.ndarray:
        if pixels.flat[0] < 0:
            raise ValueError("negative")
        return pixels * 2


class Killer(FakeBackend):
    """Kills the thread that runs it (a BaseException, as a fault in the runtime would)."""

    def run(self, pixels: np.ndarray) -> np.ndarray:
        if pixels.flat[0] < 0:
            raise SystemExit("injected fault")
        return pixels * 2


def info(name: str) -> ModelInfo:
    spec = dataclasses.replace(RESNET18, name=name)
    return ModelInfo(spec, 1, "cpu", "fp32", WeightsInfo("random-init", None, None), 1)


def test_an_exception_fails_that_job_only_and_the_thread_lives_on() -> None:
    thread = InferenceThread(Fragile())
    bad = thread.submit([np.array([-1.0])])
    good = thread.submit([np.array([3.0])])
    with pytest.raises(ValueError):
        bad.result(timeout=10)
    assert good.result(timeout=10)[0].item() == 6.0
    assert thread.alive
    thread.close(timeout=10)
    assert not thread.alive


def test_close_finishes_queued_jobs_then_refuses_new_ones() -> None:
    thread = InferenceThread(Fragile())
    queued = [thread.submit([np.array([float(i)])]) for i in range(5)]
    thread.close(timeout=10)
    assert [f.result(timeout=1)[0].item() for f in queued] == [0.0, 2.0, 4.0, 6.0, 8.0]
    with pytest.raises(NotReady):
        thread.submit([np.array([1.0])]).result(timeout=1)


def test_the_thread_stacks_a_batch_and_a_lone_image_is_not_copied() -> None:
    seen: list[np.ndarray] = []

    class Recorder(FakeBackend):
        def run(self, pixels: np.ndarray) -> np.ndarray:
            seen.append(pixels)
            return pixels.reshape(len(pixels), -1).sum(axis=1, keepdims=True)

    thread = InferenceThread(Recorder())
    images = [np.full((3, 2, 2), i, dtype=np.uint8) for i in range(3)]
    probs, elapsed = thread.submit(images).result(timeout=10)
    assert probs.ravel().tolist() == [0, 12, 24] and elapsed >= 0
    thread.submit(images[:1]).result(timeout=10)
    thread.close(timeout=10)
    assert seen[0].shape == (3, 3, 2, 2)
    assert seen[1].shape == (1, 3, 2, 2) and np.shares_memory(seen[1], images[0])


class Meeting(FakeBackend):
    """Two instances: each call waits until the other has started, which one thread never does."""

    instances = 2

    def __init__(self) -> None:
        self.meeting = threading.Barrier(2, timeout=10)
        self.threads: set[str] = set()
        self.prepared: set[str] = set()
        self.workers: list[threading.Thread] = []

    def prepare_thread(self) -> None:
        self.prepared.add(threading.current_thread().name)
        self.workers.append(threading.current_thread())

    def run(self, pixels: np.ndarray) -> np.ndarray:
        self.threads.add(threading.current_thread().name)
        if pixels.flat[0] >= 0:
            self.meeting.wait()
        return pixels * 2


def test_instances_run_their_batches_at_once_each_on_a_thread_prepared_for_it() -> None:
    backend = Meeting()
    thread = InferenceThread(backend)
    futures = [thread.submit([np.array([float(i)])]) for i in range(6)]
    assert [f.result(timeout=20)[0].item() for f in futures] == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
    assert len(backend.threads) == 2 and backend.prepared == backend.threads
    thread.close(timeout=10)
    assert not thread.alive


class Killing(Meeting):
    def run(self, pixels: np.ndarray) -> np.ndarray:
        if pixels.flat[0] < 0:
            raise SystemExit("injected fault")
        return pixels * 2


def test_one_dead_instance_stops_them_all_and_no_job_hangs() -> None:
    backend = Killing()
    thread = InferenceThread(backend)
    futures = [thread.submit([np.array([v])]) for v in (-1.0, 1.0, 2.0, 3.0)]
    assert isinstance(futures[0].exception(timeout=10), NotReady)
    for future, v in zip(futures[1:], (1.0, 2.0, 3.0)):
        error = future.exception(timeout=10)  # run by the other instance, or failed: never left waiting
        assert isinstance(error, NotReady) if error else future.result()[0].item() == 2 * v
    for worker in backend.workers:
        worker.join(timeout=10)
    assert len(backend.workers) == 2 and not any(w.is_alive() for w in backend.workers)
    assert not thread.alive


async def test_an_engine_of_two_instances_restarts_both_after_one_died() -> None:
    engine = Engine(Killing(), info("killer"))
    try:
        with pytest.raises(NotReady):
            await engine.predict([np.array([-1.0])])
        assert not engine.alive
        assert [p.probs.item() for p in await engine.predict([np.array([4.0])])] == [8.0]
        assert engine.alive and engine.restarts == 1
    finally:
        engine.close()


class Outliving(FakeBackend):
    """Two instances: a batch of 100 holds its thread until released; -1 kills the other thread
    once that batch runs. Counts the calls running at once."""

    instances = 2

    def __init__(self) -> None:
        self.holding, self.release = threading.Event(), threading.Event()
        self.lock = threading.Lock()
        self.running = self.most = 0

    def run(self, pixels: np.ndarray) -> np.ndarray:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            if pixels.flat[0] < 0:
                self.holding.wait(10)
                raise SystemExit("injected fault")
            if pixels.flat[0] == 100:
                self.holding.set()
                self.release.wait(10)
            return pixels * 2
        finally:
            with self.lock:
                self.running -= 1


async def test_the_restarted_instances_wait_for_a_survivor_to_finish_its_batch() -> None:
    backend = Outliving()
    engine = Engine(backend, info("outliving"))
    try:
        held = asyncio.ensure_future(engine.predict([np.array([100.0])]))
        with pytest.raises(NotReady):
            await engine.predict([np.array([-1.0])])
        later = asyncio.ensure_future(engine.predict([np.array([3.0])]))  # on the restarted threads
        await asyncio.sleep(0.3)
        assert not later.done() and backend.running == 1  # the survivor still runs its batch alone
        backend.release.set()
        assert [p.probs.item() for p in await held] == [200.0]
        assert [p.probs.item() for p in await later] == [6.0]
        assert engine.restarts == 1 and backend.most == 2
    finally:
        backend.release.set()
        engine.close()


async def test_a_survivor_stuck_in_its_batch_is_waited_for_no_longer_than_the_bound(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(inference, "SURVIVOR_WAIT_S", 0.2)
    backend = Outliving()
    engine = Engine(backend, info("outliving"))
    try:
        held = asyncio.ensure_future(engine.predict([np.array([100.0])]))
        with pytest.raises(NotReady):
            await engine.predict([np.array([-1.0])])
        later = await engine.predict([np.array([3.0])])  # served beside the stuck survivor
        assert [p.probs.item() for p in later] == [6.0] and not held.done()
        assert "still runs its batch" in caplog.text
        backend.release.set()
        assert [p.probs.item() for p in await held] == [200.0]
    finally:
        backend.release.set()
        engine.close()


async def test_predict_splits_the_batch_and_reports_its_size() -> None:
    engine = Engine(FakeBackend(), info("double"))
    try:
        predictions = await engine.predict([np.array([1.0]), np.array([2.0]), np.array([3.0])])
        assert [p.probs.item() for p in predictions] == [2.0, 4.0, 6.0]
        assert {p.batch_size for p in predictions} == {3}
    finally:
        engine.close()


async def test_predict_reports_a_model_failure_as_inference_failed() -> None:
    engine = Engine(Fragile(), info("fragile"))
    try:
        with pytest.raises(InferenceFailed):
            await engine.predict([np.array([-1.0])])
        assert [p.probs.item() for p in await engine.predict([np.array([2.0])])] == [4.0]
    finally:
        engine.close()


async def test_a_dead_inference_thread_fails_its_jobs_and_is_restarted() -> None:
    engine = Engine(Killer(), info("killer"))
    try:
        fatal = asyncio.ensure_future(engine.predict([np.array([-1.0])]))
        queued = asyncio.ensure_future(engine.predict([np.array([5.0])]))
        for outcome in await asyncio.gather(fatal, queued, return_exceptions=True):
            assert isinstance(outcome, NotReady)  # 503, not a hang
        for _ in range(100):
            if not engine.alive:
                break
            await asyncio.sleep(0.01)
        assert not engine.alive
        assert [p.probs.item() for p in await engine.predict([np.array([2.0])])] == [4.0]
        assert engine.alive and engine.restarts == 1
    finally:
        engine.close()


@pytest.mark.parametrize(("every", "sizes"), [(True, [1, 2, 3, 4]), (False, [1])])
def test_warmup_runs_and_times_the_batch_sizes_the_runtime_needs(every: bool, sizes: list[int]) -> None:
    class Counting(FakeBackend):
        warmup_rounds, warmup_every_size = 2, every

        def __init__(self) -> None:
            self.batches: list[int] = []

        def run(self, pixels: np.ndarray) -> np.ndarray:
            self.batches.append(len(pixels))
            return pixels * 2

    backend = Counting()
    engine = Engine(backend, info("double"))
    try:
        engine.warmup(4, crop_size=4)
        assert sorted(engine.info.warmup_batch_ms) == sizes
        assert backend.batches == [n for n in sizes for _ in range(2)]
    finally:
        engine.close()


def test_a_batch_not_warmed_is_estimated_from_the_largest_that_was() -> None:
    timed = info("double")
    assert timed.batch_ms(4) is None
    timed.warmup_batch_ms.update({1: 10.0, 2: 16.0})
    assert timed.batch_ms(2) == 16.0 and timed.batch_ms(4) == 32.0
    settings = Settings(max_batch_size=4, request_timeout_s=1.0)
    assert settings.queue_limit(timed.batch_ms(4)) == 62  # (1000 ms / 2) / 32 ms = 15.6 batches of 4
