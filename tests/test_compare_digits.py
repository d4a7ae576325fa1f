"""scripts/compare_digits.py, the ILVR-vs-DDIB comparison of the coloured-digit task: the colour
measurement (2-means in CIELAB and the border rule), the sevens share and the table, and one tiny run
end to end with a random model and an untrained classifier. No trained model is needed."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import build_digits_dataset as dd  # noqa: E402
import compare_digits as cmp  # noqa: E402
import digit_classifier as dc  # noqa: E402

RED, BLUE = (220, 30, 30), (30, 40, 200)


def seven(colour, background, width: int = 4, size: int = 32) -> np.ndarray:
    """A '7' of two strokes (a bar and a diagonal), drawn without anti-aliasing, as (H, W, 3) uint8."""
    img = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(img)
    draw.line([(6, 6), (25, 6)], fill=colour, width=width)
    draw.line([(25, 6), (12, 27)], fill=colour, width=width)
    return np.asarray(img)


def test_a_red_seven_on_blue_is_red_on_blue():
    c = cmp.split_colours(seven(RED, BLUE))
    assert dd.delta_e(c.digit, RED) < 1 and dd.delta_e(c.background, BLUE) < 1
    assert cmp.colour_errors(c, c) == (0.0, 0.0)
    assert c.hex() == {"digit": "#dc1e1e", "background": "#1e28c8"}


def test_swapped_colours_are_far_apart_for_digit_and_background():
    original = cmp.split_colours(seven(RED, BLUE))
    swapped = cmp.split_colours(seven(BLUE, RED))
    digit_de, background_de = cmp.colour_errors(swapped, original)
    assert digit_de > 100 and background_de > 100
    assert digit_de == pytest.approx(float(dd.delta_e(RED, BLUE)), abs=1)


def test_the_border_decides_the_background_even_when_the_digit_covers_most_pixels():
    img = np.zeros((32, 32, 3), np.uint8) + np.array(BLUE, np.uint8)
    img[2:30, 2:30] = RED  # 77% of the image, none of its border
    labels = cmp.two_means(dd.srgb_to_lab(img).reshape(-1, 3)).reshape(32, 32)
    assert (labels == labels[16, 16]).mean() > 0.5  # the digit's cluster is the larger one
    c = cmp.split_colours(img)
    assert c.digit == RED and c.background == BLUE
    # a digit touching part of the border still loses to the background, which holds the rest of it
    img[0:32, 2:30] = RED
    assert cmp.split_colours(img).background == BLUE


def test_a_border_tie_goes_to_the_larger_cluster():
    labels = np.zeros((8, 8), np.int64)
    labels[:4, :] = 1  # the border split evenly, 1 on 32 pixels
    labels[4, 1:7] = 1  # ... and 6 more inside
    assert cmp.background_cluster(labels) == 1
    assert cmp.background_cluster(1 - labels) == 0


def test_colours_of_equal_lightness_are_still_split():
    red, green = (200, 70, 70), (50, 130, 80)
    lab = dd.srgb_to_lab(np.array([red, green]))
    assert abs(lab[0, 0] - lab[1, 0]) < 1 and dd.delta_e(red, green) > 40  # the premise: hue alone differs
    c = cmp.split_colours(seven(red, green))
    assert dd.delta_e(c.digit, red) < 1 and dd.delta_e(c.background, green) < 1


def test_a_flat_image_has_its_one_colour_for_both():
    c = cmp.split_colours(np.full((32, 32, 3), 90, np.uint8))
    assert c.digit == c.background == (90, 90, 90)


def test_pixel_noise_moves_the_colours_little():
    clean = cmp.split_colours(seven(RED, BLUE))
    rng = np.random.default_rng(0)
    noisy = np.clip(seven(RED, BLUE) + rng.normal(0, 4, (32, 32, 3)), 0, 255).astype(np.uint8)
    digit_de, background_de = cmp.colour_errors(cmp.split_colours(noisy), clean)
    assert digit_de < 5 and background_de < 2


@pytest.mark.skipif(bool(dd.missing_fonts(dd.HELDOUT_FONTS)), reason="held-out fonts missing")
def test_thin_anti_aliased_digits_give_their_true_colours():
    """The renderer's own images (thin strokes are mostly anti-aliased edge) against the colours it drew."""
    for digit in (1, 4, 8):
        for index in range(8):
            img, p = dd.make_digit(0, 2, digit, index, dd.HELDOUT_FONTS)
            c = cmp.split_colours(np.asarray(img))
            assert dd.delta_e(c.background, p.background) < 1
            assert dd.delta_e(c.digit, p.colour) < 5, (digit, index)


def test_the_sevens_share_counts_sevens_only():
    labels = np.array([7, 7, dc.REJECT, 1])
    assert cmp.is_seven(labels).tolist() == [True, True, False, False]
    assert cmp.sevens_share(labels) == 0.5
    assert cmp.sevens_share(np.array([dc.REJECT] * 3)) == 0.0
    assert cmp.sevens_share(np.array([], np.int64)) == 0.0


