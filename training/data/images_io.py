"""Opening a real image as the 8-bit RGB the VAE expects, whatever its mode.

``Image.convert("RGB")`` alone gets several modes wrong: a 16-bit grayscale PNG (mode ``I;16``) is clipped at 255,
so mid-grey comes out white; transparent pixels keep whatever colour hides under them (often black). Every image
a run trains on (an ``--images`` folder, a ``--dataset``) goes through :func:`to_rgb`.
"""

from __future__ import annotations

from pathlib import Path

# Files read as images. Animated GIFs and WebPs give their first frame (PIL's default) and are counted as such.
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
BACKGROUND = (255, 255, 255)  # what a transparent pixel becomes: the usual backdrop of a cut-out


def _wide_to_grey(image):
    """16-bit and 32-bit grayscale (``I;16*``, ``I``, ``F``) scaled to 8-bit ``L`` instead of clipped at 255.

    ``I;16`` is 0..65535. ``I`` (32-bit integers) holds 16-bit data in practice (older Pillows open 16-bit PNGs
    so), so it is scaled as 16-bit when any value exceeds 255 and read as 8-bit otherwise. ``F`` is taken as
    0..1 when it stays within it, else as 0..255.
    """
    import numpy as np
    from PIL import Image

    array = np.asarray(image, dtype=np.float64)
    peak = float(array.max()) if array.size else 0.0
    if image.mode.startswith("I;16") or (image.mode == "I" and peak > 255):
        array = array / 257.0
    elif image.mode == "F" and peak <= 1.0:
        array = array * 255.0
    return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), "L")


def to_rgb(image):
    """``image`` as 8-bit RGB: wide grayscale scaled, palettes expanded, transparency over a white background."""
    from PIL import Image

    if image.mode.startswith("I") or image.mode == "F":
        image = _wide_to_grey(image)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        backdrop = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        image = Image.alpha_composite(backdrop, rgba)
    return image.convert("RGB")


def load_rgb(path: str | Path):
    """The image at ``path`` as 8-bit RGB, turned upright by its EXIF orientation (phone photos are stored
    sideways with a rotate tag). An animated file gives its first frame."""
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        image.load()
        return to_rgb(ImageOps.exif_transpose(image))


def frame_count(path: Path) -> int:
    """How many frames the image at ``path`` holds (1 for a still image), decoding the first one fully."""
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        return int(getattr(image, "n_frames", 1))


def image_tensor(image, resolution: int):
    """An RGB PIL image resized (shorter side) and centre-cropped to ``resolution``, in [-1, 1], shape (3, H, W)."""
    import numpy as np
    import torch

    scale = resolution / min(image.size)
    image = image.resize((max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))))
    left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)
