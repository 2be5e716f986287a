"""Real photographs shipped with scikit-image (public domain), as ComfyUI IMAGE tensors."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def photo(name: str = "astronaut", size: int = 128) -> torch.Tensor:
    """[1, size, size, 3] float in 0..1, centre-cropped and resized like a user would prepare it."""
    import skimage.data
    arr = getattr(skimage.data, name)()
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, -1)
    img = Image.fromarray(arr[..., :3])
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((size, size), Image.LANCZOS)
    return torch.from_numpy(np.asarray(img).astype(np.float32) / 255.0)[None]


def save_png(name: str, path, size: int = 128):
    img = (photo(name, size)[0].numpy() * 255).round().astype(np.uint8)
    Image.fromarray(img).save(path)
