"""Does a public server's memory stay flat? One gradio_client visitor against `python app.py --host 0.0.0.0`
(what --share configures: the link itself cannot be reached offline).

Prints the server's RSS after its first good run, then after 100 failed model loads and 50 good runs
(10 steps each, every tab); exits 1 when the last figure is more than 100 MB above the first. The failed
loads are the adversarial pass's: a 100 MB .pt of no known layout under six spellings of its path,
models that claim 1024 px or too many parameters, a model uploaded through Gradio's upload route and
loaded by its temp path, missing paths, an offline Hub model, a name not in the list. They need model
paths, so the server runs with ILVR_ALLOW_MODEL_PATHS=1 (the operator's opt-in: the worst case);
--paths-off keeps the default of a public server, where every path is refused.

    OMP_NUM_THREADS=1 python benchmarks/app_memory.py            # a few minutes on a small CPU
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EX = ROOT / "examples"
MODEL = "emoji64"
STEPS = "10"
LIMIT_MB = 100


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def start_server(workdir: Path, allow_paths: bool) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "GRADIO_ANALYTICS_ENABLED": "False",
           "HF_HUB_OFFLINE": "1", "ILVR_CACHE": str(workdir / "hub"), "ILVR_APP_OUTPUTS": str(workdir / "outputs"),
           "PYTHONUNBUFFERED": "1", "ILVR_ALLOW_MODEL_PATHS": "1" if allow_paths else "0"}
    log = open(workdir / "app.log", "w")
    proc = subprocess.Popen([sys.executable, "app.py", "--host", "0.0.0.0", "--port", str(port)], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"app.py exited:\n{(workdir / 'app.log').read_text()}")
        try:
            with urllib.request.urlopen(url + "config", timeout=5):
                return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("app.py did not start")


def bad_models(folder: Path) -> dict[str, Path]:
    """Model files a visitor might point the server at."""
    import torch

    from ilvr.network import UNet, UNetConfig
    from ilvr.schedule import DiffusionConfig
    from ilvr.train import export_model

    junk = folder / "junk.pt"
    torch.save({"not.a.layer": torch.randn(25_000_000)}, junk)  # 100 MB, no known layout
    tiny = dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), num_head_channels=32)
    export_model(UNet(UNetConfig(image_size=1024, **tiny)), DiffusionConfig(), folder / "big1024")
    (folder / "sub").mkdir()
    (folder / "alias.pt").symlink_to(junk)
    return {"junk": junk, "big": folder / "big1024"}


def upload(url: str, path: Path) -> str:
    import httpx

    with open(path, "rb") as f:
        return httpx.post(url + "gradio_api/upload", files={"files": (path.name, f)}, timeout=120).json()[0]


def good_runs(client, count: int, seed0: int) -> None:
    from gradio_client import handle_file

    cat, frog = handle_file(EX / "twemoji_cat_face.png"), handle_file(EX / "noto_fox.png")
    editor = {"background": handle_file(EX / "scribble_sunglasses_background.png"),
              "layers": [handle_file(EX / "scribble_sunglasses_layer.png")],
              "composite": handle_file(EX / "scribble_sunglasses_composite.png"), "id": None}
    sketch = {"background": None, "layers": [handle_file(EX / "scribble_sunglasses_layer.png")],
              "composite": handle_file(EX / "paint_heart.png"), "id": None}
    calls = [
        lambda s: client.predict(MODEL, "", cat, 8, 2, STEPS, 0, "cubic", "ddpm", s, api_name="/translate"),
        lambda s: client.predict(MODEL, "", frog, "N sweep (Fig. 4)", "4, 16", 4, "0", 1, STEPS, 0, "cubic", "ddpm",
                                 s, api_name="/generate"),
        lambda s: client.predict(MODEL, "", "sketch pad", None, sketch, 16, 1, STEPS, 0, "cubic", "ddpm", s,
                                 api_name="/paint"),
        lambda s: client.predict(MODEL, "", editor, 2, True, 1, STEPS, 200, "cubic", "ddpm", s, api_name="/scribble"),
    ]
    for k in range(count):
        info = calls[k % len(calls)](seed0 + k)[3]
        assert "Done in" in info, info


def failed_loads(client, url: str, files: dict[str, Path], count: int) -> int:
    from gradio_client.exceptions import AppError

    junk, big = files["junk"], files["big"]
    uploaded = upload(url, big / "model.safetensors")
    spellings = [str(junk), f"{junk.parent}/./junk.pt", f"{junk.parent}/sub/../junk.pt", f" {junk} ",
                 str(junk.parent / "alias.pt"), f"{junk.parent}//junk.pt"]
    sources = [(MODEL, s) for s in spellings] + [
        (MODEL, str(big)), (MODEL, str(big / "model.safetensors")), (MODEL, uploaded),
        (MODEL, "/no/such/model-{}.pt"), ("cat-256 (Google DDPM, EMA)", ""), ("not a listed model", "")]
    failed = 0
    for k in range(count):
        choice, path = sources[k % len(sources)]
        try:
            client.predict(choice, path.format(k), api_name="/load_model")
        except AppError:
            failed += 1
    return failed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--paths-off", action="store_true", help="keep a public server's default: paths refused")
    parser.add_argument("--failed", type=int, default=100)
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from gradio_client import Client

    workdir = Path(tempfile.mkdtemp(prefix="ilvr-app-memory-"))
    proc = None
    try:
        files = bad_models(workdir)
        proc, url = start_server(workdir, allow_paths=not args.paths_off)
        client = Client(url, verbose=False)
        start = time.time()
        good_runs(client, 1, 0)
        first = rss_mb(proc.pid)
        print(f"server RSS after the first good run:             {first:7.0f} MB")
        failed = failed_loads(client, url, files, args.failed)
        after_failed = rss_mb(proc.pid)
        print(f"server RSS after {failed} failed loads:                {after_failed:7.0f} MB")
        good_runs(client, args.runs, 1)
        last = rss_mb(proc.pid)
        print(f"server RSS after {args.runs} more good runs ({STEPS} steps):   {last:7.0f} MB")
        growth = last - first
        log = (workdir / "app.log").read_text()
        print(f"growth: {growth:+.0f} MB (limit {LIMIT_MB} MB); {time.time() - start:.0f} s; "
              f"tracebacks in the server log: {log.count('Traceback')}; "
              f"paths {'off' if args.paths_off else 'allowed (ILVR_ALLOW_MODEL_PATHS=1)'}")
        if failed != args.failed:
            print(f"expected {args.failed} failed loads, got {failed}")
            return 1
        return 0 if growth <= LIMIT_MB else 1
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
