"""Folder translation: ``python -m ilvr sample --ref-dir DIR --out OUT``, on one process or many.

Every image file under DIR (recursively, sorted; images by suffix, ``ilvr.images.IMAGE_SUFFIXES``;
hidden files and folders skipped; other files counted and ignored) is a reference. Each reference
makes ``--num`` samples, written as ``OUT/<its folder>/<stem>_<k>.png`` with the sampling settings in
the PNG. A file Pillow cannot read (or one that is no regular file: a FIFO, a device, a broken link)
and a subfolder the process may not list are reported and skipped; the run goes on, and ends
with exit status 1 so that scripts notice (0 when every output was made or already on disk).

Scaling out: the same command under ``torchrun`` shards the work by rank over torch.distributed (gloo
on CPU, nccl on CUDA with one GPU per process, cuda:LOCAL_RANK). The work units are the
(reference, k) pairs whose output is not on disk yet; rank 0 lists them once and broadcasts the list,
and every rank takes one contiguous block of it, so no output is made twice or left out. Each
output's noise comes from its own seed, ``derive_seed(--seed, relative reference path, k)``, drawn on
the CPU (``ilvr.sampler``), so an image does not depend on the number of processes, the batch size
or the order of work (up to floating-point differences between batch shapes).

Resuming: outputs are written atomically (temp file, then rename), so every PNG on disk is complete;
a rerun skips them and makes only the rest. Leftover temp files of a killed run are removed.

Test hook: ``ILVR_STOP_AFTER=n`` makes each process exit abruptly (exit code 75, no summary, like a
killed run) right after writing its n-th image. It exists for the tests; do not use it otherwise.
"""
from __future__ import annotations

import hashlib
import os
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from tqdm import tqdm

from . import validate
from .distributed import AnotherRankFailed, Comm, agree
from .images import (IMAGE_SUFFIX_TEXT, ImageError, is_image_name, list_files, load_reference, plural, read_settings,
                     save_png, tensor_to_pil)
from .loading import load_model
from .registry import scaled_factor
from .sampler import check_unconditional, sample, settings_dict

STOP_AFTER_ENV = "ILVR_STOP_AFTER"  # test hook, see the module docstring
STOP_EXIT_CODE = 75
FAILED_EXIT_CODE = 1  # some references could not be read; the summary lists them
TEMP_NAME = re.compile(r"^\..+\.png\.\d+\.tmp$")  # what ilvr.images.save_png writes before its rename
MAX_LISTED_FAILURES = 50


# ----------------------------------------------------------------------------- planning (pure functions)

