"""The coloured-digits tools: scripts/build_digits_dataset.py (rendering) and scripts/digit_classifier.py
(the measuring classifier). Fast: a few images and a tiny training set, not the 98% claim (that is
`digit_classifier.py evaluate` on data/digits/heldout)."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import build_digits_dataset as dd  # noqa: E402
import digit_classifier as dc  # noqa: E402

FONTS_MISSING = dd.missing_fonts(dd.TRAIN_FONTS + dd.HELDOUT_FONTS)
needs_fonts = pytest.mark.skipif(bool(FONTS_MISSING), reason="fonts missing: apt-get install -y " + " ".join(
    sorted({pkg for pkg, _ in FONTS_MISSING})))


def test_the_font_split_holds_out_whole_families():
    train = {(fam, path) for _, fam, path in dd.TRAIN_FONTS}
    heldout = {(fam, path) for _, fam, path in dd.HELDOUT_FONTS}
    assert {f for f, _ in train}.isdisjoint({f for f, _ in heldout})
    assert {p for _, p in train}.isdisjoint({p for _, p in heldout})
    assert {pkg for pkg, _, _ in dd.TRAIN_FONTS + dd.HELDOUT_FONTS} <= set(dd.FONT_PACKAGES)  # a license for each


def test_delta_e_matches_known_values():
    assert dd.delta_e((255, 255, 255), (0, 0, 0)) == pytest.approx(100, abs=0.01)
    assert dd.srgb_to_lab((255, 0, 0)) == pytest.approx([53.24, 80.09, 67.20], abs=0.05)  # CIELAB D65 of sRGB red


@needs_fonts
def test_renders_are_deterministic_sized_and_contrasting():
    for split, stream in (("train", 0), ("heldout", 2)):
        for digit, index in ((7, 0), (3, 5), (0, 11)):
            img, p = dd.make_digit(0, stream, digit, index, dd.FONT_SPLITS[split])
            again, _ = dd.make_digit(0, stream, digit, index, dd.FONT_SPLITS[split])
            assert img.mode == "RGB" and img.size == (32, 32)
            a = np.asarray(img)
            assert np.array_equal(a, np.asarray(again))  # the same stream, the same pixels
            assert p.delta_e >= dd.MIN_DELTA_E and dd.delta_e(p.background, p.colour) >= dd.MIN_DELTA_E
            pixels = a.reshape(-1, 3)
            assert (pixels == p.background).all(1).mean() > 0.5  # a flat background around the digit
            ink = dd.delta_e(pixels, p.background)
            assert ink.max() >= 0.9 * p.delta_e  # the digit's colour is reached (fully covered pixels)
            assert Path(p.font) in {Path(f) for _, _, f in dd.FONT_SPLITS[split]}
    other, _ = dd.make_digit(1, 0, 7, 0, dd.TRAIN_FONTS)
    assert not np.array_equal(np.asarray(other), np.asarray(dd.make_digit(0, 0, 7, 0, dd.TRAIN_FONTS)[0]))


@needs_fonts
def test_build_writes_one_folder_per_model_and_says_so(tmp_path, capsys):
    out = tmp_path / "digits"
    assert dd.main(["--out", str(out), "--per-digit", "1", "--sevens", "3", "--heldout-per-digit", "1",
                    "--digits", "0,7"]) == 0
    said = capsys.readouterr().out
    assert sorted(p.name for p in (out / "all").iterdir()) == ["0_0.png", "7_0.png"]
    assert sorted(p.name for p in (out / "sevens").iterdir()) == ["7_0.png", "7_1.png", "7_2.png"]
    assert sorted(p.name for p in (out / "heldout").iterdir()) == ["0_0.png", "7_0.png"]
    assert f"wrote 3 images to {out / 'sevens'}" in said and "build.json" in said
    rows = list(csv.DictReader(open(out / "heldout.csv")))
    assert {r["family"] for r in rows} <= {fam for _, fam, _ in dd.HELDOUT_FONTS}
    assert all(float(r["delta_e"]) >= dd.MIN_DELTA_E for r in rows)
    build = json.loads((out / "build.json").read_text())
    assert build["min_delta_e"] == dd.MIN_DELTA_E and build["licenses"]["fonts-noto-core"].startswith("SIL")
    # the same file again: an image depends only on (seed, set, digit, index), not on the set's size
    first = (out / "sevens" / "7_1.png").read_bytes()
    assert dd.main(["--out", str(out), "--sets", "sevens", "--sevens", "2"]) == 0
    assert (out / "sevens" / "7_1.png").read_bytes() == first


def test_classifier_input_ignores_the_colours():
    alpha = np.zeros((32, 32))
    alpha[8:24, 14:18] = 1.0  # a bar
    a = np.asarray(dd.composite(alpha, (250, 240, 10), (20, 20, 200)))
    b = np.asarray(dd.composite(alpha, (10, 60, 10), (250, 120, 200)))  # other colours, light on dark
    fa, fb = dc.features(np.stack([a, b]))
    assert fa.shape == (1, 32, 32) and np.abs(fa - fb).max() < 1e-6
    assert fa[0, 10, 15] == pytest.approx(1.0) and fa[0, 2, 2] == 0.0
    faint = np.asarray(dd.composite(alpha, (100, 100, 100), (104, 100, 100)))  # below the data's contrast
    assert dc.features(faint[None]).max() < 0.2  # not stretched into a full-contrast bar


@needs_fonts
def test_classifier_trains_saves_and_predicts_on_a_tiny_set(tmp_path, capsys):
    torch.set_num_threads(1)
    images, labels = dc.training_set(0, dc.STREAM_TRAIN, dc.STREAM_REJECT_TRAIN, per_digit=6, rejects=10)
    assert images.shape == (70, 32, 32, 3) and images.dtype == np.uint8 and set(labels) == set(range(11))
    net = dc.fit(images, labels, epochs=2, seed=0, batch_size=16, log=lambda *_: None)
    clf = dc.Classifier(net, {"classes": dc.CLASSES, "min_confidence": 0.5})
    clf.save(tmp_path / "clf.pt")
    loaded = dc.Classifier.load(tmp_path / "clf.pt")
    pred, conf = loaded.predict(images[:5])
    assert pred.shape == (5,) and ((0 <= pred) & (pred <= dc.REJECT)).all() and ((0 < conf) & (conf <= 1)).all()
    assert np.array_equal(pred, clf.predict(images[:5])[0])
    # the reject rule: without a majority for one class, the answer is "reject"
    doubtful = dc.Classifier(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(32 * 32, 11)), {})
    torch.nn.init.zeros_(doubtful.net[1].weight)
    torch.nn.init.zeros_(doubtful.net[1].bias)
    assert (doubtful.predict(images[:3])[0] == dc.REJECT).all()
    # the command line: files and folders in, one line per image and a count
    folder = tmp_path / "imgs"
    folder.mkdir()
    for k in range(3):
        Image.fromarray(images[k * 6]).save(folder / f"{labels[k * 6]}_{k}.png")
    assert dc.main(["predict", "--weights", str(tmp_path / "clf.pt"), str(folder)]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1].startswith("3 images: ")
    assert dc.main(["evaluate", "--weights", str(tmp_path / "clf.pt"), "--data", str(folder), "--blobs", "2",
                    "--json", str(tmp_path / "r.json")]) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["digits"]["images"] == 3 and set(r["nondigits"]["per_kind"]) == set(dc.NONDIGIT_KINDS)
