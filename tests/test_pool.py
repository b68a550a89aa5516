"""DistributedPool gives what multiprocessing.Pool gives, on ``local`` and the sshd fleet."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time

import psutil
import pytest

from joblib_cloud import AbortedError, DistributedPool


def square(x: int) -> int:
    return x * x


def power(base: int, exp: int) -> int:
    return base**exp


def fails_on_7(x: int) -> int:
    if x == 7:
        raise ValueError(f"bad item {x}")
    return x + 100


def with_pid(x: int) -> tuple[int, int]:
    return x, os.getpid()


def add(a: int, b: int = 0, *, c: int = 0) -> int:
    return a + b + c


def sleepy(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def outcomes(iterator) -> list:
    """Every value or exception an imap-style iterator produces, until it stops."""
    out = []
    while True:
        try:
            out.append(("ok", next(iterator)))
        except StopIteration:
            return out
        except Exception as exc:  # noqa: BLE001 - what we compare
            out.append(("error", type(exc), exc.args))


def run_all(pool) -> dict:
    """The same calls on either kind of pool; results in comparable form."""
    out: dict = {}
    out["map"] = pool.map(square, range(23))
    out["map_chunked"] = pool.map(square, range(23), chunksize=5)
    out["map_empty"] = pool.map(square, [])
    out["imap"] = outcomes(iter(pool.imap(square, range(12))))
    out["imap_chunked"] = outcomes(iter(pool.imap(square, range(12), chunksize=4)))
    out["imap_unordered"] = sorted(pool.imap_unordered(square, range(12)))
    out["starmap"] = pool.starmap(power, [(2, 3), (3, 2), (10, 0), (5, 3)])
    out["imap_error"] = outcomes(iter(pool.imap(fails_on_7, range(10))))
    out["imap_chunked_error"] = outcomes(iter(pool.imap(fails_on_7, range(10), chunksize=3)))
    out["imap_unordered_error"] = sorted(outcomes(iter(pool.imap_unordered(
        fails_on_7, range(10)))), key=repr)
    try:
        pool.map(fails_on_7, range(10), chunksize=2)
    except Exception as exc:  # noqa: BLE001
        out["map_error"] = (type(exc), exc.args)
    try:
        pool.starmap(power, [(2, 1), ("x", 2)])
    except Exception as exc:  # noqa: BLE001
        out["starmap_error"] = (type(exc), exc.args)
    got: list = []
    errors: list = []
    ok = pool.apply_async(add, (1, 2), {"c": 3}, callback=got.append,
                          error_callback=errors.append)
    bad = pool.apply_async(fails_on_7, (7,), callback=got.append,
                           error_callback=errors.append)
    ok.wait(60)
    bad.wait(60)
    out["apply_ok"] = (ok.ready(), ok.successful(), ok.get(5))
    try:
        bad.get(5)
    except Exception as exc:  # noqa: BLE001
        out["apply_error"] = (bad.ready(), bad.successful(), type(exc), exc.args)
    deadline = time.monotonic() + 10  # callbacks run on a result thread in both pools
    while (not got or not errors) and time.monotonic() < deadline:
        time.sleep(0.01)
    out["callbacks"] = (got, [(type(e), e.args) for e in errors])
    out["apply"] = pool.apply(add, (4,), {"b": 5})
    out["map_async"] = pool.map_async(square, range(5)).get(60)
    return out


@pytest.fixture(scope="module")
def expected() -> dict:
    with multiprocessing.get_context("fork").Pool(2) as pool:
        return run_all(pool)


def test_results_and_errors_match_multiprocessing_pool(cloud_kwargs, expected):
    with DistributedPool(**cloud_kwargs) as pool:
        got = run_all(pool)
    assert got == expected
    # The things compared are not trivially equal (e.g. both empty).
    assert got["map_error"] == (ValueError, ("bad item 7",))
    assert ("error", ValueError, ("bad item 7",)) in got["imap_error"]
    assert got["imap_error"][-1] == ("ok", 109)  # imap goes on after a failed item


def test_remote_traceback_is_attached(cloud_kwargs):
    with DistributedPool(**cloud_kwargs) as pool, pytest.raises(ValueError) as info:
        pool.map(fails_on_7, [7])
    assert "fails_on_7" in str(info.value.__cause__)
    assert "Traceback on host" in str(info.value.__cause__)


def test_chunksize_groups_items_in_one_process(cloud_kwargs):
    with DistributedPool(**cloud_kwargs) as pool:
        results = pool.map(with_pid, range(8), chunksize=4)
        assert [x for x, _ in results] == list(range(8))
        assert len({pid for _, pid in results[:4]}) == 1
        assert len({pid for _, pid in results[4:]}) == 1
        assert all(pid != os.getpid() for _, pid in results)
        with pytest.raises(ValueError, match="Chunksize"):
            pool.map(square, range(3), chunksize=0)


def test_close_join_and_states(cloud_kwargs):
    pool = DistributedPool(**cloud_kwargs)
    assert pool._processes >= 2
    results = [pool.apply_async(sleepy, (0.3,)) for _ in range(3)]
    with pytest.raises(ValueError, match="still running"):
        pool.join()
    pool.close()
    with pytest.raises(ValueError, match="not running"):
        pool.map(square, [1])
    pool.join()
    assert all(r.ready() and r.successful() for r in results)
    assert [r.get(0) for r in results] == [0.3] * 3
    pending = DistributedPool(**cloud_kwargs).apply_async(sleepy, (0.5,))
    with pytest.raises(ValueError, match="not ready"):
        pending.successful()
    with pytest.raises(TimeoutError):
        pending.get(timeout=0.01)
    assert pending.get(60) == 0.5


def mark_and_sleep(path: str, seconds: float) -> float:
    with open(path, "w") as fh:
        fh.write(str(os.getpid()))
    time.sleep(seconds)
    return seconds


def test_terminate_kills_running_tasks(cloud_kwargs, tmp_path):
    marker = tmp_path / "started"
    pool = DistributedPool(**cloud_kwargs)
    slow = pool.apply_async(mark_and_sleep, (str(marker), 120))
    deadline = time.monotonic() + 60
    while not (marker.exists() and marker.read_text()) and time.monotonic() < deadline:
        time.sleep(0.02)
    pid = int(marker.read_text())
    assert psutil.pid_exists(pid)
    started = time.monotonic()
    pool.terminate()
    with pytest.raises(AbortedError):
        slow.get(timeout=30)
    while psutil.pid_exists(pid) and time.monotonic() - started < 30:
        time.sleep(0.05)
    assert not psutil.pid_exists(pid), "the task's worker process was not killed"
    # The cluster stays usable for the next pool.
    with DistributedPool(**cloud_kwargs) as again:
        assert again.map(square, [3]) == [9]


def test_imap_yields_before_all_items_finish(cloud_kwargs):
    """imap is lazy in its results: the first item arrives while a slow one still runs."""
    with DistributedPool(**cloud_kwargs) as pool:
        iterator = pool.imap(sleepy, [0.0, 20.0])
        first_at = time.monotonic()
        assert iterator.next(timeout=15) == 0.0
        assert time.monotonic() - first_at < 15
        with pytest.raises(TimeoutError):
            iterator.next(timeout=0.05)


def init_worker(value: str) -> None:
    # State the tasks can see must outlive one task's unpickled globals: the environment.
    os.environ["POOL_INIT_VALUE"] = value
    count = int(os.environ.get("POOL_INIT_COUNT", "0")) + 1
    os.environ["POOL_INIT_COUNT"] = str(count)


def read_init(x: int) -> tuple[int, str | None, str | None]:
    return x, os.environ.get("POOL_INIT_VALUE"), os.environ.get("POOL_INIT_COUNT")


def test_initializer_runs_once_per_worker_process(cloud_kwargs):
    with multiprocessing.get_context("fork").Pool(2, init_worker, ("ready",)) as pool:
        expected = pool.map(read_init, range(8), chunksize=1)
    with DistributedPool(initializer=init_worker, initargs=("ready",),
                         **cloud_kwargs) as pool:
        got = pool.map(read_init, range(8), chunksize=1)
        again = pool.apply_async(read_init, (9,)).get(60)
    assert got == expected == [(i, "ready", "1") for i in range(8)]
    assert again == (9, "ready", "1")
    # A second pool on the same hosts runs its own initializer once more per process.
    with DistributedPool(initializer=init_worker, initargs=("second",),
                         **cloud_kwargs) as pool:
        values = pool.map(read_init, range(4), chunksize=1)
    assert {v for _, v, _ in values} == {"second"}
    with pytest.raises(ValueError, match="maxtasksperchild"):
        DistributedPool(maxtasksperchild=3, **cloud_kwargs)


def test_callback_runs_off_the_calling_thread(cloud_kwargs):
    seen: list = []
    done = threading.Event()
    with DistributedPool(**cloud_kwargs) as pool:
        pool.map_async(square, range(4), callback=lambda v: (seen.append(v), done.set()))
        assert done.wait(60)
    assert seen == [[0, 1, 4, 9]]


def test_a_slow_callback_does_not_stall_other_results():
    """Callbacks run on a pool thread, not on the thread that reads the host's results."""
    in_callback, gate = threading.Event(), threading.Event()

    def slow_callback(value):
        in_callback.set()
        gate.wait(60)

    with DistributedPool(provider="local", n=1, workers_per_host=2) as pool:
        first = pool.apply_async(square, (2,), callback=slow_callback)
        assert in_callback.wait(60)
        assert not first.ready()  # as multiprocessing: ready once its callback returned
        assert pool.map_async(square, range(4)).get(timeout=30) == [0, 1, 4, 9]
        gate.set()
        assert first.get(timeout=30) == 4


def test_unpicklable_argument_fails_the_call_clearly(cloud_kwargs):
    from joblib_cloud import TaskPicklingError

    with DistributedPool(**cloud_kwargs) as pool:
        with pytest.raises(TaskPicklingError, match="could not pickle .*square") as info:
            pool.map(square, [1, threading.Lock()], chunksize=1)
        assert isinstance(info.value.__cause__, TypeError)
        result = pool.apply_async(square, (threading.Lock(),))
        assert result.wait(30) is None and result.ready() and not result.successful()
        assert pool.map(square, [5]) == [25]  # the pool still works
