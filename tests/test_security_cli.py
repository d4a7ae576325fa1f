"""Hostile inputs on the command line: folders the process cannot read, files that are not regular files
(FIFOs, devices), and pickles that would run code. CPU only, offline.

Commands run in child processes with a time limit, so a regression that blocks (a FIFO opened for
reading waits for a writer forever) fails the test instead of hanging the suite.

Unreadable folders as root (CI runs the tests as root, and root reads a chmod 000 folder through its
CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH capabilities): the child is started without those two
capabilities (``setpriv`` from util-linux drops them from its bounding and inheritable sets, so the
command it execs never gets them back; without setpriv, the same is done with prctl(PR_CAPBSET_DROP)
before the exec). The files stay root's own and readable by their owner; only the chmod 000 folder is
not. Each test first checks that the child really cannot list that folder.
"""
from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_TRAIN_FLAGS, noise_images
from ilvr.loading import ModelLoadError, load_model

ROOT = Path(__file__).resolve().parent.parent
TIME_LIMIT_S = 120  # generous for a busy machine; the old code never returned at all on a FIFO
DROPPED_CAPS = "-dac_read_search,-dac_override"

# run a command without CAP_DAC_OVERRIDE (1) and CAP_DAC_READ_SEARCH (2): prctl(PR_CAPBSET_DROP = 24), then exec
_DROP_CAPS = ("import ctypes, os, sys\n"
              "libc = ctypes.CDLL(None, use_errno=True)\n"
              "for cap in (1, 2):\n"
              "    if libc.prctl(24, cap, 0, 0, 0) != 0:\n"
              "        raise OSError(ctypes.get_errno(), 'prctl(PR_CAPBSET_DROP) failed')\n"
              "os.execvp(sys.argv[1], sys.argv[1:])\n")


def without_read_override(cmd: list[str]) -> list[str]:
    """cmd, run so that file permissions bind it even when the tests run as root."""
    if os.geteuid() != 0:
        return cmd
    setpriv = shutil.which("setpriv")
    if setpriv:
        return [setpriv, f"--inh-caps={DROPPED_CAPS}", f"--bounding-set={DROPPED_CAPS}", "--", *cmd]
    return [sys.executable, "-c", _DROP_CAPS, *cmd]


def run_cli(args: list[str], unprivileged: bool = False) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "ilvr", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "ILVR_CPU_BACKEND": "torch",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(without_read_override(cmd) if unprivileged else cmd, cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=TIME_LIMIT_S)


@pytest.fixture(scope="module")
def model16(tmp_path_factory) -> Path:
    from ilvr.network import UNet, UNetConfig
    from ilvr.schedule import DiffusionConfig
    from ilvr.export import export_model

    torch.manual_seed(0)
    unet = UNet(UNetConfig(image_size=16, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                           attention_levels=(1,), num_head_channels=32))
    return export_model(unet, DiffusionConfig(), tmp_path_factory.mktemp("model16") / "model").parent


