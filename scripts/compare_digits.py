"""The coloured-digit task side by side: a coloured digit that is not a seven goes in, a *seven* in the
source's digit and background colours should come out. ILVR with the sevens-only model at several N
against DDIB from the all-digits model to the sevens model.

    OMP_NUM_THREADS=1 python scripts/compare_digits.py                       # 45 references, ~10 min on one core
    OMP_NUM_THREADS=1 python scripts/compare_digits.py --limit 6 --steps 25 --samples 2   # a quick try

References: the first --per-digit images (by their index, 0_0, 0_1, ...) of every digit but 7 in
data/digits/heldout, rendered from fonts no model or classifier trained on (scripts/build_digits_dataset.py;
data/digits/heldout.csv gives each file's digit and its true colours). ILVR draws --samples samples per
reference and N (seeds 0..k-1); DDIB is deterministic, one output per reference.

Each output is measured twice:
  seven    the classifier of scripts/digit_classifier.py says 7 (its reject class and minority answers
           are not sevens)
  colours  the output's pixels and the reference's are each split in two by 2-means in CIELAB; the
           cluster holding more of the image's border pixels is the background, the other the digit;
           the background's colour is its cluster's median, the digit's the median of its cluster's
           quarter farthest from the background (its fully covered core). Delta E (CIE76) between
           output and reference, for the digit and for the background separately.
An output is on target when it is a seven and both delta Es are at most MAX_DELTA_E. The best ILVR
setting is the ILVR row (an N, and a stop step with --stops) with the highest on-target share.

Writes to --out: compare_digits.png (one row per method, one column per reference, for the first
FIGURE_REFERENCES references), compare_digits.md (the table, also printed) and compare_digits.json (every
output's numbers, the settings and the models' weight digests).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import build_digits_dataset as digits_data  # noqa: E402
import digit_classifier  # noqa: E402
from ilvr.ddib import ddib_translate  # noqa: E402
from ilvr.grid import labelled_rows  # noqa: E402
from ilvr.images import load_reference, to_pils  # noqa: E402
from ilvr.loading import load_model  # noqa: E402
from ilvr.model import DiffusionModel  # noqa: E402
from ilvr.sampler import sample  # noqa: E402

SEVEN = 7
SOURCE_DIGITS = (0, 1, 2, 3, 4, 5, 6, 8, 9)
MAX_DELTA_E = 15.0  # a visibly different shade of the same colour; the data's two colours differ by 40 or more
FIGURE_REFERENCES = 6
# measured on the 3,000 held-out renders against their true colours: digit delta E at most 4.7 (9.4 with
# the farthest half, 48 with the whole cluster: thin strokes are mostly edge)
DIGIT_CORE = 0.75
FIGURE_CELL = 96


# ----- colours -----

@dataclass(frozen=True)
class Colours:
    """An image's two colours as sRGB 0-255 triples."""

    digit: tuple[int, int, int]
    background: tuple[int, int, int]

    def hex(self) -> dict[str, str]:
        return {"digit": "#%02x%02x%02x" % self.digit, "background": "#%02x%02x%02x" % self.background}


def two_means(lab: np.ndarray, iterations: int = 100) -> np.ndarray:
    """Cluster 0 or 1 for each of the (P, 3) CIELAB colours: Lloyd's k-means with k = 2.

    Started from two far-apart pixels (the one farthest from the mean colour, then the one farthest from
    that), so the split is the same on every run; far apart in all of CIELAB rather than darkest and
    lightest, because the data's two colours may differ in hue alone (red on an equally light green)."""
    lab = np.asarray(lab, np.float64).reshape(-1, 3)
    first = lab[np.argmax(np.linalg.norm(lab - lab.mean(0), axis=1))]
    second = lab[np.argmax(np.linalg.norm(lab - first, axis=1))]
    centres = np.stack([first, second])
    labels = np.zeros(len(lab), np.int64)
    for step in range(iterations):
        new = np.argmin(np.linalg.norm(lab[:, None, :] - centres[None], axis=2), axis=1)
        if step and np.array_equal(new, labels):
            break
        labels = new
        for k in (0, 1):
            if (labels == k).any():  # an empty cluster keeps its centre (a flat image has only one colour)
                centres[k] = lab[labels == k].mean(0)
    return labels


