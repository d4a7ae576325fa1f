"""Run app.py in a subprocess on a free 127.0.0.1 port, for test_app.py and test_browser.py."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from ilvr.registry import BUNDLED, DEFAULT_MODEL  # noqa: E402

BUNDLED_WEIGHTS = BUNDLED[DEFAULT_MODEL].path / "model.safetensors"
NO_BUNDLED_MODEL = f"the bundled model is missing ({BUNDLED_WEIGHTS.relative_to(ROOT)})"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppServer:
    """``python app.py --port P`` with a quiet, offline, single-threaded environment. ``args`` replace
    ``--host 127.0.0.1`` (e.g. ``["--host", "0.0.0.0"]``: a public server, still reached on 127.0.0.1);
    ``extra_env`` adds to the environment."""

    def __init__(self, workdir: Path, startup_timeout_s: float = 180.0, args: list[str] | None = None,
                 extra_env: dict[str, str] | None = None):
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log_path = workdir / "app.log"
        env = dict(os.environ)
        env.update({
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",  # CI machines are small; threads only contend
            "GRADIO_ANALYTICS_ENABLED": "False",
            "HF_HUB_OFFLINE": "1",  # hub loads must fail fast and clearly, never download in tests
            "ILVR_CACHE": str(workdir / "hub"),
            "ILVR_APP_OUTPUTS": str(workdir / "outputs"),
            "PYTHONUNBUFFERED": "1",
            **(extra_env or {}),
        })
        self._log = open(self.log_path, "w")
        command = [sys.executable, "app.py", *(args or ["--host", "127.0.0.1"]), "--port", str(self.port)]
        self.proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self._wait(startup_timeout_s)

    def _wait(self, timeout_s: float) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"app.py exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + "config", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"app.py did not start within {timeout_s:.0f} s:\n{self.log()}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
