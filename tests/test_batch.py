"""Folder translation (ilvr.batch): one process vs torchrun, resuming, batch size. CPU only, no network.

A tiny random 16 px model and 5 denoising steps keep this fast; torchrun runs use gloo on localhost.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ilvr.batch import (FAILED_EXIT_CODE, STOP_AFTER_ENV, STOP_EXIT_CODE, make_plan, output_bases,
                        shard)
from ilvr.cli import main
from ilvr.batch import derive_seed
from ilvr.images import read_settings
from ilvr.network import UNet, UNetConfig
from ilvr.schedule import DiffusionConfig
from ilvr.export import export_model

ROOT = Path(__file__).resolve().parents[1]
NUM = 2
GOOD = ["a.png", "b.jpg", "sub/c.png", "sub/deeper/d.bmp"]
BROKEN = "sub/broken.png"
EXPECTED = sorted(f"{ref.rsplit('.', 1)[0]}_{k}.png" for ref in GOOD for k in range(NUM))
DIST_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
             "TORCHELASTIC_RUN_ID", STOP_AFTER_ENV)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny random model and a nested folder of references with one truncated (corrupt) PNG."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("batch")
    torch.manual_seed(0)
    unet = UNet(UNetConfig(image_size=16, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                           attention_levels=(1,), num_head_channels=32))
    export_model(unet, DiffusionConfig(), base / "model")
    refs = base / "refs"
    rng = np.random.default_rng(0)
    for i, rel in enumerate(GOOD):
        (refs / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)).save(refs / rel)
    whole = (refs / "a.png").read_bytes()
    (refs / BROKEN).write_bytes(whole[: len(whole) // 2])  # valid header, truncated data
    (refs / ".hidden.png").write_bytes(whole)  # hidden files are not references
    (refs / "notes.txt").write_text("not an image")  # nor are non-image files
    (refs / "sub" / "Thumbs.db").write_bytes(b"\0" * 16)
    yield {"model": base / "model", "refs": refs, "base": base}
    torch.set_num_threads(threads)


def cli_args(world, out: Path, batch_size: int) -> list[str]:
    return ["sample", "--model", str(world["model"]), "--ref-dir", str(world["refs"]), "--out", str(out),
            "--num-samples", str(NUM), "--steps", "5", "--batch-size", str(batch_size), "--seed", "7"]


def run_here(world, out: Path, batch_size: int, capsys, monkeypatch) -> str:
    for var in DIST_VARS:
        monkeypatch.delenv(var, raising=False)
    assert main(cli_args(world, out, batch_size)) == FAILED_EXIT_CODE  # the broken reference fails every run
    captured = capsys.readouterr()
    return captured.out + captured.err


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
    env.update(extra)
    return env


def run_process(world, out: Path, batch_size: int, nproc: int = 1, **env: str) -> subprocess.CompletedProcess:
    if nproc == 1:
        launcher = [sys.executable, "-m", "ilvr"]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
                    "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "ilvr"]
    return subprocess.run(launcher + cli_args(world, out, batch_size), cwd=ROOT, env=child_env(**env),
                          capture_output=True, text=True, timeout=300)


def pngs(out: Path) -> list[str]:
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))


def leftovers(out: Path) -> list[str]:
    """Anything in the output folder that is not a finished PNG (temp files of interrupted writes)."""
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and
                  (p.name.startswith(".") or p.suffix != ".png"))


def assert_same_images(a: Path, b: Path) -> None:
    assert pngs(a) == pngs(b)
    for rel in pngs(a):
        x = np.asarray(Image.open(a / rel), dtype=np.int16)
        y = np.asarray(Image.open(b / rel), dtype=np.int16)
        assert x.shape == y.shape == (16, 16, 3)
        assert np.abs(x - y).max() <= 2, rel


@pytest.fixture(scope="module")
def baseline(world, tmp_path_factory):
    """One process, batch size 4: the reference output every other run must reproduce."""
    out = tmp_path_factory.mktemp("baseline") / "out"
    for var in DIST_VARS:
        os.environ.pop(var, None)
    assert main(cli_args(world, out, 4)) == FAILED_EXIT_CODE
    return out


# ----------------------------------------------------------------------------- whole runs

def test_one_process_translates_the_folder(world, baseline):
    assert pngs(baseline) == EXPECTED
    assert leftovers(baseline) == []
    for ref in GOOD:
        stem = ref.rsplit(".", 1)[0]
        for k in range(NUM):
            s = read_settings(baseline / f"{stem}_{k}.png")
            assert (s["reference"], s["index"], s["steps"], s["N"]) == (ref, k, "5", 2)
            assert s["seed"] == derive_seed(7, ref, k) and s["global_seed"] == 7
        first, second = (np.asarray(Image.open(baseline / f"{stem}_{k}.png")) for k in range(NUM))
        assert not np.array_equal(first, second)  # each sample has its own noise


def test_torchrun_two_processes_match_one_process(world, baseline, tmp_path):
    out = tmp_path / "out"
    proc = run_process(world, out, batch_size=3, nproc=2)
    log = proc.stdout + proc.stderr
    assert proc.returncode == FAILED_EXIT_CODE, log  # the broken reference: scripts must notice
    assert_same_images(baseline, out)  # same files, same pixels: no duplicate, none missing
    assert leftovers(out) == []
    assert BROKEN in log and "unreadable" in log
    assert f"done {len(EXPECTED)}, skipped 0, failed {NUM}" in log  # rank 0 reports the totals


@pytest.mark.parametrize("join", ["node_rank", "rendezvous"])
def test_torchrun_on_two_machines_sharing_the_output_folder(world, baseline, tmp_path, join):
    """The README's two-machine commands, both machines played by localhost (one process each, gloo)."""
    out = tmp_path / "out"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    machines = []
    for node in (0, 1):
        if join == "node_rank":
            how = ["--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port)]
        else:
            how = ["--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "portraits"]
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                    *how, "-m", "ilvr"]
        machines.append(subprocess.Popen(launcher + cli_args(world, out, 2), cwd=ROOT, env=child_env(),
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    for m in machines:
        try:
            logs.append(m.communicate(timeout=300)[0])
        finally:
            m.kill()
    assert [m.returncode for m in machines] == [FAILED_EXIT_CODE] * 2, "\n".join(logs)
    assert_same_images(baseline, out)  # each (reference, k) written once, by one of the machines
    assert leftovers(out) == []
    assert any(f"done {len(EXPECTED)}, skipped 0, failed {NUM}" in log for log in logs)  # global rank 0's totals


def test_batch_size_does_not_change_images(world, baseline, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    log = run_here(world, out, 1, capsys, monkeypatch)
    assert BROKEN in log
    assert_same_images(baseline, out)


def test_stopped_run_resumes_without_redoing(world, baseline, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    proc = run_process(world, out, batch_size=2, **{STOP_AFTER_ENV: "3"})
    assert proc.returncode == STOP_EXIT_CODE, proc.stdout + proc.stderr
    first = {rel: (out / rel).stat().st_mtime_ns for rel in pngs(out)}
    assert len(first) == 3
    stale = out / "sub" / ".c_0.png.4242.tmp"  # what a process killed inside save_png leaves behind
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"\x89PNG half")

    log = run_here(world, out, 2, capsys, monkeypatch)
    assert f"done {len(EXPECTED) - 3}, skipped 3" in log
    assert pngs(out) == EXPECTED
    assert {rel: (out / rel).stat().st_mtime_ns for rel in first} == first  # finished outputs untouched
    assert leftovers(out) == []
    assert_same_images(baseline, out)

    log = run_here(world, out, 2, capsys, monkeypatch)  # nothing left to do
    assert f"done 0, skipped {len(EXPECTED)}" in log


def test_torchrun_resumes_after_a_lost_process(world, baseline, tmp_path):
    out = tmp_path / "out"
    proc = run_process(world, out, batch_size=1, nproc=2, **{STOP_AFTER_ENV: "1"})
    assert proc.returncode != 0  # torchrun reports the dead worker and stops the other
    first = {rel: (out / rel).stat().st_mtime_ns for rel in pngs(out)}
    assert 1 <= len(first) < len(EXPECTED)

    proc = run_process(world, out, batch_size=2, nproc=2)
    assert proc.returncode == FAILED_EXIT_CODE, proc.stdout + proc.stderr
    assert f"skipped {len(first)}" in proc.stdout
    assert {rel: (out / rel).stat().st_mtime_ns for rel in first} == first
    assert leftovers(out) == []
    assert_same_images(baseline, out)


def test_other_settings_in_the_output_folder_are_flagged(world, baseline, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(baseline, out)
    for var in DIST_VARS:
        monkeypatch.delenv(var, raising=False)
    assert main(cli_args(world, out, 4) + ["--N", "4"]) == FAILED_EXIT_CODE
    log = capsys.readouterr().err
    assert "other settings" in log and "N: 2 on disk, 4 now" in log


def test_another_model_in_the_output_folder_is_flagged(world, baseline, tmp_path, capsys, monkeypatch):
    out, other = tmp_path / "out", tmp_path / "other-model"
    shutil.copytree(baseline, out)
    shutil.copytree(world["model"], other)
    for var in DIST_VARS:
        monkeypatch.delenv(var, raising=False)
    args = cli_args(world, out, 4)
    args[args.index("--model") + 1] = str(other)
    assert main(args) == FAILED_EXIT_CODE
    err = capsys.readouterr().err
    assert "other settings (model: " in err and "other-model' now" in err, err


def test_empty_reference_folder_is_an_error(world, tmp_path, capsys, monkeypatch):
    for var in DIST_VARS:
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".DS_Store").write_bytes(b"")
    (tmp_path / "empty" / "notes.txt").write_text("")
    assert main(["sample", "--model", str(world["model"]), "--ref-dir", str(tmp_path / "empty"),
                 "--out", str(tmp_path / "out"), "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert "holds no images to translate" in err and "ignored 1 non-image file)" in err, err
    assert not (tmp_path / "out").exists()  # the folder this failed command made is removed again


def test_non_image_files_are_ignored_and_a_clean_run_exits_0(world, tmp_path, capsys, monkeypatch):
    for var in DIST_VARS:
        monkeypatch.delenv(var, raising=False)
    refs = tmp_path / "refs"
    refs.mkdir()
    shutil.copy(world["refs"] / "a.png", refs / "a.png")
    (refs / "notes.txt").write_text("x")
    (refs / "Thumbs.db").write_bytes(b"\0")
    args = ["sample", "--model", str(world["model"]), "--ref-dir", str(refs), "--out", str(tmp_path / "out"),
            "--num-samples", "1", "--steps", "2"]
    assert main(args) == 0
    log = capsys.readouterr().out
    assert "1 reference x 1 samples" in log and "ignored 2 non-image files" in log
    assert "done 1, skipped 0, failed 0" in log
    assert main(args) == 0  # everything already done: still a success
    assert "done 0, skipped 1, failed 0" in capsys.readouterr().out


def test_failed_references_give_exit_status_1(world, tmp_path, capsys, monkeypatch):
    for var in DIST_VARS:
        monkeypatch.delenv(var, raising=False)
    refs = tmp_path / "refs"
    refs.mkdir()
    (refs / "broken.png").write_bytes((world["refs"] / BROKEN).read_bytes())
    out = tmp_path / "out"
    assert main(["sample", "--model", str(world["model"]), "--ref-dir", str(refs), "--out", str(out),
                 "--num-samples", "2", "--steps", "2"]) == FAILED_EXIT_CODE
    captured = capsys.readouterr()
    assert "done 0, skipped 0, failed 2" in captured.out and "broken.png" in captured.err
    assert not out.exists()  # made by this failed command and left empty: removed


def test_references_that_are_not_regular_files_fail_alone(world, tmp_path, capsys, monkeypatch):
    """A broken link or a device under --ref-dir used to be left out silently (exit 0). FIFOs and
    unreadable folders: tests/test_security_cli.py."""
    for var in DIST_VARS:
        monkeypatch.delenv(var, raising=False)
    refs = tmp_path / "refs"
    refs.mkdir()
    shutil.copy(world["refs"] / "a.png", refs / "a.png")
    (refs / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (refs / "zero.png").symlink_to("/dev/zero")
    out = tmp_path / "out"
    assert main(["sample", "--model", str(world["model"]), "--ref-dir", str(refs), "--out", str(out),
                 "--num-samples", "1", "--steps", "2"]) == FAILED_EXIT_CODE
    captured = capsys.readouterr()
    assert "done 1, skipped 0, failed 2 (2 unreadable references)" in captured.out, captured.out
    assert "gone.png: reference image not found" in captured.err, captured.err
    assert "zero.png is not a regular file (a character device)" in captured.err, captured.err
    assert (out / "a_0.png").is_file()


# ----------------------------------------------------------------------------- planning

@pytest.mark.parametrize("n", [0, 1, 7, 10, 23])
def test_shards_cover_every_unit_once(n):
    for world_size in range(1, 6):
        blocks = [list(shard(n, world_size, r)) for r in range(world_size)]
        assert sorted(u for b in blocks for u in b) == list(range(n))
        assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


def test_output_names_never_collide():
    refs = ["x.png", "x.jpg", "X.gif", "x_png.bmp", "dir/y.png", "noext", "a.b.png"]
    bases = output_bases(refs)
    assert len({b.casefold() for b in bases}) == len(refs)
    assert bases[4:] == ["dir/y", "noext", "a.b"]
    assert output_bases(["sub/a.png", "a.png"]) == ["sub/a", "a"]


def test_listing_skips_hidden_files_and_the_output_folder(world, tmp_path):
    refs = tmp_path / "refs"
    shutil.copytree(world["refs"], refs)
    (refs / "out" / "sub").mkdir(parents=True)
    (refs / "out" / "sub" / "a_0.png").write_bytes(b"")
    (refs / ".git").mkdir()
    (refs / ".git" / "x.png").write_bytes(b"")
    assert make_plan(refs, refs / "out", 1).refs == sorted(GOOD + [BROKEN])
    with pytest.raises(ValueError, match="must not be"):
        make_plan(refs, refs, 1)
    with pytest.raises(FileNotFoundError):
        make_plan(tmp_path / "missing", tmp_path / "o", 1)
