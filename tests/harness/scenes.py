"""Procedural scenes: one or two flat shapes in named colours on a named background, with a caption that names them.

The scenes model (models/ic_demo_scenes.safetensors, scripts/train_scenes_model.py) is trained on these; the
behaviour tests draw the same kind of scene and know, from the generator, exactly where each object is.
Everything is seeded: ``random_scene(np.random.default_rng(s), n)`` gives the same pixels and caption every time.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

SIZE = 128
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (235, 210, 30),
           "white": (245, 245, 245), "black": (20, 20, 20), "orange": (240, 130, 20), "purple": (140, 40, 170)}
SHAPES = ("circle", "square", "triangle")


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    box: tuple[int, int, int, int]          # x0, y0, x1, y1 in pixels
    mask: np.ndarray = field(repr=False)    # [SIZE, SIZE] bool, True where the object was drawn

    @property
    def centre_x(self) -> float:
        return (self.box[0] + self.box[2]) / 2


@dataclass(frozen=True)
class Scene:
    image: np.ndarray                       # [SIZE, SIZE, 3] float32 in 0..1
    caption: str
    background: str
    objects: tuple[SceneObject, ...]

    def tensor(self):
        """[1, H, W, 3] float tensor: ComfyUI's IMAGE."""
        import torch
        return torch.from_numpy(self.image.copy())[None]


def _outline(draw: ImageDraw.ImageDraw, shape: str, box, fill):
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def render(background: str, objects, caption_order=None) -> Scene:
    """Draw a scene from an explicit list of (colour, shape, (x0, y0, size)). The caption names the objects in
    ``caption_order`` (indices; default: as given)."""
    img = Image.new("RGB", (SIZE, SIZE), COLOURS[background])
    draw = ImageDraw.Draw(img)
    drawn = []
    for colour, shape, (x0, y0, size) in objects:
        box = (int(x0), int(y0), int(x0 + size), int(y0 + size))
        _outline(draw, shape, box, COLOURS[colour])
        mask_img = Image.new("L", (SIZE, SIZE), 0)
        _outline(ImageDraw.Draw(mask_img), shape, box, 255)
        drawn.append(SceneObject(colour, shape, box, np.asarray(mask_img) > 127))
    order = list(caption_order) if caption_order is not None else list(range(len(drawn)))
    named = " and ".join(f"a {drawn[i].colour} {drawn[i].shape}" for i in order)
    caption = f"{named} on a {background} background"
    return Scene(np.asarray(img, dtype=np.float32) / 255.0, caption, background, tuple(drawn))


def random_scene(rng: np.random.Generator, n_objects: int = 1) -> Scene:
    """One object anywhere (32-63 px), or two objects in the left and right halves (32-51 px) named in random order;
    background and object colours all differ."""
    names = list(COLOURS)
    picks = rng.choice(len(names), 1 + n_objects, replace=False)
    background = names[picks[0]]
    objects = []
    if n_objects == 1:
        size = int(rng.integers(32, 64))
        x0, y0 = int(rng.integers(2, SIZE - size - 2)), int(rng.integers(2, SIZE - size - 2))
        objects.append((names[picks[1]], SHAPES[int(rng.integers(len(SHAPES)))], (x0, y0, size)))
    elif n_objects == 2:
        half = SIZE // 2
        for side in (0, 1):
            size = int(rng.integers(32, 52))
            x0 = int(rng.integers(side * half + 2, side * half + half - size - 1))
            y0 = int(rng.integers(4, SIZE - size - 4))
            objects.append((names[picks[1 + side]], SHAPES[int(rng.integers(len(SHAPES)))], (x0, y0, size)))
    else:
        raise ValueError(f"n_objects must be 1 or 2, got {n_objects}")
    order = [0, 1] if n_objects == 1 or rng.random() < 0.5 else [1, 0]
    return render(background, objects, order[:n_objects])
