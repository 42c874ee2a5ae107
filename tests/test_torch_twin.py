"""The PyTorch twin (benchmarks/torch_unet.py) computes exactly our U-Net and loss.

Same parameters copied from a Flax init -> same outputs (every deep-supervision head), same
loss, same gradients, in 2D and 3D (float32; tolerances below). Skipped without torch.
"""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from unetjax.losses import segmentation_loss  # noqa: E402
from unetjax.models import UNet, stage_features, unet_param_count  # noqa: E402

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "torch_unet.py"
_spec = importlib.util.spec_from_file_location("torch_unet", _PATH)
torch_unet = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(torch_unet)

# float32 on both sides; differences are summation-order rounding only.
RTOL, ATOL = 1e-4, 1e-4
GRAD_RTOL, GRAD_ATOL = 1e-3, 1e-5

CASES = {
    "2d_conv_deep": dict(
        spatial=(16, 24),
        strides=[(1, 1), (2, 2), (2, 2)],
        kernels=[(3, 3)] * 3,
        downsample="conv",
        deep=True,
        cin=3,
        classes=2,
    ),
    "2d_maxpool": dict(
        spatial=(16, 16),
        strides=[(1, 1), (2, 2), (2, 2)],
        kernels=[(3, 3)] * 3,
        downsample="maxpool",
        deep=False,
        cin=1,
        classes=3,
    ),
    "3d_anisotropic_deep": dict(
        spatial=(4, 8, 8),
        strides=[(1, 1, 1), (1, 2, 2), (2, 2, 2)],
        kernels=[(1, 3, 3), (3, 3, 3), (3, 3, 3)],
        downsample="conv",
        deep=True,
        cin=1,
        classes=3,
    ),
}


def _setup(case):
    features = stage_features(len(case["strides"]), 4, 16)
    model = UNet(
        case["classes"],
        features,
        case["strides"],
        case["kernels"],
        downsample=case["downsample"],
        deep_supervision=case["deep"],
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, *case["spatial"], case["cin"])).astype(np.float32)
    y = rng.integers(0, case["classes"], size=(2, *case["spatial"])).astype(np.int32)
    params = model.init(jax.random.key(1), jnp.asarray(x))["params"]
    # non-trivial norm affine and biases, so a swapped or dropped parameter shows
    params = jax.tree.map(
        lambda p: p + 0.1 * jnp.asarray(rng.normal(size=p.shape), p.dtype), params
    )
    twin = torch_unet.twin_of(model, case["cin"])
    torch_unet.load_flax_params(twin, params)
    return model, params, twin, x, y, features


def _channels_first(a: np.ndarray) -> np.ndarray:
    return np.moveaxis(a, -1, 1)


@pytest.mark.parametrize("name", sorted(CASES))
def test_param_count_matches(name):
    case = CASES[name]
    model, params, twin, *_, features = _setup(case)
    expected = unet_param_count(
        case["cin"], case["classes"], features, case["kernels"], case["strides"],
        deep_supervision=case["deep"],
    )
    flax_count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    assert torch_unet.param_count(twin) == expected == flax_count


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_loss_and_grads_match(name):
    case = CASES[name]
    model, params, twin, x, y, _ = _setup(case)

    def loss_fn(p):
        return segmentation_loss(model.apply({"params": p}, jnp.asarray(x)), jnp.asarray(y))

    out_jax = model.apply({"params": params}, jnp.asarray(x))
    loss_jax, grads_jax = jax.value_and_grad(loss_fn)(params)

    xt = torch.from_numpy(_channels_first(x).copy())
    yt = torch.from_numpy(y.astype(np.int64))
    out_t = twin(xt)
    loss_t = torch_unet.segmentation_loss(out_t, yt)
    loss_t.backward()

    outs_jax = out_jax if case["deep"] else (out_jax,)
    outs_t = out_t if case["deep"] else (out_t,)
    assert len(outs_jax) == len(outs_t)
    for a, b in zip(outs_jax, outs_t, strict=True):
        np.testing.assert_allclose(
            _channels_first(np.asarray(a)), b.detach().numpy(), rtol=RTOL, atol=ATOL
        )
    np.testing.assert_allclose(float(loss_jax), float(loss_t.detach()), rtol=RTOL, atol=ATOL)

    # gradients: convert the JAX gradient tree like the parameters, compare per tensor
    grads_as_torch = torch_unet.flax_to_torch_state(grads_jax, twin)
    for pname, p in twin.named_parameters():
        np.testing.assert_allclose(
            p.grad.numpy(), grads_as_torch[pname].numpy(), rtol=GRAD_RTOL, atol=GRAD_ATOL,
            err_msg=pname,
        )


def test_full_res_only_equals_first_head():
    model, params, twin, x, *_ = _setup(CASES["2d_conv_deep"])
    xt = torch.from_numpy(_channels_first(x).copy())
    with torch.inference_mode():
        full = twin(xt)[0]
        only = twin(xt, full_res_only=True)
    torch.testing.assert_close(full, only, rtol=0, atol=0)


def test_upsample_weight_is_conv_transpose():
    """The matmul kernel layout conversion, in isolation, against PyTorch's ConvTranspose."""
    from unetjax.models.layers import UpsampleMatmul

    rng = np.random.default_rng(0)
    for factors in [(2, 2), (1, 2, 2), (2, 2, 2)]:
        x = rng.normal(size=(2, *([3] * len(factors)), 5)).astype(np.float32)
        layer = UpsampleMatmul(4, factors)
        p = layer.init(jax.random.key(0), jnp.asarray(x))["params"]
        p = {"kernel": p["kernel"], "bias": jnp.arange(4.0)}
        ref = np.asarray(layer.apply({"params": p}, jnp.asarray(x)))
        w = torch.from_numpy(
            torch_unet.upsample_weight(np.asarray(p["kernel"]["kernel"]), factors)
        )
        conv_t = {2: torch.nn.functional.conv_transpose2d,
                  3: torch.nn.functional.conv_transpose3d}[len(factors)]
        out = conv_t(
            torch.from_numpy(_channels_first(x).copy()), w, torch.arange(4.0), stride=factors
        )
        np.testing.assert_allclose(_channels_first(ref), out.numpy(), rtol=1e-5, atol=1e-5)