def derive_seed(seed: int, key: str, k: int) -> int:
    """A per-output seed from (global seed, reference key, sample index): the same image whatever the
    batch size, process count or order in which outputs are made."""
    digest = hashlib.sha256(f"{seed}|{key}|{k}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def output_bases(refs: Sequence[str]) -> list[str]:
    """For each reference, the output path without ``_<k>.png``: its folder and stem, e.g. 'a/b/x'.

    Two references with the same stem in one folder (x.png, x.jpg) would overwrite each other, so
    they get their extension in the name (x_png, x_jpg). Names are compared case-insensitively, as
    on macOS and Windows disks. k never contains '_', so distinct bases give distinct outputs.
    """
    stems = [r.rsplit(".", 1)[0] if "." in r.rsplit("/", 1)[-1] else r for r in refs]
    counts = Counter(s.casefold() for s in stems)
    first = [s if counts[s.casefold()] == 1 else s + "_" + r[len(s) + 1:] for s, r in zip(stems, refs)]
    taken = Counter(b.casefold() for b in first)
    seen: set[str] = set()
    out = []
    for base in first:
        name, i = base, 1
        while name.casefold() in seen or (name != base and name.casefold() in taken):
            name, i = f"{base}-{i}", i + 1
        seen.add(name.casefold())
        out.append(name)
    return out


def output_name(base: str, k: int) -> str:
    return f"{base}_{k}.png"


def shard(n: int, world: int, rank: int) -> range:
    """Rank's contiguous block of n work units: blocks differ in size by at most one, cover 0..n-1
    once, and keep the units of one reference together (at most two ranks share a reference)."""
    return range(n * rank // world, n * (rank + 1) // world)


def existing_files(out: Path) -> set[str]:
    """Relative POSIX paths of the files already in the output folder."""
    found: set[str] = set()
    if out.is_dir():
        for dirpath, _, filenames in os.walk(out):
            rel = Path(dirpath).relative_to(out)
            found.update((rel / f).as_posix() for f in filenames)
    return found


def remove_stale_temp_files(out: Path) -> int:
    """Delete the temp files a killed run left behind (never complete, never counted as done)."""
    removed = 0
    if out.is_dir():
        for dirpath, _, filenames in os.walk(out):
            for f in filenames:
                if TEMP_NAME.match(f):
                    try:
                        (Path(dirpath) / f).unlink()
                        removed += 1
                    except FileNotFoundError:  # another node sharing the folder got there first
                        pass
    return removed


@dataclass(frozen=True)
class Plan:
    refs: list[str]  # relative paths of all references
    bases: list[str]  # output base per reference
    pending: list[tuple[int, int]]  # (reference index, k) still to make, in order
    skipped: int  # outputs already on disk
    first_done: str | None  # one finished output, to compare its settings with this run's
    removed_temp: int
    ignored: int = 0  # non-image files under the reference folder
    unreadable: dict[str, str] = field(default_factory=dict)  # 'sub/folder/' -> why it could not be listed


def make_plan(ref_dir: Path, out: Path, num: int) -> Plan:
    if ref_dir.is_dir() and out.resolve() == ref_dir.resolve():
        raise ValueError("--out must not be the --ref-dir folder itself (outputs would become references)")
    removed = remove_stale_temp_files(out)
    unreadable: dict[str, str] = {}
    files = list_files(ref_dir, exclude=out, unreadable=unreadable)
    refs = [f for f in files if is_image_name(f)]
    if not refs:
        others = f"; ignored {plural(len(files), 'non-image file')}" if files else ""
        locked = f"; cannot read {unreadable_text(unreadable)}" if unreadable else ""
        raise ValueError(f"{ref_dir} holds no images to translate (images are {IMAGE_SUFFIX_TEXT}; "
                         f"hidden files and the --out folder are skipped{others}{locked})")
    bases = output_bases(refs)
    have = existing_files(out)
    pending, skipped, first_done = [], 0, None
    for i, base in enumerate(bases):
        for k in range(num):
            name = output_name(base, k)
            if name in have:
                skipped += 1
                first_done = first_done or name
            else:
                pending.append((i, k))
    return Plan(refs, bases, pending, skipped, first_done, removed, len(files) - len(refs), unreadable)


def unreadable_text(unreadable: dict[str, str], limit: int = 3) -> str:
    """'folder a/ (Permission denied), b/ (...) and 2 more': the folders list_files could not read."""
    shown = [f"{rel} ({why})" for rel, why in sorted(unreadable.items())[:limit]]
    more = f" and {len(unreadable) - limit} more" if len(unreadable) > limit else ""
    return f"folder{'s' if len(unreadable) > 1 else ''} {', '.join(shown)}{more}"


# ----------------------------------------------------------------------------- processes

# ----------------------------------------------------------------------------- the run

def _settings_differ(old: dict, new: dict) -> list[str]:
    keys = ("model", "model_options", "N", "filter", "steps", "stop_at", "sampler", "image_size", "global_seed")
    diff = [f"{k}: {old.get(k)!r} on disk, {new.get(k)!r} now" for k in keys if old.get(k) != new.get(k)]
    if old.get("weights_sha256") and old["weights_sha256"] != new.get("weights_sha256"):  # retrained or replaced
        diff.append(f"weights_sha256: {old['weights_sha256']} on disk, {new.get('weights_sha256')} now")
    return diff


def run_folder(args, load_options: dict[str, object] | None = None) -> int:
    """The ``--ref-dir`` mode of ``python -m ilvr sample`` (see the module docstring)."""
    comm = Comm(args.device)
    try:
        return _run(args, comm, load_options or {})
    except AnotherRankFailed as e:
        print(comm.say(f"error: {e}"), file=sys.stderr)
        return 2
    finally:
        comm.close()


def _run(args, comm: Comm, load_options: dict[str, object]) -> int:
    if args.unconditional:
        raise ValueError("--unconditional cannot be combined with --ref-dir")
    ref_dir, out = Path(args.ref_dir), Path(args.out)
    stop_after = int(os.environ.get(STOP_AFTER_ENV, "0") or 0)

    # Every process loads the model; the first on each machine goes first so a Hub download is shared.
    model, error = None, None
    for turn in (0, 1):
        if (comm.local_rank == 0) == (turn == 0):
            try:
                model = load_model(args.model, device=comm.device, dtype=args.dtype, **load_options)
                if args.compile:
                    model.compile(args.compile_mode)
                check_unconditional(model)
                validate.steps(args.steps, model.diffusion.num_train_timesteps)
                n = validate.n_factor(args.n_factor or scaled_factor("translation", model.image_size), model.image_size)
                validate.kernel(args.filter)
                validate.stop_step(args.stop_at, model.diffusion.num_train_timesteps, "--stop-at")
            except Exception as e:  # reported by this rank, re-raised below once every rank knows
                error = e
        comm.barrier()
    agree(comm, error)
    assert model is not None
    size = model.image_size
    steps_per_sample = len(model.schedule.respace(args.steps).timestep_map)

    def settings_for(rel: str, k: int, seed: int) -> dict:
        return settings_dict(model, n_factor=n, kernel=args.filter, steps=args.steps, stop_at=args.stop_at,
                             sampler=args.sampler, seed=seed, reference=rel, index=k, global_seed=args.seed)

    # Rank 0 lists the work once; every rank gets the same list.
    plan: Plan | tuple[bool, str] | None = None
    if comm.rank == 0:
        try:
            plan = make_plan(ref_dir, out, args.num)
        except (OSError, ValueError) as e:
            plan = (isinstance(e, FileNotFoundError), str(e))
    plan = comm.broadcast(plan)
    if isinstance(plan, tuple):
        raise (FileNotFoundError if plan[0] else ValueError)(plan[1])
    assert isinstance(plan, Plan)

    total = len(plan.pending)
    if comm.rank == 0:
        procs = f", {comm.world} process{'es' if comm.world > 1 else ''} over {comm.backend}" if comm.enabled else ""
        print(f"{plural(len(plan.refs), 'reference')} x {args.num} samples: {total} to make, {plan.skipped} already in {out}"
              f" (batch size {args.batch_size}{procs}, device {comm.device.type})", flush=True)
        if plan.ignored:
            print(f"ignored {plural(plan.ignored, 'non-image file')} in {ref_dir} (images are {IMAGE_SUFFIX_TEXT})",
                  flush=True)
        if plan.removed_temp:
            print(f"removed {plan.removed_temp} unfinished temp file(s) of an interrupted run", flush=True)
        for rel, why in sorted(plan.unreadable.items())[:MAX_LISTED_FAILURES]:
            print(f"warning: cannot read folder {rel} ({why}) in {ref_dir}: its images are left out, and the run "
                  f"will end with exit status {FAILED_EXIT_CODE}", file=sys.stderr, flush=True)
        if plan.first_done:
            try:
                old = read_settings(out / plan.first_done)
                diff = _settings_differ(old, settings_for("", 0, 0))
            except (OSError, ValueError):
                diff = []
            if diff:
                print(f"warning: {out} already holds outputs made with other settings ({'; '.join(diff)}); "
                      "they are kept and skipped. Use a new --out to make them with these settings.",
                      file=sys.stderr, flush=True)

    mine = [plan.pending[i] for i in shard(total, comm.world, comm.rank)]
    failures: dict[str, str] = {}  # reference -> reason, as seen by this rank
    cache: dict[int, torch.Tensor | None] = {}  # the current reference only: units come grouped by reference

    def reference(i: int) -> torch.Tensor | None:
        if i not in cache:
            cache.clear()
            rel = plan.refs[i]
            try:
                cache[i] = load_reference(ref_dir / rel, size, model.config.in_channels)
            except Exception as e:  # Pillow raises many kinds on broken files; none may stop the run
                cache[i] = None
                failures[rel] = str(e) if isinstance(e, (ImageError, OSError)) else f"{type(e).__name__}: {e}"
                tqdm.write(comm.say(f"skipping {rel}: {failures[rel]}"), file=sys.stderr)
        return cache[i]

    position = 0
    done = failed = 0

    def next_batch() -> list[tuple[int, int, torch.Tensor]]:
        nonlocal position, failed
        batch = []
        while len(batch) < args.batch_size and position < len(mine):
            i, k = mine[position]
            position += 1
            ref = reference(i)
            if ref is None:
                failed += 1
            else:
                batch.append((i, k, ref))
        return batch

    bar = tqdm(total=total * steps_per_sample, desc="translating", unit="img-step", disable=comm.rank != 0,
               dynamic_ncols=True, mininterval=0.5)
    start = time.time()
    # Lock step: one tiny all-reduce per round gives rank 0 the global counts for its bar, and every
    # rank keeps taking part until all are out of work.
    while True:
        batch = next_batch()
        round_images, done_all, failed_all = comm.sum([len(batch), done, failed])
        bar.n = (done_all + failed_all) * steps_per_sample
        bar.set_postfix_str(f"{done_all}/{total} images" + (f", {failed_all} failed" if failed_all else ""),
                            refresh=True)
        if round_images == 0:
            break
        if not batch:
            continue
        seeds = [derive_seed(args.seed, plan.refs[i], k) for i, k, _ in batch]
        x = sample(model, torch.stack([ref for _, _, ref in batch]), seeds=seeds, n_factor=n, kernel=args.filter,
                   steps=args.steps, stop_at=args.stop_at, sampler=args.sampler,
                   progress=(lambda info: bar.update(round_images)) if comm.rank == 0 else None)
        for (i, k, _), seed, img in zip(batch, seeds, x):
            save_png(tensor_to_pil(img), out / output_name(plan.bases[i], k), settings_for(plan.refs[i], k, seed))
            done += 1
            if stop_after and done >= stop_after:  # test hook: die like a killed process
                bar.close()
                print(comm.say(f"{STOP_AFTER_ENV}={stop_after}: stopping abruptly after {done} images"),
                      file=sys.stderr, flush=True)
                sys.stdout.flush()
                os._exit(STOP_EXIT_CODE)
    bar.close()
    elapsed = time.time() - start

    reasons: dict[str, str] = {}
    for part in comm.gather(failures):
        reasons.update(part)
    if comm.rank == 0:
        if reasons:
            print(f"unreadable references ({len(reasons)}, skipped):", file=sys.stderr)
            for rel in sorted(reasons)[:MAX_LISTED_FAILURES]:
                print(f"  {rel}: {reasons[rel]}", file=sys.stderr)
            if len(reasons) > MAX_LISTED_FAILURES:
                print(f"  ... and {len(reasons) - MAX_LISTED_FAILURES} more", file=sys.stderr)
        if plan.unreadable:  # said at the start too; repeated here, where a long run's log ends
            print(f"unreadable folders ({len(plan.unreadable)}, their images left out):", file=sys.stderr)
            for rel in sorted(plan.unreadable)[:MAX_LISTED_FAILURES]:
                print(f"  cannot read folder {rel} ({plan.unreadable[rel]})", file=sys.stderr)
            if len(plan.unreadable) > MAX_LISTED_FAILURES:
                print(f"  ... and {len(plan.unreadable) - MAX_LISTED_FAILURES} more", file=sys.stderr)
        rate = done_all / elapsed if elapsed > 0 else 0.0
        folders = f", {plural(len(plan.unreadable), 'unreadable folder')}" if plan.unreadable else ""
        print(f"done {done_all}, skipped {plan.skipped}, failed {failed_all} ({plural(len(reasons), 'unreadable reference')}"
              f"{folders}) in {elapsed:.1f} s: {rate:.2f} images/s -> {out}", flush=True)
    # every rank knows failed_all; none exits before rank 0 has printed the summary (torchrun stops the
    # other workers as soon as one exits with an error)
    comm.barrier()
    return FAILED_EXIT_CODE if failed_all or plan.unreadable else 0
