"""Pictures of the corruptions: one image under every corruption (rows) at every severity (columns), and a
small synthetic colour scene to show them on where no CIFAR image is at hand (none ships with robustops).

Regenerate the README's figures with::

    python -c "import robustops.corruptions.gallery as g; g.readme_figures('docs')"
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

from . import corrupt
from .base import SEVERITIES, check_names, registered

__all__ = ["plot_corruption_grid", "demo_scene", "readme_figures"]


def demo_scene(size: int = 32) -> torch.Tensor:
    """[3, size, size] in [0, 1]: a sky gradient, a sun, green ground and a red house with a dark door,
    a stand-in for a natural 32 x 32 image with flat regions, edges and saturated colours."""
    t = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    yy, xx = t.view(size, 1).expand(size, size), t.view(1, size).expand(size, size)
    sky = torch.stack([0.35 + 0.4 * yy, 0.55 + 0.35 * yy, 0.95 - 0.1 * yy])
    img = sky.clone()
    sun = ((xx - 0.78) ** 2 + (yy - 0.2) ** 2) < 0.012
    img[:, sun] = torch.tensor([1.0, 0.85, 0.3]).view(3, 1)
    ground = yy > 0.68 + 0.05 * torch.sin(6 * xx)
    img[:, ground] = torch.stack([0.2 + 0.1 * xx, 0.55 - 0.15 * yy, 0.2 + 0 * xx])[:, ground]
    house = (xx > 0.18) & (xx < 0.5) & (yy > 0.45) & (yy < 0.8)
    roof = (yy <= 0.45) & (yy > 0.3) & ((xx - 0.34).abs() < (yy - 0.3) * 1.2)
    img[:, house] = torch.tensor([0.75, 0.2, 0.15]).view(3, 1)
    img[:, roof] = torch.tensor([0.35, 0.2, 0.15]).view(3, 1)
    door = (xx > 0.3) & (xx < 0.38) & (yy > 0.62) & (yy < 0.8)
    img[:, door] = torch.tensor([0.15, 0.1, 0.08]).view(3, 1)
    return img.clamp(0, 1)


def plot_corruption_grid(path: str, image: torch.Tensor, names=None, severities: Sequence[int] = SEVERITIES,
                         seed: int = 0, index: int = 0, cell: float = 0.55, dpi: int = 100,
                         title: Optional[str] = None) -> str:
    """Write a PNG grid of ``image`` ([C, H, W] in [0, 1], C = 1 or 3): a clean column, then one column
    per severity, one row per corruption (names: as check_names takes them; default every registered
    one, in ALL's order). seed / index: the sample's random draws (as corrupt's). cell: inches per
    image. Returns path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"image must be a Tensor[C, H, W] with C = 1 or 3, got "
                         f"{tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__}")
    reg = registered()
    rows = [n for n in check_names(names if names is not None else tuple(reg)) if n in reg]
    x = image.detach().float().cpu().clamp(0, 1).unsqueeze(0)
    fig = Figure(figsize=(cell * (len(severities) + 1) + 1.4, cell * len(rows) + 0.4), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), len(severities) + 1, squeeze=False)
    grey = x.shape[1] == 1
    for r, name in enumerate(rows):
        tiles = [x] + [corrupt(x, name, s, seed=seed, indices=[index]) for s in severities]
        for c, tile in enumerate(tiles):
            ax = axes[r][c]
            pic = tile[0, 0] if grey else tile[0].permute(1, 2, 0)
            ax.imshow(pic.numpy(), cmap="gray" if grey else None, vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title("clean" if c == 0 else f"s{severities[c - 1]}", fontsize=7)
        axes[r][0].set_ylabel(name.replace("_", " "), fontsize=6, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=8)
    fig.subplots_adjust(left=0.22, right=0.99, top=0.95 if not title else 0.92, bottom=0.01, wspace=0.05, hspace=0.05)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, format="png", dpi=dpi)
    return path


def readme_figures(out_dir: str = "docs"):
    """docs/corruptions_digits.png (a test digit, 8 x 8) and docs/corruptions_32.png (demo_scene(32)):
    every registered corruption at severities 1..5. Returns the two paths."""
    from ..data import load_digits

    digit = load_digits("test").tensors[0][0].float()
    digit = digit / digit.max().clamp_min(1e-12)
    return [plot_corruption_grid(os.path.join(out_dir, "corruptions_digits.png"), digit, title="8 x 8 digits"),
            plot_corruption_grid(os.path.join(out_dir, "corruptions_32.png"), demo_scene(32), title="32 x 32")]
