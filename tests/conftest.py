import pytest


@pytest.fixture
def write_shapes():
    """write_shapes(root, n): a tiny image folder, root/a and root/b holding n 8x8 grayscale PNGs in all: a's light,
    b's dark, each of its own gray (up to n = 64; repeats would be counted as leaks between splits)."""
    from PIL import Image

    def write(root, n=40):
        for i in range(n):
            (root / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
            Image.new("L", (8, 8), 2 * i if i % 2 else 255 - 2 * i).save(root / "ab"[i % 2] / f"{i}.png")
        return root

    return write
