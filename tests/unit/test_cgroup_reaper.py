"""The reaper removes finished commands' cgroups off the event loop, retrying busy ones."""

import threading
import time

from corral.runtime.cgroup_reaper import CgroupReaper


def wait_for(check, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.01)
    return False


def test_removals_run_in_one_thread_and_busy_ones_are_retried():
    reaper = CgroupReaper(interval=0.01, retry_after=0.05)
    threads, done = set(), []
    busy_left = [3]

    def quick(name):
        def removal():
            threads.add(threading.current_thread().name)
            done.append(name)
            return True
        return removal

    def busy():
        busy_left[0] -= 1
        if busy_left[0] > 0:
            return False  # still populated
        done.append("busy")
        return True

    for i in range(50):
        reaper.add(quick(i))
    reaper.add(busy)
    assert wait_for(lambda: len(done) == 51)
    assert threads == {"cgroup-reaper"}
    assert reaper.pending() == 0
    reaper.close()


def test_a_failing_removal_does_not_stop_the_others():
    reaper = CgroupReaper(interval=0.01)
    done = []

    def broken():
        raise OSError("boom")

    reaper.add(broken)
    reaper.add(lambda: done.append(1) or True)
    assert wait_for(lambda: done == [1])
    reaper.close()
    assert reaper.pending() == 0


def test_close_runs_what_is_left():
    reaper = CgroupReaper(interval=5.0)  # the thread would wait long: close does the work
    done = []
    reaper.add(lambda: done.append(1) or True)
    reaper.close(timeout=0.1)
    assert done == [1]
