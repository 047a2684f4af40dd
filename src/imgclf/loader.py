"""Batches from in-memory uint8 tensors, augmented whole-batch on the device.

No per-image Python work: a batch is gathered with one index op, cropped with one gather,
flipped with one `where` and cut out with one broadcast mask (the airbench way).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float, normalized with per-channel mean/std given in [0, 1] units."""
    return (images.float() / 255 - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def _windows(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The height x width window at (top[i], left[i]) of each image i, in one gather."""
    n, c = images.shape[:2]
    device = images.device
    rows = (top[:, None] + torch.arange(height, device=device))[:, None, :, None]
    cols = (left[:, None] + torch.arange(width, device=device))[:, None, None, :]
    return images[torch.arange(n, device=device)[:, None, None, None],
                  torch.arange(c, device=device)[None, :, None, None], rows, cols]


def random_crop(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to `padding` pixels (a random crop of the reflect-padded image)."""
    padded = F.pad(images.float(), (padding,) * 4, mode="reflect").to(images.dtype)
    return random_window(padded, images.shape[2:], generator)


def random_window(images: torch.Tensor, size: int | tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """A random window of each image, size x size or (height, width) pixels."""
    n, _, h, w = images.shape
    height, width = (size, size) if isinstance(size, int) else size
    dy = torch.randint(0, h - height + 1, (n,), generator=generator, device=images.device)
    dx = torch.randint(0, w - width + 1, (n,), generator=generator, device=images.device)
    return _windows(images, dy, dx, height, width)


def flip_where(images: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """The images left-right flipped where the boolean `flip` (one per image) is set."""
    return torch.where(flip[:, None, None, None], images.flip(3), images)


def random_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return flip_where(images, torch.rand(len(images), generator=generator, device=images.device) < 0.5)


def random_cutout(images: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Zero a size x size square at a random centre of each image (it may overlap the border)."""
    n, _, h, w = images.shape
    cy = torch.randint(0, h, (n, 1, 1), generator=generator, device=images.device)
    cx = torch.randint(0, w, (n, 1, 1), generator=generator, device=images.device)
    ys = torch.arange(h, device=images.device)[None, :, None]
    xs = torch.arange(w, device=images.device)[None, None, :]
    inside = ((ys - cy).abs() <= size // 2) & ((xs - cx).abs() <= size // 2)
    return images * ~inside[:, None]


def alternating_flip(images: torch.Tensor, epoch: int, seed: int) -> torch.Tensor:
    """Flip a fixed random half of the images in odd epochs and the other half in even epochs.

    Every image is seen both ways within two epochs, which random flipping only gives on average.
    """
    halves = torch.rand(len(images), generator=torch.Generator().manual_seed(seed)).to(images.device) < 0.5
    return flip_where(images, halves ^ bool(epoch % 2))


def mixup(images: torch.Tensor, alpha: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(blend, partner, weight): each image blended with a partner from the same batch, weight ~ Beta(alpha,
    alpha) for the whole batch (mixup, Zhang et al., 2018); the loss weighs the two labels by the same weights."""
    from scipy.special import betaincinv  # Beta's inverse CDF: drawn from our seeded generator, so resume replays it

    weight = float(betaincinv(alpha, alpha, torch.rand((), generator=generator, device=generator.device).item()))
    partner = torch.randperm(len(images), generator=generator, device=images.device)
    return weight * images + (1 - weight) * images[partner], partner, weight


def augment(images: torch.Tensor, kinds: list[str], generator: torch.Generator, crop_padding: int,
            cutout_size: int) -> torch.Tensor:
    """The batch with the crop (translate), random flip and cutout of `kinds` applied, in that order."""
    if "crop" in kinds and crop_padding > 0:
        images = random_crop(images, crop_padding, generator)
    if "flip" in kinds:
        images = random_flip(images, generator)
    if "cutout" in kinds and cutout_size > 0:
        images = random_cutout(images, cutout_size, generator)
    return images


def batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, *, shuffle: bool = False,
            generator: torch.Generator | None = None, drop_last: bool = False, part: tuple[int, int] = (0, 1)
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) batches in order, or in a fresh permutation when shuffle is set.

    `part=(rank, ranks)` yields only that rank's equal slice of each batch (distributed training).
    """
    n = len(images)
    order = torch.randperm(n, generator=generator, device=images.device) if shuffle else None
    stop = n - n % batch_size if drop_last and n >= batch_size else n  # one batch of all if n < batch_size
    rank, ranks = part
    for start in range(0, stop, batch_size):
        size = min(batch_size, stop - start) // ranks
        first = start + rank * size
        if order is None:
            yield images[first:first + size], labels[first:first + size]
        else:
            index = order[first:first + size]
            yield images[index], labels[index]
