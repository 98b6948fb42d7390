"""The weight sweep: one prompt at several weights of each chosen adapter, seed fixed, as one labelled grid
(how people choose a LoRA weight, as with A1111's XYZ plot). The plan and the drawing are pure functions;
`run_sweep` renders the cells with an AdapterSession."""

from __future__ import annotations

from dataclasses import replace

from PIL import Image, ImageDraw, ImageFont

from .errors import UserError

DEFAULT_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25)
MIN_CELL = 128  # tiny-world images are 32 px: cells are scaled up so a grid is readable beside its labels
LABEL_BAND = 28  # px above the columns for the weights
BACKGROUND, INK = (255, 255, 255), (0, 0, 0)


def sweep_plan(adapters: list[tuple[str, float]], weights=DEFAULT_WEIGHTS) -> list[list[tuple[tuple[str, float], ...]]]:
    """One row per chosen adapter: that adapter at each weight, the others at the weights they are set to."""
    if not adapters:
        raise UserError("Choose at least one adapter to sweep.")
    return [[tuple((name, weight if index == row else own) for index, (name, own) in enumerate(adapters))
             for weight in weights] for row in range(len(adapters))]


def label_grid(cells: list[list[Image.Image]], row_labels: list[str], column_labels: list[str],
               cell_size: int | None = None) -> Image.Image:
    """The cells as a grid, rows labelled on the left and columns on top; cells scaled (nearest) to `cell_size`."""
    if len(cells) != len(row_labels) or any(len(row) != len(column_labels) for row in cells):
        raise ValueError("one label per row and per column")
    cell = cell_size or max(MIN_CELL, max(image.width for row in cells for image in row))
    font = ImageFont.load_default()
    draw_probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left = 8 + max(draw_probe.textlength(label, font=font) for label in row_labels)
    left = int(left) + 8
    grid = Image.new("RGB", (left + cell * len(column_labels), LABEL_BAND + cell * len(row_labels)), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    for column, label in enumerate(column_labels):
        x = left + column * cell + (cell - draw.textlength(label, font=font)) / 2
        draw.text((x, 8), label, fill=INK, font=font)
    for row, (label, images) in enumerate(zip(row_labels, cells)):
        y = LABEL_BAND + row * cell
        draw.text((8, y + cell // 2 - 6), label, fill=INK, font=font)
        for column, image in enumerate(images):
            grid.paste(image.convert("RGB").resize((cell, cell), Image.NEAREST), (left + column * cell, y))
    return grid


def run_sweep(session, library, settings, adapters: list[tuple[str, float]], weights=DEFAULT_WEIGHTS) -> Image.Image:
    """Render the sweep's grid: one image per cell, all from settings.seed, so only the weight changes."""
    from .generate import resolve_adapters

    plan = sweep_plan(adapters, weights)
    single = replace(settings, num_images=1)
    rows = []
    for row in plan:
        images = []
        for mix in row:
            session.apply(resolve_adapters(library, list(mix)))
            images.extend(session.generate(replace(single, adapters=mix)))
        rows.append(images)
    return label_grid(rows, [name for name, _ in adapters], [f"weight {w:g}" for w in weights])
