import torch

from imgclf.loader import augment, batches, normalize, random_crop, random_cutout, random_flip, random_window


def images(n=8, c=3, h=6, w=6):
    return torch.arange(n * c * h * w, dtype=torch.int64).remainder(251).to(torch.uint8).view(n, c, h, w)


def test_crop_is_a_translation_within_padding():
    x = images()
    out = random_crop(x, 2, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8
    # every output image equals the reflect-padded input at some offset in [0, 4]^2
    padded = torch.nn.functional.pad(x.float(), (2,) * 4, mode="reflect").to(torch.uint8)
    for i in range(len(x)):
        assert any(torch.equal(out[i], padded[i, :, dy:dy + 6, dx:dx + 6]) for dy in range(5) for dx in range(5))


def test_window_is_a_crop_at_a_random_offset():
    x = images(n=50)
    out = random_window(x, 4, torch.Generator().manual_seed(0))
    assert out.shape == (50, 3, 4, 4) and out.dtype == torch.uint8
    offsets = [next((dy, dx) for dy in range(3) for dx in range(3)
                    if torch.equal(out[i], x[i, :, dy:dy + 4, dx:dx + 4])) for i in range(len(x))]
    assert len(set(offsets)) > 4  # the windows differ from image to image


def test_flip_flips_about_half():
    x = images(n=200)
    out = random_flip(x, torch.Generator().manual_seed(0))
    flipped = [torch.equal(out[i], x[i].flip(2)) for i in range(len(x))]
    kept = [torch.equal(out[i], x[i]) for i in range(len(x))]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert 60 < sum(flipped) < 140


def test_cutout_zeroes_a_square_and_nothing_else():
    x = torch.full((16, 1, 10, 10), 7, dtype=torch.uint8)
    out = random_cutout(x, 4, torch.Generator().manual_seed(0))
    zeros = (out == 0).sum(dim=(1, 2, 3))
    assert (zeros > 0).all() and (zeros <= 25).all()
    assert ((out == 0) | (out == 7)).all()


def test_augment_is_seeded():
    x = images()
    a = augment(x, ["crop", "flip", "cutout"], torch.Generator().manual_seed(1), 4, 8)
    b = augment(x, ["crop", "flip", "cutout"], torch.Generator().manual_seed(1), 4, 8)
    assert torch.equal(a, b)


def test_batches_cover_every_image_once():
    x, y = images(n=10), torch.arange(10)
    seen = torch.cat([labels for _, labels in batches(x, y, 3, shuffle=True, generator=torch.Generator())])
    assert sorted(seen.tolist()) == list(range(10))


def test_normalize():
    x = torch.full((1, 2, 1, 1), 255, dtype=torch.uint8)
    out = normalize(x, torch.tensor([0.5, 0.0]), torch.tensor([0.5, 1.0]))
    assert torch.allclose(out.flatten(), torch.tensor([1.0, 1.0]))
