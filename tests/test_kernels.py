"""The fused [max-pool ->] batch norm -> GELU kernel against torch's own layers."""

import pytest
import torch
import torch.nn.functional as F

from imgclf import kernels
from imgclf.models import ShiftOnlyBatchNorm, create_model

needs_kernel = pytest.mark.skipif(kernels.library() is None, reason="no C compiler with OpenMP")


def channels_last_bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)


@needs_kernel
@pytest.mark.parametrize("shape, pool", [((4, 8, 7, 7), True), ((3, 16, 6, 5), True), ((2, 24, 5, 4), False),
                                         ((6, 8, 3, 3), True)])
def test_fused_kernel_matches_torchs_layers(shape, pool):
    torch.manual_seed(0)
    x = channels_last_bf16(torch.randn(shape) * 2 + 0.5)  # odd sizes: the last row and column are dropped
    ours, torchs = ShiftOnlyBatchNorm(shape[1], 0.6), ShiftOnlyBatchNorm(shape[1], 0.6)
    ours.bias.data.normal_()
    torchs.load_state_dict(ours.state_dict())
    x_ours, x_torch = x.clone().requires_grad_(), x.float().requires_grad_()
    y_ours = kernels.pool_batch_norm_gelu(x_ours, ours, pool)
    y_torch = F.gelu(torchs(F.max_pool2d(x_torch, 2) if pool else x_torch))
    grad = torch.randn(y_torch.shape).to(torch.bfloat16)
    y_ours.backward(grad)
    y_torch.backward(grad.float())
    assert y_ours.dtype == x_ours.grad.dtype == torch.bfloat16
    assert x_ours.grad.is_contiguous(memory_format=torch.channels_last)
    for a, b in [(y_ours, y_torch), (x_ours.grad, x_torch.grad), (ours.bias.grad, torchs.bias.grad),
                 (ours.running_mean, torchs.running_mean), (ours.running_var, torchs.running_var)]:
        assert torch.allclose(a.float(), b, rtol=0.01, atol=0.01 * b.abs().max().item())
    assert ours.num_batches_tracked == torchs.num_batches_tracked == 1


@needs_kernel
def test_fused_pool_sends_the_gradient_to_the_first_of_tied_maxima_like_torch():
    x = channels_last_bf16(torch.randint(0, 3, (2, 16, 6, 6)).float())  # many ties
    grad, grads = torch.randn(2, 16, 3, 3).to(torch.bfloat16), []
    for fused in (True, False):
        x_in = x.clone().requires_grad_()
        bn = ShiftOnlyBatchNorm(16, 0.6)
        y = kernels.pool_batch_norm_gelu(x_in, bn, True) if fused else F.gelu(bn(F.max_pool2d(x_in, 2)))
        y.backward(grad)
        grads.append(x_in.grad.abs() > 1e-4)  # rounding leaves tiny gradients where torch has 0
    assert torch.equal(*grads)


@needs_kernel
def test_fastnet_uses_the_kernel_only_in_bf16_channels_last_training():
    net = create_model("fastnet", widths=[8, 16, 16]).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)

    def fused_used() -> bool:
        out, seen = net(x), set()
        stack = [out.grad_fn]
        while stack:
            fn = stack.pop()
            if fn is not None and fn not in seen:
                seen.add(fn)
                stack.extend(f for f, _ in fn.next_functions)
        return any("PoolBatchNormGelu" in type(fn).__name__ for fn in seen)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused_used()
        net.eval()
        assert not fused_used()  # evaluation: the running statistics, through torch's layers
        net.train()
    assert not fused_used()  # fp32


@needs_kernel
def test_fastnet_trains_the_same_with_and_without_the_kernel(monkeypatch):
    losses = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(kernels, "usable", lambda x: False)
        torch.manual_seed(0)
        net = create_model("fastnet", widths=[8, 16, 16]).to(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        x = torch.randn(16, 3, 32, 32).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (16,))
        for _ in range(3):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(net(x).float(), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=0.02)


def test_kernel_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("IMGCLF_FUSED", "0")
    kernels.library.cache_clear()
    try:
        assert kernels.library() is None
        assert not kernels.usable(channels_last_bf16(torch.randn(2, 8, 4, 4)))
    finally:
        monkeypatch.delenv("IMGCLF_FUSED")
        kernels.library.cache_clear()


@needs_kernel
def test_a_damaged_cached_kernel_is_built_again(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    path = kernels.cached_path(kernels.compiler())
    path.parent.mkdir(parents=True)
    path.write_bytes(b"cut short by a kill")
    kernels.library.cache_clear()
    try:
        assert kernels.library() is not None
        assert path.stat().st_size > 1000
    finally:
        kernels.library.cache_clear()


def test_a_failed_build_falls_back_to_torch_and_is_not_tried_again(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that fails
    kernels.library.cache_clear()
    try:
        assert kernels.library() is None
        failed = kernels.cached_path("false").with_suffix(".failed")
        assert failed.exists()
        monkeypatch.setattr(kernels, "_build", lambda *a: pytest.fail("built again"))
        kernels.library.cache_clear()
        assert kernels.library() is None
    finally:
        kernels.library.cache_clear()


@pytest.mark.parametrize("script", ["kill -9 $$",  # the driver killed
                                    # cc1 killed (the OOM killer's choice): the driver says so and exits 1
                                    "echo 'gcc: fatal error: Killed signal terminated program cc1' >&2; exit 1"])
def test_a_compiler_killed_by_a_signal_is_tried_again_by_the_next_process(monkeypatch, tmp_path, script):
    cc = tmp_path / "cc"
    cc.write_text(f"#!/bin/sh\n{script}\n")
    cc.chmod(0o755)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("CC", str(cc))
    kernels.library.cache_clear()
    try:
        assert kernels.library() is None
        assert not kernels.cached_path(str(cc)).with_suffix(".failed").exists()
    finally:
        kernels.library.cache_clear()


def test_an_upgraded_compiler_at_the_same_path_gets_its_own_cached_kernel(tmp_path):
    cc = tmp_path / "cc"
    paths = []
    for version in ("cc 12.2.0", "cc 13.1.0"):
        cc.write_text(f"#!/bin/sh\necho '{version}'\n")
        cc.chmod(0o755)
        paths.append(kernels.cached_path(str(cc)))
    assert paths[0] != paths[1]


@needs_kernel
def test_a_home_without_a_writable_cache_still_gets_the_kernel(monkeypatch, tmp_path):
    (tmp_path / ".cache").write_text("a file where the cache folder would go")  # mkdir fails, even for root
    monkeypatch.setenv("HOME", str(tmp_path))
    kernels.library.cache_clear()
    try:
        assert kernels.library() is not None
    finally:
        kernels.library.cache_clear()
