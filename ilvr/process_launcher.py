"""Starts the whole-run benchmark's child processes (``ilvr.whole_runs``) from a small process of its own.

Run as ``python -I process_launcher.py`` (isolated: the standard library only, no ilvr on sys.path).
Why a separate process: on Linux a child's peak RSS (``ru_maxrss``) includes the high-water mark of the
image its exec replaces, which is a copy of (or, with vfork, the same as) its parent's. A child started
by the benchmark itself, with torch and a model loaded, would report at least those few hundred MiB;
started from here, the floor is this process's 10 MiB.

Protocol: one JSON object per line on stdin, ``{"command", "env", "log", "timeout_s"}``; for each, one
line on stdout, ``{"wall_s", "cpu_s", "maxrss_kib", "returncode"}``. The child's output goes to `log`.
"""
import json
import os
import subprocess
import sys
import threading
import time


def run(job: dict) -> dict:
    with open(job["log"], "wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(job["command"], env=job["env"], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        killer = threading.Timer(job["timeout_s"], proc.kill)
        killer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            killer.cancel()
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait for it again
    kib = usage.ru_maxrss / 1024 if sys.platform == "darwin" else usage.ru_maxrss  # macOS reports bytes
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "maxrss_kib": kib,
            "returncode": proc.returncode}


if __name__ == "__main__":
    for line in sys.stdin:
        print(json.dumps(run(json.loads(line))), flush=True)