def border(height: int, width: int) -> np.ndarray:
    """(H, W) bools, True on the outermost ring of pixels."""
    mask = np.ones((height, width), bool)
    mask[1:-1, 1:-1] = False
    return mask


def background_cluster(labels: np.ndarray) -> int:
    """Which of the (H, W) image's two clusters is the background: the one on more of the border, since
    a digit may cover more than half of the image but never its whole edge; a tie goes to the larger."""
    on_border = labels[border(*labels.shape)]
    ones, zeros = int((on_border == 1).sum()), int((on_border == 0).sum())
    if ones != zeros:
        return int(ones > zeros)
    return int((labels == 1).sum() > (labels == 0).sum())


def split_colours(rgb: np.ndarray) -> Colours:
    """The digit and background colours of an (H, W, 3) uint8 RGB image, by 2-means in CIELAB and the
    border rule. The background is its cluster's per-channel median; the digit is the median of the
    quarter of its cluster farthest from the background (DIGIT_CORE), because a thin stroke has more
    anti-aliased edge pixels (blends of the two colours) than fully covered ones. A flat image has one
    cluster: its digit colour is then its background colour."""
    rgb = np.asarray(rgb)
    labels = two_means(digits_data.srgb_to_lab(rgb).reshape(-1, 3)).reshape(rgb.shape[:2])
    bg = background_cluster(labels)
    background = np.median(rgb[labels == bg], axis=0)
    ink = rgb[labels == (1 - bg if (labels == 1 - bg).any() else bg)]
    far = digits_data.delta_e(ink, background)
    digit = np.median(ink[far >= np.quantile(far, DIGIT_CORE)], axis=0)
    return Colours(digit=tuple(int(v) for v in np.rint(digit)), background=tuple(int(v) for v in np.rint(background)))


def colour_errors(output: Colours, reference: Colours) -> tuple[float, float]:
    """(digit delta E, background delta E), CIE76, between an output's colours and its reference's."""
    return (float(digits_data.delta_e(output.digit, reference.digit)),
            float(digits_data.delta_e(output.background, reference.background)))


# ----- sevens and the table -----

def is_seven(labels: np.ndarray) -> np.ndarray:
    """The classifier's labels that count as a seven: 7 only (REJECT, a non-digit or a minority answer, is not)."""
    return np.asarray(labels) == SEVEN


def sevens_share(labels: np.ndarray) -> float:
    """The share of outputs the classifier calls a seven."""
    labels = np.asarray(labels)
    return float(is_seven(labels).mean()) if labels.size else 0.0


def on_target(labels: np.ndarray, digit_de: np.ndarray, background_de: np.ndarray,
              limit: float = MAX_DELTA_E) -> np.ndarray:
    """A seven whose digit and background colours are both within `limit` delta E of the reference's."""
    return is_seven(labels) & (np.asarray(digit_de) <= limit) & (np.asarray(background_de) <= limit)


def summarise(name: str, records: list[dict], limit: float = MAX_DELTA_E) -> dict:
    """One table row from one method's output records (each with label, digit_delta_e, background_delta_e)."""
    labels = np.array([r["label"] for r in records])
    digit_de = np.array([r["digit_delta_e"] for r in records])
    background_de = np.array([r["background_delta_e"] for r in records])
    return {"method": name, "outputs": len(records), "sevens": sevens_share(labels),
            "median_digit_delta_e": float(np.median(digit_de)),
            "median_background_delta_e": float(np.median(background_de)),
            "on_target": float(on_target(labels, digit_de, background_de, limit).mean())}


