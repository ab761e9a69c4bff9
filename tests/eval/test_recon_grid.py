"""The reconstruction grid's columns: an "adaptive" column only when the run routed images."""

from __future__ import annotations

from PIL import Image

from eval.report import plot_reconstruction_grid

CELL = 64


def _rows(devset_dir, devset_sample, adaptive_ratio):
    rows = []
    for record in devset_sample[:2]:
        with Image.open(devset_dir / record["image"]) as image:
            original = image.convert("RGB").resize((CELL, CELL))
        # Stand-in reconstructions: distinct flat colours, so the chosen cell is identifiable in the PNG.
        recon = {
            r: Image.new("RGB", (CELL, CELL), colour)
            for r, colour in ((8, "red"), (16, "lime"), (32, "blue"))
        }
        rows.append({"id": record["image"], "domain": record["domain"], "original": original, "recon": recon,
                     "adaptive_ratio": adaptive_ratio})  # fmt: skip
    return rows


def test_grid_without_routing_has_no_adaptive_column(tmp_path, devset_dir, devset_sample):
    # `cat-bench recon --ratios 8,16,32` routes nothing: the grid must not show an "adaptive" cell (it used to
    # show the original there, labelled "routed Nonex").
    path = plot_reconstruction_grid(
        _rows(devset_dir, devset_sample, None), tmp_path / "grid.png", thumbnail=CELL
    )
    with Image.open(path) as grid:
        assert grid.width == CELL * 4  # original, 8x, 16x, 32x


def test_grid_with_routing_shows_the_routed_reconstruction(tmp_path, devset_dir, devset_sample):
    path = plot_reconstruction_grid(
        _rows(devset_dir, devset_sample, 32), tmp_path / "grid.png", thumbnail=CELL
    )
    with Image.open(path) as grid:
        assert grid.width == CELL * 5
        rgb = grid.convert("RGB")
        # The centre of the last column's first cell is the 32x stand-in (blue), not the original.
        r, g, b = rgb.getpixel((CELL * 4 + CELL // 2, grid.height // 4))
        assert b > 200 and r < 60 and g < 60
