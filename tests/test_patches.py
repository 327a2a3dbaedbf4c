"""Masked patch ops (pacofr.ops.patches) against a literal float64 transcription of MAE.

The oracle (tests/_oracles.py) follows facebookresearch/mae ``models_mae.py`` line by line (einsum patchify,
gather with an index *repeated* to the feature size, ``var`` with the unbiased estimator,
``mask_token.repeat`` + ``cat`` + ``gather`` in the decoder) in float64 on the exact input
values, and is independent of the implementations under test.
"""

from __future__ import annotations

import pytest
import torch

from _oracles import mae_patchify, oracle_loss, oracle_patches, oracle_scatter, oracle_targets
from _tolerances import U16, U32, UBF16, gamma
from pacofr.ops import BackendUnavailableError, gather_patches, masked_patch_loss, patch_targets, scatter_tokens
from pacofr.ops import _launch, _patches_fused
from pacofr.ops._dispatch import backend_status, get_op

IMAGE_DTYPES = [torch.uint8, torch.float32, torch.bfloat16, torch.float16]
TOKEN_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ROUNDING = {torch.float32: 0.0, torch.float16: 2 * U16, torch.bfloat16: 2 * UBF16}
"""The last rounding of a result computed in fp32 into the output dtype, relative: one ulp (2u), since
Triton's interpreter truncates fp32 to bf16 instead of rounding to nearest (fp32 outputs: 0, the fp32
bound includes its own roundings)."""
# Measured bounds (fp32 against float64 on the same input values), about 4x the worst seen over 12 seeds of
# every case of test_patch_targets_match_mae and test_masked_patch_loss_value_and_grad, torch and triton:
TARGET_ERR = 16 * U32
"""norm-pix targets, per element, in units of M / sigma (M the patch's largest normalised magnitude
(|x| + |m|) / |s|, sigma = sqrt(var + eps)): the pixels' and the mean's rounding, amplified by 1 / sigma;
measured worst 4.4 U32 (triton, clustered patches of variance ~1e-6)."""
LOSS_REL = 16 * U32
"""masked_patch_loss relative to itself (a mean of squares, no cancellation): measured worst 3.4 U32."""
LOSS_GRAD_REL = 40 * U32
"""masked_patch_loss's gradient relative to its largest element (fp32 before any rounding to pred's dtype):
measured worst 10.2 U32."""
# (image size H, W, patch size) triples: square, non-square, p = 8 / 14 / 16
GEOMETRIES = [(32, 32, 8), (28, 42, 14), (48, 32, 16)]
FUSED = ["triton", "cuda"]


def _cpu_or_gpu_backends() -> list:
    """The backends under test: torch everywhere; fused ones where they can run (cuda: GPU only)."""
    params = [pytest.param("torch", id="torch")]
    params.append(pytest.param("triton", id="triton"))
    params.append(pytest.param("cuda", id="cuda", marks=pytest.mark.gpu))
    return params


BACKEND_PARAMS = _cpu_or_gpu_backends()


def _device_for(backend: str) -> torch.device:
    return torch.device("cuda") if backend == "cuda" else torch.device("cpu")


def _skip_unless_runnable(backend: str, op: str = "gather_patches") -> None:
    if backend not in get_op(op).impls:
        pytest.skip(f"{op} has no {backend} backend yet")
    ok, why = backend_status(backend, _device_for(backend), op)
    if not ok:
        pytest.skip(why)


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype,
           fp32_err: torch.Tensor | float = 0.0) -> None:
    """``|actual - expected| <= fp32_err (1 + r) + r |expected|`` elementwise (NaN fails): an fp32 computation
    off by at most ``fp32_err`` (absolute, broadcasting against ``expected``), then one rounding into
    ``dtype``, r = :data:`ROUNDING` of it."""
    rounding = ROUNDING[dtype]
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert actual.shape == expected.shape
    bound = torch.as_tensor(fp32_err, dtype=torch.float64) * (1 + rounding) + rounding * expected.abs()
    ok = (actual - expected).abs() <= bound
    assert ok.all(), f"{int((~ok).sum())} elements off; worst excess {((actual - expected).abs() - bound).max():.3g}"


def normalised_magnitude(images: torch.Tensor, ids: torch.Tensor, p: int, mean=None, std=None) -> torch.Tensor:
    """``(|x| + |m|) / |s|`` (B, n, P) in float64 for the pixels of the patches (x / 255 for uint8)."""
    channels = images.shape[1]
    neg_abs_mean = [0.0] * channels if mean is None else [-abs(float(v)) for v in mean]
    abs_std = [1.0] * channels if std is None else [abs(float(v)) for v in std]
    pixels = images.detach() if images.dtype == torch.uint8 else images.detach().abs()
    return oracle_patches(pixels, ids, p, neg_abs_mean, abs_std)


def normalise_err(images: torch.Tensor, ids: torch.Tensor, p: int, mean=None, std=None) -> torch.Tensor:
    """Error bound (B, n, P) of fp32 normalised pixels ``(x - m) / s`` (x / 255 for uint8) against float64:
    x / 255, m and s rounded to fp32, the subtraction and the division are 4 roundings of values at most
    ``(|x| + |m|) / |s|``: gamma(4) times that (a plain copy is exact, and within it)."""
    return gamma(4) * normalised_magnitude(images, ids, p, mean, std)