def best(rows: list[dict]) -> dict:
    """The row with the highest on-target share; a tie goes to the row listed first (the smaller N)."""
    return max(rows, key=lambda r: r["on_target"])  # max keeps the first of equal keys


def markdown_table(rows: list[dict], limit: float = MAX_DELTA_E) -> str:
    head = ("| method | outputs | sevens | median digit ΔE | median background ΔE | "
            f"target: seven, both ΔE ≤ {limit:g} |\n|---|---:|---:|---:|---:|---:|\n")
    return head + "".join(
        f"| {r['method']} | {r['outputs']} | {r['sevens']:.0%} | {r['median_digit_delta_e']:.1f} | "
        f"{r['median_background_delta_e']:.1f} | {r['on_target']:.0%} |\n" for r in rows)


# ----- references -----

def choose_references(data: Path, per_digit: int, digits: tuple[int, ...] = SOURCE_DIGITS) -> list[dict]:
    """The first `per_digit` images of each digit in `digits` by index (0_0, 0_1, 0_2, ... as rendered,
    not 0_10 before 0_2), from the CSV that build_digits_dataset.py writes beside the folder; each its CSV
    row with `path` added. A fixed choice, so every run compares the same references; ordered index by
    index across the digits (0_0, 1_0, ..., 9_0, 0_1, ...), so --limit and the figure see every digit."""
    table = data.parent / f"{data.name}.csv"
    if not table.is_file():
        raise SystemExit(f"error: {table} not found; make the data with "
                         "python scripts/build_digits_dataset.py --out data/digits")
    with open(table, newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(r["digit"]) in digits]
    rows.sort(key=lambda r: (int(r["digit"]), int(Path(r["file"]).stem.split("_")[1])))
    by_digit: dict[int, list[dict]] = {}
    for r in rows:
        by_digit.setdefault(int(r["digit"]), []).append({**r, "path": data.parent / r["file"]})
    return [group[k] for k in range(per_digit) for _, group in sorted(by_digit.items()) if k < len(group)]


def as_rgb(images: torch.Tensor) -> list[np.ndarray]:
    """Model outputs (B, 3, H, W) in about [-1, 1] as the 8-bit RGB images a PNG would hold."""
    return [np.asarray(im) for im in to_pils(images)]


# ----- the run -----

def measure(outputs: list[np.ndarray], reference_colours: list[Colours], classifier: digit_classifier.Classifier,
            meta: list[dict]) -> list[dict]:
    """One record per output: the classifier's label and confidence, the colours and their delta Es."""
    labels, confidence = classifier.predict(np.stack(outputs))
    records = []
    for rgb, ref, lab, conf, m in zip(outputs, reference_colours, labels, confidence, meta):
        colours = split_colours(rgb)
        digit_de, background_de = colour_errors(colours, ref)
        records.append({**m, "label": int(lab), "class": digit_classifier.CLASSES[int(lab)],
                        "confidence": round(float(conf), 4), "colours": colours.hex(),
                        "digit_delta_e": round(digit_de, 2), "background_delta_e": round(background_de, 2)})
    return records