def test_summary_rows_and_the_best_one():
    records = [{"label": 7, "digit_delta_e": 3.0, "background_delta_e": 1.0},  # on target
               {"label": 7, "digit_delta_e": 20.0, "background_delta_e": 1.0},  # a seven, wrong digit colour
               {"label": dc.REJECT, "digit_delta_e": 1.0, "background_delta_e": 1.0},  # right colours, no seven
               {"label": 7, "digit_delta_e": 15.0, "background_delta_e": 15.0}]  # on the limit: on target
    row = cmp.summarise("ILVR N=4", records)
    assert row == {"method": "ILVR N=4", "outputs": 4, "sevens": 0.75, "median_digit_delta_e": 9.0,
                   "median_background_delta_e": 1.0, "on_target": 0.5}
    assert cmp.summarise("x", records, limit=10)["on_target"] == 0.25
    rows = [{"method": "a", "on_target": 0.2}, {"method": "b", "on_target": 0.5}, {"method": "c", "on_target": 0.5}]
    assert cmp.best(rows)["method"] == "b"
    table = cmp.markdown_table([row])
    assert "both ΔE ≤ 15" in table and "| ILVR N=4 | 4 | 75% | 9.0 | 1.0 | 50% |" in table


def test_references_are_a_fixed_choice_without_sevens(tmp_path):
    folder = tmp_path / "heldout"
    with open(tmp_path / "heldout.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "digit", "colour", "background"])
        for digit in (0, 7, 3):
            for index in (10, 2, 0, 1):
                w.writerow([f"heldout/{digit}_{index}.png", digit, "#ff0000", "#0000ff"])
    chosen = cmp.choose_references(folder, 2)
    assert [c["file"] for c in chosen] == ["heldout/0_0.png", "heldout/3_0.png", "heldout/0_1.png", "heldout/3_1.png"]
    assert chosen[0]["path"] == folder / "0_0.png"
    assert [c["file"] for c in cmp.choose_references(folder, 9)][-2:] == ["heldout/0_10.png", "heldout/3_10.png"]
    with pytest.raises(SystemExit, match="not found"):
        cmp.choose_references(tmp_path / "missing", 2)


def test_a_tiny_run_writes_the_table_the_numbers_and_the_figure(tiny_checkpoint, tmp_path, capsys):
    torch.set_num_threads(1)
    data = tmp_path / "heldout"
    data.mkdir()
    rows = []
    for digit, colour, background in ((1, RED, BLUE), (2, BLUE, RED), (7, RED, BLUE)):
        Image.fromarray(seven(colour, background)).save(data / f"{digit}_0.png")
        rows.append([f"heldout/{digit}_0.png", digit, "#%02x%02x%02x" % colour, "#%02x%02x%02x" % background])
    with open(tmp_path / "heldout.csv", "w", newline="") as f:
        csv.writer(f).writerows([["file", "digit", "colour", "background"], *rows])
    torch.manual_seed(0)
    dc.Classifier(dc.make_net(), {"classes": dc.CLASSES}).save(tmp_path / "clf.pt")
    out = tmp_path / "out"
    assert cmp.main(["--data", str(data), "--sevens-model", str(tiny_checkpoint), "--all-model", str(tiny_checkpoint),
                     "--classifier", str(tmp_path / "clf.pt"), "--factors", "2,8", "--stops", "0,500", "--samples", "2",
                     "--steps", "3", "--batch", "3", "--device", "cpu", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "| ILVR N=8 | 4 |" in said and "| DDIB | 2 |" in said and "best ILVR setting: ILVR N=" in said
    report = json.loads((out / "compare_digits.json").read_text())
    assert [r["method"] for r in report["rows"]] == ["ILVR N=2", "ILVR N=2, 1000->500", "ILVR N=8",
                                                     "ILVR N=8, 1000->500", "DDIB"]
    assert len(report["outputs"]) == 2 * 2 * 2 * 2 + 2  # references x N x stops x seeds, and one DDIB output each
    assert {o["reference"] for o in report["outputs"]} == {"heldout/1_0.png", "heldout/2_0.png"}  # no seven
    assert sorted((o["n"], o["seed"]) for o in report["outputs"] if o["reference"] == "heldout/1_0.png"
                  and o["method"] == "ilvr" and o["stop_at"] == 0) == [(2, 0), (2, 1), (8, 0), (8, 1)]
    assert all(r["measured_vs_true_delta_e"] == {"digit": 0.0, "background": 0.0} for r in report["references"])
    assert (out / "compare_digits.md").read_text().startswith("| method |")
    fig = Image.open(out / "compare_digits.png")
    assert fig.height == 6 * (cmp.FIGURE_CELL + 2) + 2  # reference, N=2 and N=8 each at two stops, DDIB
