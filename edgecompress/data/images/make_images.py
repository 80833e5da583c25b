"""Writes the built-in calibration and evaluation images: synthetic scenes drawn for edgecompress (no photo, no
third-party content; Apache-2.0 with the project). Run from anywhere: python make_images.py. Deterministic (seeded).

Each scene is a sky/ground gradient, a few filled shapes (discs, boxes, stripes, rings) in varied colours and
sizes, a texture (checkerboard, waves or blotches) and mild noise, so that a classifier's activations see edges,
flat areas, textures and colour gradients as in photos. The two splits use different seeds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 160
COUNTS = {"calibration": 16, "evaluation": 16}
SEEDS = {"calibration": 1601, "evaluation": 1602}


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(0, 256, size=3))  # type: ignore[return-value]


def scene(rng: np.random.Generator) -> Image.Image:
    y = np.linspace(0.0, 1.0, SIZE)[:, None, None]
    top, bottom = rng.uniform(0, 255, size=3), rng.uniform(0, 255, size=3)
    horizon = rng.uniform(0.3, 0.7)
    img = np.where(y < horizon, top * (1 - y) + bottom * y, bottom * (1.2 - y) + top * 0.2 * y)
    img = np.broadcast_to(img, (SIZE, SIZE, 3)).copy()
    xx, yy = np.meshgrid(np.arange(SIZE), np.arange(SIZE))
    kind = rng.integers(0, 3)
    if kind == 0:  # checkerboard patch
        cell = int(rng.integers(6, 20))
        mask = ((xx // cell + yy // cell) % 2 == 0) & (yy > SIZE * horizon)
        img[mask] = img[mask] * 0.6 + np.array(_colour(rng)) * 0.4
    elif kind == 1:  # waves
        f = rng.uniform(0.03, 0.15)
        img += 40 * np.sin(f * xx + rng.uniform(0, 6) + 0.5 * np.sin(f * yy))[..., None]
    else:  # blotches
        blot = rng.standard_normal((SIZE // 8, SIZE // 8))
        blot = np.kron(blot, np.ones((8, 8)))
        img += 30 * blot[..., None] * rng.uniform(0.3, 1.0, size=3)
    im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.2))
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(2, 6))):
        x0, y0 = (int(v) for v in rng.integers(0, SIZE - 20, size=2))
        w, h = (int(v) for v in rng.integers(15, 80, size=2))
        box = (x0, y0, min(SIZE - 1, x0 + w), min(SIZE - 1, y0 + h))
        shape = rng.integers(0, 4)
        if shape == 0:
            draw.ellipse(box, fill=_colour(rng))
        elif shape == 1:
            draw.rectangle(box, fill=_colour(rng), outline=_colour(rng), width=2)
        elif shape == 2:
            for i in range(0, w, 6):
                draw.line((x0 + i, y0, x0 + i, y0 + h), fill=_colour(rng), width=3)
        else:
            draw.ellipse(box, outline=_colour(rng), width=int(rng.integers(3, 9)))
    arr = np.asarray(im).astype(np.float64) + rng.normal(0, 4, size=(SIZE, SIZE, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def main() -> None:
    root = Path(__file__).parent
    for split, count in COUNTS.items():
        out = root / split
        out.mkdir(exist_ok=True)
        rng = np.random.default_rng(SEEDS[split])
        for i in range(count):
            scene(rng).save(out / f"scene-{i:02d}.jpg", quality=88)


if __name__ == "__main__":
    main()