def png(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def locked(tmp_path):
    """lock(folder): chmod 000 it, and check that an unprivileged child cannot list it; restored after."""
    folders: list[Path] = []

    def lock(folder: Path) -> Path:
        folder.chmod(0)
        folders.append(folder)
        probe = subprocess.run(without_read_override([sys.executable, "-c", "import os, sys; os.listdir(sys.argv[1])",
                                                      str(folder)]), capture_output=True, text=True, timeout=60)
        assert probe.returncode != 0 and "PermissionError" in probe.stderr, (
            f"the child process could still read a chmod 000 folder, so this test would prove nothing: {probe}")
        return folder

    yield lock
    for folder in folders:
        folder.chmod(0o755)


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


# ----------------------------------------------------------------------------- unreadable folders

def test_an_unreadable_folder_under_ref_dir_fails_the_run_and_is_named(model16, tmp_path, locked):
    refs = tmp_path / "refs"
    png(refs / "a.png")
    png(refs / "secret" / "b.png", seed=1)
    locked(refs / "secret")
    out = tmp_path / "out"
    proc = run_cli(["sample", "--model", model16, "--ref-dir", refs, "--out", out, "--num-samples", "1",
                    "--steps", "2", "--device", "cpu"], unprivileged=True)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # the old code: 0, and b.png silently left out
    assert "cannot read folder secret/ (Permission denied)" in proc.stderr, proc.stderr
    assert "1 unreadable folder" in proc.stdout, proc.stdout  # in the summary too
    assert (out / "a_0.png").is_file()  # the readable references are still made


def test_an_unreadable_folder_under_train_data_is_refused_before_training(tmp_path, locked):
    data = noise_images(tmp_path / "data", [(20, 20)] * 2)
    noise_images(data / "more", [(20, 20)])
    locked(data / "more")
    out = tmp_path / "model"
    proc = run_cli(["train", "--data", data, "--out", out, *TINY_TRAIN_FLAGS, "--batch-size", "2", "--steps", "1",
                    "--sample-every", "0", "--device", "cpu"], unprivileged=True)
    assert proc.returncode == 2, proc.stdout + proc.stderr  # the old code trained on the other images
    err = one_line(proc.stderr)
    assert "cannot read folder more/ (Permission denied) under the training data folder" in err, err
    assert "refusing to go on without its images" in err, err
    assert not out.exists()  # nothing trained, and the folder this command made is gone again


# ----------------------------------------------------------------------------- FIFOs and devices

def test_a_fifo_reference_or_mask_is_an_error_at_once(model16, tmp_path):
    fifo = tmp_path / "ref.png"
    os.mkfifo(fifo)
    good = png(tmp_path / "good.png")
    for args in (["--ref", fifo], ["--ref", good, "--mask", fifo]):
        out = tmp_path / "out"
        proc = run_cli(["sample", "--model", model16, *args, "--out", out, "--steps", "2", "--device", "cpu"])
        assert proc.returncode == 2
        err = one_line(proc.stderr)
        assert f"{fifo} is not a regular file (a FIFO" in err, err
        assert not out.exists()  # failed before making --out


def test_fifo_entries_of_a_reference_folder_fail_alone(model16, tmp_path):
    refs = tmp_path / "refs"
    png(refs / "a.png")
    os.mkfifo(refs / "pipe.png")
    out = tmp_path / "out"
    proc = run_cli(["sample", "--model", model16, "--ref-dir", refs, "--out", out, "--num-samples", "1",
                    "--steps", "2", "--device", "cpu"])
    assert proc.returncode == 1, proc.stdout + proc.stderr  # the old code skipped it silently: 0
    assert "pipe.png" in proc.stderr and "is not a regular file (a FIFO" in proc.stderr, proc.stderr
    assert (out / "a_0.png").is_file()

    eval_refs = tmp_path / "eval_refs"
    png(eval_refs / "a.png")
    os.mkfifo(eval_refs / "b.png")
    proc = run_cli(["eval", "--model", model16, "--refs", eval_refs, "--data", refs, "--device", "cpu"])
    assert proc.returncode == 2
    assert "b.png is not a regular file (a FIFO" in one_line(proc.stderr)


def test_a_fifo_in_the_training_data_is_reported(tmp_path):
    data = noise_images(tmp_path / "data", [(20, 20)] * 2)
    os.mkfifo(data / "pipe.png")
    proc = run_cli(["train", "--data", data, "--out", tmp_path / "model", *TINY_TRAIN_FLAGS, "--batch-size", "2",
                    "--steps", "1", "--sample-every", "0", "--device", "cpu"])
    assert proc.returncode == 0, proc.stderr
    assert "skipped 1 file(s) that could not be used:" in proc.stdout and "pipe.png is not a regular file" in proc.stdout


def test_models_that_are_fifos_or_devices_are_named_as_such(model16, tmp_path):
    fifo = tmp_path / "model.pt"
    os.mkfifo(fifo)
    zero = tmp_path / "zero.safetensors"
    zero.symlink_to("/dev/zero")
    folder = tmp_path / "folder"
    folder.mkdir()
    os.mkfifo(folder / "model.safetensors")
    ref = png(tmp_path / "ref.png")
    for model, kind in ((fifo, "a FIFO"), (zero, "a character device"), (folder, "a FIFO")):
        for args in (["info", model], ["convert", model, "--out", tmp_path / "converted"],
                     ["sample", "--model", model, "--ref", ref, "--out", tmp_path / "out", "--device", "cpu"]):
            proc = run_cli(args)
            assert proc.returncode == 2, (args, proc.stderr)
            err = one_line(proc.stderr)
            assert "is not a regular file" in err and kind in err and "not found" not in err, err
            assert not (tmp_path / "converted").exists() and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- pickles that run code

class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("how", ["torch.save", "pickle-protocol-2", "pickle-protocol-4"])
def test_a_pickle_that_calls_os_system_is_refused_and_named(tmp_path, how):
    marker = tmp_path / "MARKER"
    payload = {"weight": torch.zeros(1), "x": _Payload(marker)}
    evil = tmp_path / "evil.pt"
    if how == "torch.save":
        torch.save(payload, evil)
    else:
        evil.write_bytes(pickle.dumps(payload, protocol=int(how[-1])))
    with pytest.raises(ModelLoadError) as refused:
        load_model(evil, device="cpu")
    message = str(refused.value)
    assert not marker.exists()  # nothing ran
    assert "posix.system" in message or "os.system" in message, message
    assert "python -m ilvr convert" in message, message
    assert "Re-running" not in message and "weights_only" not in message, message  # torch's advice is not quoted
    proc = run_cli(["info", evil])
    assert proc.returncode == 2 and "system" in one_line(proc.stderr)
    assert not marker.exists()

    live = tmp_path / "LIVE"  # the payload is real: a plain unpickle runs it
    pickle.loads(pickle.dumps(_Payload(live)))
    assert live.exists()