def target_err(images: torch.Tensor, ids: torch.Tensor, p: int, mean=None, std=None, eps: float = 1e-6
               ) -> torch.Tensor:
    """Error bound (B, n, 1) of fp32 norm-pix targets: :data:`TARGET_ERR` times M / sigma of each patch."""
    largest = normalised_magnitude(images, ids, p, mean, std).amax(dim=-1, keepdim=True)
    sigma = (oracle_patches(images.detach(), ids, p, mean, std).var(dim=-1, keepdim=True) + eps).sqrt()
    return TARGET_ERR * largest / sigma


def summed_grad_err(output: torch.Tensor, inputs: list[torch.Tensor], grad_out: torch.Tensor, terms: int,
                    unit: float = U32) -> list[torch.Tensor]:
    """Error bounds of gradients that sum at most ``terms`` products of ``grad_out`` (by 1 or 1 / s, rounded)
    in a format of unit roundoff ``unit`` (fp32 unless said): gamma(terms + 2) times the float64 gradient
    of |grad_out| (the sum of the terms' magnitudes)."""
    magnitudes = torch.autograd.grad(output, inputs, grad_out.double().abs(), retain_graph=True)
    return [gamma(terms + 2, unit) * m for m in magnitudes]


@pytest.fixture(autouse=True)
def poison_fused_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every buffer a fused kernel must fully overwrite starts as NaN (ints: a huge value)."""

    def poisoned(shape, dtype, device):
        fill = float("nan") if dtype.is_floating_point else 2**30
        return torch.full(shape, fill, dtype=dtype, device=device)

    monkeypatch.setattr(_launch, "new_output", poisoned)


def test_poisoning_is_active():
    assert torch.isnan(_launch.new_output((2,), torch.float32, torch.device("cpu"))).all()


# ----------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------

def make_images(batch, channels, height, width, dtype, generator, kind="gauss") -> torch.Tensor:
    """Gaussian images, or "clustered" ones (each 8x8 block a constant plus 1e-3 noise: tiny variance)."""
    if dtype == torch.uint8:
        return torch.randint(0, 256, (batch, channels, height, width), generator=generator, dtype=torch.uint8)
    if kind == "gauss":
        x = torch.randn(batch, channels, height, width, generator=generator) * 2 + 0.5
    else:
        blocks = torch.randn(batch, channels, height // 8 + 1, width // 8 + 1, generator=generator)
        base = blocks.repeat_interleave(8, 2).repeat_interleave(8, 3)[:, :, :height, :width]
        x = base + 1e-3 * torch.randn(batch, channels, height, width, generator=generator)
    return x.to(dtype)


def make_ids(batch, num_patches, n, generator, kind="random", dtype=torch.int64) -> torch.Tensor:
    """random: MAE-style (argsort of noise, first n); block: a contiguous run; dup: with replacement."""
    if kind == "random":
        ids = torch.argsort(torch.rand(batch, num_patches, generator=generator), dim=1)[:, :n]
    elif kind == "block":
        start = torch.randint(0, num_patches - n + 1, (batch, 1), generator=generator)
        ids = start + torch.arange(n).unsqueeze(0)
    elif kind == "dup":
        ids = torch.randint(0, num_patches, (batch, n), generator=generator)
        ids[:, -1] = ids[:, 0]  # at least one duplicate per row
    else:
        raise ValueError(kind)
    return ids.to(dtype).contiguous()


def channel_stats(channels: int):
    mean = [0.485, 0.456, 0.406, 0.5][:channels]
    std = [0.229, 0.224, 0.225, 0.25][:channels]
    return mean, std


# ----------------------------------------------------------------------------------------------
# gather_patches
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("dtype", IMAGE_DTYPES, ids=str)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
@pytest.mark.parametrize("normalise", [False, True])
def test_gather_patches_matches_mae(backend, dtype, geometry, normalise, generator):
    _skip_unless_runnable(backend)
    device = _device_for(backend)
    height, width, p = geometry
    channels = 3
    images = make_images(2, channels, height, width, dtype, generator).to(device)
    num_patches = (height // p) * (width // p)
    for kind, id_dtype in [("random", torch.int64), ("block", torch.int32), ("dup", torch.int32)]:
        ids = make_ids(2, num_patches, max(1, num_patches // 2), generator, kind, id_dtype).to(device)
        mean, std = channel_stats(channels) if normalise else (None, None)
        out = gather_patches(images, ids, p, mean=mean, std=std, backend=backend)
        expected_dtype = torch.float32 if dtype == torch.uint8 else dtype
        assert out.dtype == expected_dtype and out.shape == (2, ids.shape[1], p * p * channels)
        _close(out, oracle_patches(images, ids, p, mean, std), expected_dtype, normalise_err(images, ids, p, mean, std))


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_gather_patches_out_dtype_and_uint8_normalisation(backend, out_dtype, generator):
    _skip_unless_runnable(backend)
    device = _device_for(backend)
    images = make_images(3, 3, 32, 48, torch.uint8, generator).to(device)
    ids = make_ids(3, 24, 7, generator).to(device)
    mean, std = channel_stats(3)
    out = gather_patches(images, ids, 8, mean=torch.tensor(mean), std=std, out_dtype=out_dtype, backend=backend)
    assert out.dtype == out_dtype
    _close(out, oracle_patches(images, ids, 8, mean, std), out_dtype, normalise_err(images, ids, 8, mean, std))
    only_mean = gather_patches(images, ids, 8, mean=mean, out_dtype=out_dtype, backend=backend)
    _close(only_mean, oracle_patches(images, ids, 8, mean=mean), out_dtype, normalise_err(images, ids, 8, mean=mean))
    only_std = gather_patches(images, ids, 8, std=std, out_dtype=out_dtype, backend=backend)
    _close(only_std, oracle_patches(images, ids, 8, std=std), out_dtype, normalise_err(images, ids, 8, std=std))


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("layout", ["channels_last", "sliced", "single_channel"])
def test_gather_patches_non_contiguous_images_and_ids(backend, layout, generator):
    _skip_unless_runnable(backend)
    device = _device_for(backend)
    if layout == "channels_last":
        images = make_images(2, 3, 32, 32, torch.float32, generator).to(memory_format=torch.channels_last)
    elif layout == "sliced":
        images = make_images(2, 4, 40, 37, torch.float32, generator)[:, 1:, 3:35, 2:34]
    else:
        images = make_images(2, 1, 32, 32, torch.bfloat16, generator)
    images = images.to(device)
    wide_ids = make_ids(2, 16, 16, generator)
    ids = wide_ids[:, ::2].to(device)  # non-contiguous (stride 2)
    assert not ids.is_contiguous()
    images.requires_grad_()
    out = gather_patches(images, ids, 8, backend=backend)
    assert torch.equal(out.double(), oracle_patches(images, ids, 8))  # a copy
    grad_out = torch.randn(out.shape, generator=generator).to(device, out.dtype)
    (grad,) = torch.autograd.grad(out, images, grad_out)
    images64 = images.detach().double().requires_grad_()
    (expected,) = torch.autograd.grad(oracle_patches(images64, ids, 8), images64, grad_out.double())
    assert grad.shape == images.shape and grad.dtype == images.dtype
    assert torch.equal(grad.double(), expected)  # distinct ids: each pixel gets one grad_out value or 0


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_gather_patches_empty(backend):
    _skip_unless_runnable(backend)
    device = _device_for(backend)
    images = torch.randn(2, 3, 16, 16, device=device, requires_grad=True)
    ids = torch.zeros(2, 0, dtype=torch.int32, device=device)
    out = gather_patches(images, ids, 8, backend=backend)
    assert out.shape == (2, 0, 192) and out.dtype == torch.float32
    out.sum().backward()
    assert images.grad is not None and torch.count_nonzero(images.grad) == 0
    none = gather_patches(images[:0], ids[:0], 8, backend=backend)
    assert none.shape == (0, 0, 192)


def test_gather_patches_gradcheck_float64(generator):
    """Reference autograd (scatter back, duplicates accumulate) by finite differences."""
    images = torch.randn(2, 2, 8, 12, dtype=torch.float64, generator=generator, requires_grad=True)
    ids = torch.tensor([[0, 5, 5], [3, 1, 0]], dtype=torch.int32)
    torch.autograd.gradcheck(lambda x: gather_patches(x, ids, 4, mean=[0.1, -0.2], std=[0.5, 2.0]), (images,))


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_gather_patches_backward_accumulates_duplicates(backend, dtype, generator):
    _skip_unless_runnable(backend)
    device = _device_for(backend)
    images = make_images(2, 3, 28, 42, dtype, generator).to(device).requires_grad_()
    ids = make_ids(2, 6, 9, generator, "dup", torch.int32).to(device)
    mean, std = channel_stats(3)
    out = gather_patches(images, ids, 14, mean=mean, std=std, backend=backend)
    grad_out = torch.randn(out.shape, generator=generator).to(device=device, dtype=out.dtype)
    (grad,) = torch.autograd.grad(out, images, grad_out)
    images64 = images.detach().double().requires_grad_()
    patches64 = oracle_patches(images64, ids, 14, mean, std)
    (expected,) = torch.autograd.grad(patches64, images64, grad_out.double(), retain_graph=True)
    assert grad.dtype == dtype and grad.shape == images.shape
    # each pixel sums its duplicates' g / s: in fp32 on the fused backends, in the image's dtype on torch
    # (autograd's backward of the indexing adds in that dtype)
    unit = {torch.float32: U32, torch.float16: U16, torch.bfloat16: UBF16}[dtype] if backend == "torch" else U32
    (err,) = summed_grad_err(patches64, [images64], grad_out, ids.shape[1], unit)
    _close(grad, expected, dtype, err)


# ----------------------------------------------------------------------------------------------
# patch_targets and masked_patch_loss
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("dtype", IMAGE_DTYPES, ids=str)
@pytest.mark.parametrize("norm_pix", [True, False])
@pytest.mark.parametrize("kind", ["gauss", "clustered"])
def test_patch_targets_match_mae(backend, dtype, norm_pix, kind, generator):
    _skip_unless_runnable(backend, "patch_targets")
    device = _device_for(backend)
    for height, width, p in GEOMETRIES:
        images = make_images(2, 3, height, width, dtype, generator, kind).to(device)
        num_patches = (height // p) * (width // p)
        ids = make_ids(2, num_patches, num_patches - 1, generator, "random", torch.int32).to(device)
        out = patch_targets(images, ids, p, norm_pix=norm_pix, backend=backend)
        assert out.dtype == torch.float32 and out.shape == (2, num_patches - 1, p * p * 3)
        # clustered patches have a variance ~ eps: the fp32 mean's rounding is amplified ~1/sqrt(eps)
        err = target_err(images, ids, p) if norm_pix else normalise_err(images, ids, p)
        _close(out, oracle_targets(images, ids, p, norm_pix=norm_pix), torch.float32, err)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_patch_targets_mean_std_eps_and_constant_patches(backend, generator):
    _skip_unless_runnable(backend, "patch_targets")
    device = _device_for(backend)
    images = make_images(2, 3, 16, 32, torch.uint8, generator)
    images[0, :, :8, :8] = 7  # a constant patch: variance 0, target 0 (not NaN)
    images = images.to(device)
    ids = torch.tensor([[0, 1, 2], [7, 7, 4]], dtype=torch.int64, device=device)
    mean, std = channel_stats(3)
    for eps in (1e-6, 0.5):
        out = patch_targets(images, ids, 8, eps=eps, mean=mean, std=std, backend=backend)
        _close(out, oracle_targets(images, ids, 8, eps=eps, mean=mean, std=std), torch.float32,
               target_err(images, ids, 8, mean, std, eps))
    constant = patch_targets(images, ids, 8, backend=backend)  # without per-channel stats patch 0 is flat
    assert torch.count_nonzero(constant[0, 0]) == 0 and torch.isfinite(constant).all()
    raw = patch_targets(images, ids, 8, norm_pix=False, mean=mean, std=std, backend=backend)
    _close(raw, oracle_patches(images, ids, 8, mean, std), torch.float32, normalise_err(images, ids, 8, mean, std))


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("tiny", [1e-20, 1e-30])
def test_a_tiny_std_neither_overflows_nor_zeroes_targets_and_loss(backend, tiny, generator):
    """Issue 32 item 9: std = 1e-20 normalises pixels to ~1e20; their squares (1e40) overflowed fp32,
    so every target was 0 and the loss 0 (float64: targets up to ~1.8, loss ~1). The norm-pix target
    does not depend on a common scale of the pixels, so float64 gives the same values as for std 1;
    the fp32 results must match float64 with the bounds of the ordinary uint8 case."""
    _skip_unless_runnable(backend, "masked_patch_loss")
    device = _device_for(backend)
    images = make_images(2, 3, 16, 32, torch.uint8, generator).to(device)
    ids = torch.tensor([[0, 1, 5], [7, 2, 4]], dtype=torch.int64, device=device)
    stats = dict(mean=[0.5, 0.4, 0.3], std=[tiny] * 3)
    out = patch_targets(images, ids, 8, backend=backend, **stats)
    want = oracle_targets(images, ids, 8, **stats)
    assert want.abs().max() > 1.0  # what the fp32 overflow had zeroed
    _close(out, want, torch.float32, target_err(images, ids, 8, **stats))
    pred = torch.zeros(want.shape, device=device, requires_grad=True)
    loss = masked_patch_loss(pred, images, ids, 8, backend=backend, **stats)
    pred64 = pred.detach().double().requires_grad_()
    expected = oracle_loss(pred64, images, ids, 8, **stats)
    torch.testing.assert_close(loss.double().cpu(), expected.cpu(), rtol=LOSS_REL, atol=0)  # as the loss test
    (grad,) = torch.autograd.grad(loss, pred)
    (expected_grad,) = torch.autograd.grad(expected, pred64)
    _close(grad, expected_grad, torch.float32, LOSS_GRAD_REL * expected_grad.abs().max().item())


def test_a_nan_or_infinite_mean_is_refused_by_name():
    """Issue 32 item 9: gather_patches checked std but took a NaN mean (every patch NaN)."""
    images = torch.zeros(1, 3, 16, 16)
    ids = torch.tensor([[0, 1]])
    for mean in ([0.5, float("nan"), 0.5], torch.tensor([0.5, 0.5, float("inf")])):
        for op in (lambda **kw: gather_patches(images, ids, 8, **kw), lambda **kw: patch_targets(images, ids, 8, **kw)):
            with pytest.raises(ValueError, match="mean must be finite"):
                op(mean=mean)
    gather_patches(images, ids, 8, mean=torch.tensor([0.5, 0.5, float("nan")]), validate=False)  # no sync asked


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_patch_targets_are_constants_and_empty_works(backend, generator):
    _skip_unless_runnable(backend, "patch_targets")
    device = _device_for(backend)
    images = torch.randn(2, 3, 16, 16, device=device, requires_grad=True)
    ids = torch.tensor([[0, 3], [1, 2]], device=device)
    assert not patch_targets(images, ids, 8, backend=backend).requires_grad
    empty = patch_targets(images, ids[:, :0], 8, backend=backend)
    assert empty.shape == (2, 0, 192) and empty.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("image_dtype", IMAGE_DTYPES, ids=str)
@pytest.mark.parametrize("pred_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("norm_pix", [True, False])
def test_masked_patch_loss_value_and_grad(backend, image_dtype, pred_dtype, norm_pix, generator):
    _skip_unless_runnable(backend, "masked_patch_loss")
    device = _device_for(backend)
    for height, width, p in GEOMETRIES[:2]:
        images = make_images(3, 3, height, width, image_dtype, generator).to(device)
        num_patches = (height // p) * (width // p)
        ids = make_ids(3, num_patches, max(1, (3 * num_patches) // 4), generator).to(device)
        mean, std = channel_stats(3) if image_dtype == torch.uint8 else (None, None)
        target = oracle_targets(images, ids, p, norm_pix=norm_pix, mean=mean, std=std)
        pred = (target + 0.3 * torch.randn(target.shape, generator=generator, dtype=torch.float64))
        pred = pred.to(pred_dtype).requires_grad_()
        loss = masked_patch_loss(pred, images, ids, p, norm_pix=norm_pix, mean=mean, std=std, backend=backend)
        assert loss.dtype == torch.float32 and loss.dim() == 0
        pred64 = pred.detach().double().requires_grad_()
        expected = oracle_loss(pred64, images, ids, p, norm_pix=norm_pix, mean=mean, std=std)
        torch.testing.assert_close(loss.double().cpu(), expected.cpu(), rtol=LOSS_REL, atol=0)
        (grad,) = torch.autograd.grad(loss * 3.0, pred)
        (expected_grad,) = torch.autograd.grad(expected * 3.0, pred64)
        assert grad.dtype == pred_dtype
        _close(grad, expected_grad, pred_dtype, LOSS_GRAD_REL * expected_grad.abs().max().item())


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_masked_patch_loss_equals_mae_forward_loss(backend, generator):
    """Scoring the masked patches equals MAE's forward_loss (all patches, masked mean)."""
    _skip_unless_runnable(backend, "masked_patch_loss")
    device = _device_for(backend)
    batch, p, size = 2, 8, 32
    num_patches = (size // p) ** 2
    images = make_images(batch, 3, size, size, torch.float32, generator)
    len_keep = int(num_patches * (1 - 0.75))
    noise = torch.rand(batch, num_patches, generator=generator)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(batch, num_patches)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    pred_full = torch.randn(batch, num_patches, p * p * 3, generator=generator)
    # MAE forward_loss, literally (norm_pix_loss=True), in float64 on the same values: the truth is not fp32 torch
    images64, pred_full = images.double(), pred_full.double()
    target = mae_patchify(images64, p)
    m, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
    target = (target - m) / (var + 1.0e-6) ** 0.5
    mae = (((pred_full - target) ** 2).mean(dim=-1) * mask).sum() / mask.sum()
    ids_masked = ids_shuffle[:, len_keep:]
    pred_masked = torch.gather(pred_full, 1, ids_masked.unsqueeze(-1).expand(-1, -1, p * p * 3)).float()
    ours = masked_patch_loss(pred_masked.to(device), images.to(device), ids_masked.to(device), p, backend=backend)
    torch.testing.assert_close(ours.double().cpu(), mae, rtol=LOSS_REL, atol=0)


def test_masked_patch_loss_gradcheck_float64(generator):
    images = torch.randint(0, 256, (2, 2, 8, 8), generator=generator, dtype=torch.uint8)
    ids = torch.tensor([[0, 3, 3], [2, 1, 0]])
    pred = torch.randn(2, 3, 32, dtype=torch.float64, generator=generator, requires_grad=True)
    torch.autograd.gradcheck(lambda x: masked_patch_loss(x, images, ids, 4, mean=[0.4, 0.5], std=[0.2, 0.3]),
                             (pred,))


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_masked_patch_loss_empty_is_zero_with_zero_grad(backend):
    _skip_unless_runnable(backend, "masked_patch_loss")
    device = _device_for(backend)
    images = torch.randn(2, 3, 16, 16, device=device)
    ids = torch.zeros(2, 0, dtype=torch.int32, device=device)
    pred = torch.zeros(2, 0, 192, dtype=torch.bfloat16, device=device, requires_grad=True)
    loss = masked_patch_loss(pred, images, ids, 8, backend=backend)
    assert loss.dtype == torch.float32 and loss.item() == 0.0
    loss.backward()
    assert pred.grad is not None and pred.grad.shape == pred.shape


# ----------------------------------------------------------------------------------------------
# scatter_tokens
# ----------------------------------------------------------------------------------------------

def scatter_err(leaves64: list[torch.Tensor], ids_restore: torch.Tensor, mask_in: torch.Tensor, with_pos: bool,
                dtype: torch.dtype) -> torch.Tensor | float:
    """Error bound of scattered tokens before their rounding into ``dtype``: a copy is exact; adding the
    position embedding in fp32 rounds once, U32 (|token| + |pos|), and the mask token rounded into a 16-bit
    ``dtype`` first may sit one ulp (:data:`ROUNDING`) from the oracle's round-to-nearest copy (Triton's
    interpreter truncates)."""
    if not with_pos:
        return 0.0
    return (U32 + ROUNDING[dtype]) * oracle_scatter(leaves64[0].detach().abs(), ids_restore, mask_in.detach().abs(),
                                                    leaves64[2].detach().abs())


def mae_ids_restore(batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    ids_shuffle = torch.argsort(torch.rand(batch, length, generator=generator), dim=1)
    return torch.argsort(ids_shuffle, dim=1)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("dtype", TOKEN_DTYPES, ids=str)
@pytest.mark.parametrize("with_pos", [True, False])
@pytest.mark.parametrize("n_visible", [0, 5, 16])
def test_scatter_tokens_forward_backward(backend, dtype, with_pos, n_visible, generator):
    _skip_unless_runnable(backend, "scatter_tokens")
    device = _device_for(backend)
    batch, length, dim = 3, 16, 40
    visible = torch.randn(batch, n_visible, dim, generator=generator).to(device, dtype).requires_grad_()
    ids_restore = mae_ids_restore(batch, length, generator).to(torch.int32).to(device)
    mask_token = torch.randn(1, 1, dim, generator=generator).to(device).requires_grad_()  # fp32 parameter
    pos = torch.randn(1, length, dim, generator=generator).to(device).requires_grad_() if with_pos else None
    out = scatter_tokens(visible, ids_restore, mask_token, pos_embed=pos, backend=backend)
    assert out.dtype == dtype and out.shape == (batch, length, dim)
    # reference on the values the op uses: the mask token rounded to the tokens' dtype
    leaves = [visible, mask_token] + ([pos] if with_pos else [])
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    # (rounded in value only: autograd through the cast would round the oracle's mask gradient to dtype too)
    mask_in = leaves64[1] + (leaves64[1].to(dtype).double() - leaves64[1]).detach()
    expected = oracle_scatter(leaves64[0], ids_restore, mask_in, leaves64[2] if with_pos else None)
    _close(out, expected, dtype, scatter_err(leaves64, ids_restore, mask_in, with_pos, dtype))
    grad_out = torch.randn(out.shape, generator=generator).to(device, dtype)
    grads = torch.autograd.grad(out, leaves, grad_out)
    expected_grads = torch.autograd.grad(expected, leaves64, grad_out.double(), retain_graph=True)
    errs = summed_grad_err(expected, leaves64, grad_out, batch * length)
    for leaf, grad, want, err in zip(leaves, grads, expected_grads, errs):
        assert grad.dtype == leaf.dtype and grad.shape == leaf.shape
        # sums in fp32, then (torch: autograd through the mask token's cast) one rounding into the tokens' dtype
        _close(grad, want, dtype, err)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_scatter_tokens_duplicates_and_non_contiguous(backend, generator):
    _skip_unless_runnable(backend, "scatter_tokens")
    device = _device_for(backend)
    batch, length, dim, n_visible = 2, 9, 33, 4
    wide = torch.randn(batch, dim, n_visible, generator=generator).to(device)
    visible = wide.transpose(1, 2).requires_grad_()  # non-contiguous (B, n_vis, D) view
    ids_restore = torch.randint(0, length, (batch, length), generator=generator).to(device)
    ids_restore[:, 0] = 1
    ids_restore[:, 1] = 1  # visible token 1 used twice
    mask_token = torch.randn(dim, generator=generator, dtype=torch.float64).float().to(device).requires_grad_()
    pos = torch.randn(length, dim, generator=generator).to(device).t().contiguous().t().requires_grad_()
    out = scatter_tokens(visible, ids_restore, mask_token, pos_embed=pos, backend=backend)
    leaves = [visible, mask_token, pos]
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    expected = oracle_scatter(leaves64[0], ids_restore, leaves64[1], leaves64[2])
    _close(out, expected, torch.float32, scatter_err(leaves64, ids_restore, leaves64[1], True, torch.float32))
    grad_out = torch.randn(out.shape, generator=generator).to(device)
    errs = summed_grad_err(expected, leaves64, grad_out, batch * length)
    for grad, want, err in zip(torch.autograd.grad(out, leaves, grad_out),
                               torch.autograd.grad(expected, leaves64, grad_out.double()), errs):
        _close(grad, want, torch.float32, err)


def test_scatter_tokens_gradcheck_float64(generator):
    visible = torch.randn(2, 3, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    ids_restore = torch.tensor([[4, 0, 2, 1, 3, 0], [5, 4, 3, 2, 1, 0]], dtype=torch.int32)
    mask_token = torch.randn(1, 1, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    pos = torch.randn(6, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    torch.autograd.gradcheck(lambda v, m, q: scatter_tokens(v, ids_restore, m, pos_embed=q),
                             (visible, mask_token, pos))


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_scatter_tokens_empty_batch_and_length(backend):
    _skip_unless_runnable(backend, "scatter_tokens")
    device = _device_for(backend)
    visible = torch.zeros(0, 0, 8, device=device, requires_grad=True)
    mask_token = torch.zeros(8, device=device, requires_grad=True)
    out = scatter_tokens(visible, torch.zeros(0, 5, dtype=torch.int64, device=device), mask_token, backend=backend)
    assert out.shape == (0, 5, 8)
    out.sum().backward()
    assert mask_token.grad is not None and torch.count_nonzero(mask_token.grad) == 0
    empty_l = scatter_tokens(torch.zeros(2, 0, 8, device=device), torch.zeros(2, 0, dtype=torch.int32, device=device),
                             mask_token, pos_embed=torch.zeros(0, 8, device=device), backend=backend)
    assert empty_l.shape == (2, 0, 8)


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------

def test_errors_name_the_argument():
    images = torch.zeros(2, 3, 32, 32)
    ids = torch.zeros(2, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"multiples of patch_size=16.*H=30.*rejects"):
        gather_patches(torch.zeros(2, 3, 30, 32), ids, 16)
    with pytest.raises(ValueError, match="images must have 4 dimensions"):
        gather_patches(torch.zeros(3, 32, 32), ids, 16)
    with pytest.raises(TypeError, match="images must have dtype"):
        gather_patches(images.int(), ids, 16)
    with pytest.raises(TypeError, match="ids must have dtype"):
        gather_patches(images, ids.float(), 16)
    with pytest.raises(ValueError, match=r"ids must have shape \(B, n\) with B=2"):
        gather_patches(images, ids[:1], 16)
    with pytest.raises(ValueError, match="ids must have 2 dimensions"):
        gather_patches(images, ids[0], 16)
    with pytest.raises(IndexError, match=r"ids must hold patch indices .* \[0, 4\), got values in \[0, 4\]"):
        gather_patches(images, torch.tensor([[0, 4], [1, 2]]), 16)
    with pytest.raises(IndexError, match=r"ids .* got values in \[-1, -1\]"):
        gather_patches(images, ids - 1, 16)
    with pytest.raises(ValueError, match="ids is on meta but images is on cpu"):
        gather_patches(images, ids.to("meta"), 16, validate=False)
    with pytest.raises(ValueError, match="patch_size must be >= 1"):
        gather_patches(images, ids, 0)
    with pytest.raises(TypeError, match="patch_size must be an int"):
        gather_patches(images, ids, 16.0)
    with pytest.raises(ValueError, match=r"mean must have one value per channel \(C=3\), got 2"):
        gather_patches(images, ids, 16, mean=[0.5, 0.5])
    with pytest.raises(ValueError, match="std must be finite and non-zero"):
        gather_patches(images, ids, 16, std=[1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="std must be finite and non-zero"):
        gather_patches(images, ids, 16, std=torch.tensor([1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="mean is on meta but images are on cpu"):
        gather_patches(images, ids, 16, mean=torch.zeros(3, device="meta"))
    with pytest.raises(TypeError, match="mean must be a sequence"):
        gather_patches(images, ids, 16, mean="abc")
    with pytest.raises(TypeError, match="out_dtype must be one of"):
        gather_patches(images, ids, 16, out_dtype=torch.int32)
    with pytest.raises(ValueError, match="backend must be one of"):
        gather_patches(images, ids, 16, backend="opencl")


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_eps_zero_on_a_constant_patch_is_rejected_on_every_backend(backend):
    """Issue 18: eps = 0 gave -inf (torch) and 0.943 (triton) on a constant patch; both now refuse it."""
    _skip_unless_runnable(backend, "patch_targets")
    device = _device_for(backend)
    images = torch.full((1, 3, 8, 8), 0.25, device=device)
    ids = torch.zeros(1, 1, dtype=torch.int64, device=device)
    pred = torch.zeros(1, 1, 48, device=device)
    with pytest.raises(ValueError, match=r"eps must be a finite number > 0 with norm_pix .* got 0\.0"):
        patch_targets(images, ids, 4, eps=0.0, backend=backend)
    with pytest.raises(ValueError, match=r"eps must be a finite number > 0 with norm_pix .* got 0"):
        masked_patch_loss(pred, images, ids, 4, eps=0, backend=backend)
    assert (patch_targets(images, ids, 4, eps=1e-6, backend=backend) == 0).all()


def test_loss_and_targets_errors():
    images = torch.zeros(2, 1, 4, 4)
    ids = torch.zeros(2, 3, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"norm_pix needs at least 2 values per patch.*P = .* = 1"):
        patch_targets(images, ids, 1)
    patch_targets(images, ids, 1, norm_pix=False)  # allowed without norm_pix
    for eps in (-1.0, 0.0, float("inf")):
        with pytest.raises(ValueError, match="eps must be a finite number > 0 with norm_pix"):
            patch_targets(images, ids, 2, eps=eps)
    patch_targets(images, ids, 2, norm_pix=False, eps=0.0)  # eps is unused without norm_pix
    with pytest.raises(TypeError, match="norm_pix must be a bool"):
        patch_targets(images, ids, 2, norm_pix=1)
    with pytest.raises(ValueError, match=r"pred must have shape \(B, n, p\*p\*C\) = \(2, 3, 4\)"):
        masked_patch_loss(torch.zeros(2, 3, 5), images, ids, 2)
    with pytest.raises(TypeError, match="pred must have dtype"):
        masked_patch_loss(torch.zeros(2, 3, 4, dtype=torch.int64), images, ids, 2)
    with pytest.raises(ValueError, match="pred is on meta but images is on cpu"):
        masked_patch_loss(torch.zeros(2, 3, 4, device="meta"), images, ids, 2, validate=False)


def test_scatter_tokens_errors():
    visible = torch.zeros(2, 3, 8)
    ids_restore = torch.zeros(2, 5, dtype=torch.int64)
    mask_token = torch.zeros(1, 1, 8)
    with pytest.raises(ValueError, match=r"ids_restore must have shape \(B, L\) with B=2"):
        scatter_tokens(visible, ids_restore[:1], mask_token)
    with pytest.raises(ValueError, match=r"n_vis=3 .* L=2"):
        scatter_tokens(visible, ids_restore[:, :2], mask_token)
    with pytest.raises(ValueError, match=r"mask_token must have shape \(D,\), \(1, D\) or \(1, 1, D\) with D=8"):
        scatter_tokens(visible, ids_restore, torch.zeros(1, 2, 8))
    with pytest.raises(ValueError, match=r"pos_embed must have shape \(L, D\) or \(1, L, D\) = \(5, 8\)"):
        scatter_tokens(visible, ids_restore, mask_token, pos_embed=torch.zeros(4, 8))
    with pytest.raises(IndexError, match=r"ids_restore must hold token positions in \[0, 5\)"):
        scatter_tokens(visible, ids_restore + 5, mask_token)
    with pytest.raises(TypeError, match="ids_restore must have dtype"):
        scatter_tokens(visible, ids_restore.float(), mask_token)
    with pytest.raises(TypeError, match="visible_tokens must have dtype"):
        scatter_tokens(visible.int(), ids_restore, mask_token)
    with pytest.raises(ValueError, match="mask_token is on meta but visible_tokens is on cpu"):
        scatter_tokens(visible, ids_restore, mask_token.to("meta"), validate=False)


def test_fused_backends_refuse_float64_by_name():
    _skip_unless_runnable("triton")
    with pytest.raises(BackendUnavailableError, match="gather_patches: backend 'triton' does not take float64"):
        gather_patches(torch.zeros(1, 3, 16, 16, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.int64), 8,
                       backend="triton")


def test_auto_uses_torch_for_float64_and_on_cpu():
    images = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    ids = torch.tensor([[2, 0]])
    out = gather_patches(images, ids, 8)
    assert out.dtype == torch.float64
    assert torch.equal(out, oracle_patches(images, ids, 8))  # a copy, exact
    assert all(get_op(name).auto_order == ("triton", "cuda", "torch")
               for name in ("gather_patches", "patch_targets", "masked_patch_loss", "scatter_tokens"))


# ----------------------------------------------------------------------------------------------
# fused backends only: bad indices without validation, larger cross-backend checks
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", [p for p in BACKEND_PARAMS if p.values[0] != "torch"])
def test_fused_out_of_range_ids_without_validation_give_nan_rows(backend, generator):
    _skip_unless_runnable(backend)
    device = _device_for(backend)
    images = make_images(2, 3, 16, 16, torch.float32, generator).to(device).requires_grad_()
    ids = torch.tensor([[0, 4], [-1, 3]], device=device)
    out = gather_patches(images, ids, 8, backend=backend, validate=False)
    assert torch.isnan(out[0, 1]).all() and torch.isnan(out[1, 0]).all()
    assert torch.equal(out[0, 0].double(), oracle_patches(images, ids.clamp(0, 3), 8)[0, 0])  # a copy, exact
    (grad,) = torch.autograd.grad(out, images, torch.ones_like(out))
    assert torch.isfinite(grad).all() and grad.sum().item() == 2 * 192  # 384 ones and zeros: an exact fp32 sum
    targets = patch_targets(images.detach(), ids, 8, backend=backend, validate=False)
    assert torch.isnan(targets[0, 1]).all() and torch.isfinite(targets[0, 0]).all()
    loss = masked_patch_loss(torch.zeros(2, 2, 192, device=device), images.detach(), ids, 8, backend=backend,
                             validate=False)
    assert torch.isnan(loss)
    visible = torch.randn(1, 2, 8, device=device)
    tokens = scatter_tokens(visible, torch.tensor([[0, 7, 1]], device=device), torch.zeros(8, device=device),
                            backend=backend, validate=False)
    assert torch.isnan(tokens[0, 1]).all() and torch.equal(tokens[0, 0], visible[0, 0])


@pytest.mark.parametrize("backend", [p for p in BACKEND_PARAMS if p.values[0] != "torch"])
def test_fused_matches_torch_backend_on_mae_like_shapes(backend, generator):
    """uint8 48x48 images, p=16, 75% masking, mean/std: values and gradients vs the torch backend."""
    _skip_unless_runnable(backend)
    device = _device_for(backend)
    batch, size, p = 3, 48, 16
    num_patches = (size // p) ** 2
    images = make_images(batch, 3, size, size, torch.uint8, generator).to(device)
    ids_shuffle = torch.argsort(torch.rand(batch, num_patches, generator=generator), dim=1).to(device)
    ids_keep, ids_masked = ids_shuffle[:, :2].int(), ids_shuffle[:, 2:].int()
    mean, std = channel_stats(3)
    visible = {b: gather_patches(images, ids_keep, p, mean=mean, std=std, out_dtype=torch.bfloat16, backend=b)
               for b in ("torch", backend)}
    # same fp32 math, so bit-equal on a GPU; Triton's interpreter rounds fp32 -> bf16 by truncation
    # (one bf16 ulp, 2**-7 relative, below round-to-nearest)
    one_ulp = 2.0**-7 if device.type == "cpu" else 0.0
    torch.testing.assert_close(visible[backend], visible["torch"], rtol=one_ulp, atol=0)
    for b in ("torch", backend):  # and both against float64
        _close(visible[b], oracle_patches(images, ids_keep, p, mean, std), torch.bfloat16,
               normalise_err(images, ids_keep, p, mean, std))
    pred = torch.randn(batch, num_patches - 2, p * p * 3, generator=generator).to(device, torch.bfloat16)
    losses, grads = {}, {}
    for b in ("torch", backend):
        leaf = pred.clone().requires_grad_()
        losses[b] = masked_patch_loss(leaf, images, ids_masked, p, mean=mean, std=std, backend=b)
        (grads[b],) = torch.autograd.grad(losses[b], leaf)
    # each backend against float64 (the torch backend is code under test too, not a reference)
    pred64 = pred.double().cpu().requires_grad_()
    expected = oracle_loss(pred64, images.cpu(), ids_masked.cpu(), p, mean=mean, std=std)
    (expected_grad,) = torch.autograd.grad(expected, pred64)
    for b in ("torch", backend):
        torch.testing.assert_close(losses[b].double().cpu(), expected, rtol=LOSS_REL, atol=0)
        _close(grads[b], expected_grad, torch.bfloat16, LOSS_GRAD_REL * expected_grad.abs().max().item())


@pytest.mark.parametrize("backend", [p for p in BACKEND_PARAMS if p.values[0] != "torch"])
def test_fused_scatter_tokens_many_blocks_and_batch_chunks(backend, generator):
    """B above the backward's batch chunk, L over several position blocks, D over two feature blocks."""
    _skip_unless_runnable(backend, "scatter_tokens")
    device = _device_for(backend)
    batch, length, dim, n_visible = 2 * _patches_fused.SCATTER_BATCH_CHUNK + 1, 37, 260, 9
    visible = torch.randn(batch, n_visible, dim, generator=generator).to(device).requires_grad_()
    ids_restore = mae_ids_restore(batch, length, generator).to(device)
    mask_token = torch.randn(dim, generator=generator).to(device).requires_grad_()
    pos = torch.randn(length, dim, generator=generator).to(device, torch.bfloat16).requires_grad_()
    out = scatter_tokens(visible, ids_restore, mask_token, pos_embed=pos, backend=backend)
    leaves = [visible, mask_token, pos]
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    expected = oracle_scatter(leaves64[0], ids_restore, leaves64[1], leaves64[2])
    _close(out, expected, torch.float32, scatter_err(leaves64, ids_restore, leaves64[1], True, torch.float32))
    grad_out = torch.randn(out.shape, generator=generator).to(device)
    grads = torch.autograd.grad(out, leaves, grad_out)
    expected_grads = torch.autograd.grad(expected, leaves64, grad_out.double(), retain_graph=True)
    errs = summed_grad_err(expected, leaves64, grad_out, batch * length)
    for leaf, grad, want, err in zip(leaves, grads, expected_grads, errs):
        assert grad.dtype == leaf.dtype
        _close(grad, want, leaf.dtype, err)