def ilvr_outputs(model: DiffusionModel, refs: torch.Tensor, n: int, seeds: list[int], steps: str,
                 batch: int, stop_at: int = 0) -> list[list[np.ndarray]]:
    """For each reference, its samples at N = n (conditioned on steps 1000 -> stop_at), one per seed; the
    same seeds for every reference."""
    per_ref = max(1, batch // len(seeds))
    out: list[list[np.ndarray]] = []
    for start in range(0, len(refs), per_ref):
        chunk = refs[start:start + per_ref]
        x = sample(model, chunk.repeat_interleave(len(seeds), 0), seeds=seeds * len(chunk), n_factor=n, steps=steps,
                   stop_at=stop_at)
        images = as_rgb(x)
        out.extend(images[k * len(seeds):(k + 1) * len(seeds)] for k in range(len(chunk)))
    return out


def ddib_outputs(source: DiffusionModel, target: DiffusionModel, refs: torch.Tensor, steps: str,
                 batch: int) -> list[np.ndarray]:
    out: list[np.ndarray] = []
    for start in range(0, len(refs), batch):
        out.extend(as_rgb(ddib_translate(source, target, refs[start:start + batch], steps=steps)))
    return out


def figure(references: list[np.ndarray], columns: dict[str, list[np.ndarray]]) -> Image.Image:
    """One row per method (the references first), one column per reference: ``labelled_rows`` labels rows."""
    rows = [("reference", [Image.fromarray(r) for r in references])]
    rows += [(name, [Image.fromarray(im) for im in images]) for name, images in columns.items()]
    return labelled_rows(rows, cell=FIGURE_CELL)


def model_summary(model: DiffusionModel) -> dict:
    return {"source": model.name, "weights_sha256": model.weights_digest}


def hex_rgb(text: str) -> tuple[int, int, int]:
    """'#rrggbb' (as the data's CSV writes colours) as an sRGB triple."""
    return tuple(int(text[i:i + 2], 16) for i in (1, 3, 5))


def reference_record(row: dict, measured: Colours) -> dict:
    """A reference's file, digit, true colours (from the renderer) and measured ones, with the delta Es
    between them: how far the 2-means measurement itself is off on a clean image."""
    true = Colours(digit=hex_rgb(row["colour"]), background=hex_rgb(row["background"]))
    digit_de, background_de = colour_errors(measured, true)
    return {"file": row["file"], "digit": int(row["digit"]), "true": true.hex(), "measured": measured.hex(),
            "measured_vs_true_delta_e": {"digit": round(digit_de, 2), "background": round(background_de, 2)}}


@dataclass
class Results:
    rows: list[dict]  # one per method: ILVR at each N, then DDIB
    records: list[dict]  # one per output
    figure_columns: dict[str, list[np.ndarray]]  # method -> its outputs for the figure's references


def run_methods(args: argparse.Namespace, target: DiffusionModel, source: DiffusionModel, chosen: list[dict],
                refs: torch.Tensor, ref_colours: list[Colours], classifier: digit_classifier.Classifier,
                factors: list[int], seeds: list[int]) -> Results:
    """ILVR at every N and stop step with every seed, then DDIB, each measured as it finishes."""
    res = Results([], [], {})
    for n in factors:
        for stop in args.stops:
            t0 = time.time()
            name = f"ILVR N={n}" + (f", 1000->{stop}" if stop else "")
            outputs = ilvr_outputs(target, refs, n, seeds, args.steps, args.batch, stop)
            meta = [{"method": "ilvr", "n": n, "stop_at": stop, "seed": s, "reference": c["file"]}
                    for c in chosen for s in seeds]
            new = measure([im for per_ref in outputs for im in per_ref], [rc for rc in ref_colours for _ in seeds],
                          classifier, meta)
            res.records += new
            res.rows.append(summarise(name, new, args.max_delta_e))
            res.figure_columns[name] = [per_ref[0] for per_ref in outputs[:FIGURE_REFERENCES]]
            print(f"{name}: {len(new)} samples in {time.time() - t0:.0f} s", flush=True)
    t0 = time.time()
    outputs = ddib_outputs(source, target, refs, args.steps, args.batch)
    new = measure(outputs, ref_colours, classifier,
                  [{"method": "ddib", "n": None, "seed": None, "reference": c["file"]} for c in chosen])
    res.records += new
    res.rows.append(summarise("DDIB", new, args.max_delta_e))
    res.figure_columns["DDIB"] = outputs[:FIGURE_REFERENCES]
    print(f"DDIB: {len(new)} translations in {time.time() - t0:.0f} s", flush=True)
    return res


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data/digits/heldout", help="reference folder, with <folder>.csv beside it")
    ap.add_argument("--per-digit", type=int, default=5, help="references per digit 0-6, 8, 9 (default 5: 45 in all)")
    ap.add_argument("--limit", type=int, default=None, help="use only the first LIMIT references (quick runs)")
    ap.add_argument("--sevens-model", default="checkpoints/digits-sevens32", help="ILVR's model and DDIB's target")
    ap.add_argument("--all-model", default="checkpoints/digits-all32", help="DDIB's source model (every digit)")
    ap.add_argument("--factors", default="2,4,8,16", help="ILVR's N values, comma-separated (default 2,4,8,16)")
    ap.add_argument("--stops", default="0", help="ILVR's stop steps, comma-separated: each N is run conditioned on "
                    "steps 1000 -> s for every s (default 0: every step)")
    ap.add_argument("--samples", type=int, default=4, help="ILVR samples per reference and N, seeds 0..k-1")
    ap.add_argument("--steps", default="100", help="respaced steps for ILVR and for each half of DDIB")
    ap.add_argument("--classifier", default="data/digits/classifier.pt")
    ap.add_argument("--max-delta-e", type=float, default=MAX_DELTA_E, help="the colour limit of the target column")
    ap.add_argument("--batch", type=int, default=64, help="images per model call")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="docs/figures/digits")
    args = ap.parse_args(argv)
    try:
        args.factors = [int(v) for v in args.factors.split(",") if v.strip()]
    except ValueError:
        ap.error(f"--factors takes whole numbers such as 2,4,8,16, got {args.factors!r}")
    try:
        args.stops = [int(v) for v in args.stops.split(",") if v.strip()] or [0]
    except ValueError:
        ap.error(f"--stops takes whole numbers such as 0,300, got {args.stops!r}")
    if args.samples < 1 or args.per_digit < 1 or args.batch < 1 or not args.factors:
        ap.error("--samples, --per-digit, --batch and --factors need at least one each")
    if not Path(args.classifier).is_file():
        ap.error(f"no classifier at {args.classifier}; train one with python scripts/digit_classifier.py train")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    chosen = choose_references(Path(args.data), args.per_digit)[:args.limit]
    if not chosen:
        raise SystemExit(f"error: no references of digits {SOURCE_DIGITS} in {args.data}")
    classifier = digit_classifier.Classifier.load(args.classifier)
    target = load_model(args.sevens_model, device=args.device)
    source = target if args.all_model == args.sevens_model else load_model(args.all_model, device=args.device)
    refs = torch.stack([load_reference(c["path"], target.image_size, target.config.in_channels) for c in chosen])
    ref_rgb = as_rgb(refs)
    ref_colours = [split_colours(r) for r in ref_rgb]
    seeds = list(range(args.samples))
    print(f"{len(chosen)} references; ILVR N = {args.factors}, stop steps {args.stops}, seeds {seeds}, and DDIB; "
          f"{args.steps} steps; "
          f"{target.name} ({source.name} as DDIB's source)", flush=True)
    res = run_methods(args, target, source, chosen, refs, ref_colours, classifier, args.factors, seeds)

    ilvr_best = best(res.rows[:-1])
    table = markdown_table(res.rows, args.max_delta_e)
    verdict = (f"best ILVR setting: {ilvr_best['method']} ({ilvr_best['on_target']:.0%} on target); "
               f"DDIB {res.rows[-1]['on_target']:.0%}")
    print("\n" + table + "\n" + verdict)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    figure(ref_rgb[:FIGURE_REFERENCES], res.figure_columns).save(out / "compare_digits.png")
    (out / "compare_digits.md").write_text(table + "\n" + verdict + "\n")
    report = {"settings": {**vars(args), "seeds": seeds},
              "models": {"sevens": model_summary(target), "all": model_summary(source)},
              "classifier": {"path": args.classifier, "meta": classifier.meta},
              "rows": res.rows, "best_n": ilvr_best["method"],
              "references": [reference_record(c, rc) for c, rc in zip(chosen, ref_colours)],
              "outputs": res.records}
    (out / "compare_digits.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out / 'compare_digits.png'}, {out / 'compare_digits.md'} and {out / 'compare_digits.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
