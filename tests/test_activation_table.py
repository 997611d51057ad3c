"""The activation table of the fused epilogue (kernels/activation.py) and its float64 NumPy twin
(reference.activation, reference.activation_grad) against torch's own activations and autograd:
random values, the kinks and their float neighbours, large magnitudes, NaN and +-inf.

Torch's CPU answer at NaN depends on where the NaN sits for relu6, elu and hardswish: its vectorized
loop (the body of a long contiguous tensor) gives 0 or NaN, its scalar loop (a tail, a strided
tensor) and its CUDA kernels pass dy through. The table follows the latter, so torch's values are
taken on a strided view here, which always runs its scalar loop.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from bn_triton.kernels.activation import activate, activation_grad
from bn_triton.kernels.tile import acc_scalar

from bn_triton import _config, launch, reference
from tests.helpers import TOL

# name -> (torch's forward, param, kinks). The params are exact in bf16 and tell the branches apart
# at the kink (leaky_relu's slope at 0 is 0.25, not 1; elu's is 1.5, not 1). The activations with
# kinks (the identity too: no kink) are piecewise: a branch decides where the gradient is 0, so its
# zeros must be torch's exactly, and so must the values at the kinks. None: a smooth activation.
ACTS = {
    "": (lambda t, p: t * 1, 0.0, ()),
    "relu": (lambda t, p: F.relu(t), 0.0, (0.0,)),
    "relu6": (lambda t, p: F.relu6(t), 0.0, (0.0, 6.0)),
    "leaky_relu": (lambda t, p: F.leaky_relu(t, p), 0.25, (0.0,)),
    "elu": (lambda t, p: F.elu(t, p), 1.5, (0.0,)),
    "silu": (lambda t, p: F.silu(t), 0.0, None),
    "hardswish": (lambda t, p: F.hardswish(t), 0.0, (-3.0, 3.0)),
    "gelu": (lambda t, p: F.gelu(t), 0.0, None),
    "gelu_tanh": (lambda t, p: F.gelu(t, approximate="tanh"), 0.0, None),
    "mish": (lambda t, p: F.mish(t), 0.0, None),
}
KINKS = (0.0, 6.0, 3.0, -3.0)  # every kink above
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@triton.jit
def table_kernel(V, DY, Y, DV, param, n, ACT: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Y = act(V), DV = DY * act'(V), computed in ACC from the tensors' dtype and stored back in it."""
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    v = tl.load(V + offs, mask=mask, other=0.0).to(ACC)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(ACC)
    p = acc_scalar(param, ACC)
    tl.store(Y + offs, activate(v, ACT, p).to(Y.dtype.element_ty), mask=mask)
    tl.store(DV + offs, activation_grad(dy, v, ACT, p).to(DV.dtype.element_ty), mask=mask)


def special_values(dtype) -> list:
    """The kinks with both float neighbours, -0, large magnitudes (the dtype's max too), NaN, +-inf."""
    out = []
    for k in KINKS:
        t = torch.tensor(k, dtype=dtype)
        out += [torch.nextafter(t, torch.tensor(-np.inf, dtype=dtype)).item(), k]
        out += [torch.nextafter(t, torch.tensor(np.inf, dtype=dtype)).item()]
    if dtype == torch.bfloat16 and _config.interpreting():
        # The interpreter's bf16 -> fp32 conversion turns subnormals into 0 (a GPU converts them
        # exactly): the neighbours of 0 become the smallest normal numbers there.
        tiny = torch.finfo(dtype).tiny
        out = [-tiny if x == out[0] else tiny if x == out[2] else x for x in out]
    big = torch.finfo(dtype).max
    return out + [-0.0, 1e4, -1e4, 80.0, -80.0, 100.0, -100.0, big, -big, np.nan, np.inf, -np.inf]


def inputs(dtype, n_random: int = 64, seed: int = 0):
    """(v, dy, number of special values first): dy is 1 at the special values (so that the
    gradient at a kink is act' itself, exact in every dtype), random elsewhere with a few zeros."""
    gen = torch.Generator().manual_seed(seed)
    special = special_values(dtype)
    f64 = torch.float64
    v = torch.cat([torch.tensor(special, dtype=f64), torch.randn(n_random, generator=gen, dtype=f64) * 4])
    dy = torch.cat([torch.ones(len(special), dtype=f64), torch.randn(n_random, generator=gen, dtype=f64)])
    dy[len(special) :: 9] = 0.0
    return v.to(dtype), dy.to(dtype), len(special)


def torch_values(v, dy, name, param):
    """torch's act(v) and dy * act'(v) by autograd, in v's dtype, from its scalar loop (strided v)."""
    fn = ACTS[name][0]
    base = torch.zeros(2 * v.numel(), dtype=v.dtype, device=v.device)
    base[::2] = v
    base.requires_grad_()
    y = fn(base[::2], param)
    (g,) = torch.autograd.grad(y, base, dy)
    return y.detach(), g[::2]


def run_table(v, dy, name, param):
    y, dv = torch.empty_like(v), torch.empty_like(v)
    with np.errstate(all="ignore"):  # the interpreter computes in NumPy: inf * 0 is part of the formulas
        table_kernel[(1,)](
            v,
            dy,
            y,
            dv,
            launch.scalar(param, v.dtype),
            v.numel(),
            ACT=name,
            ACC=launch._tl_acc(v.dtype),
            BLOCK=triton.next_power_of_2(v.numel()),
        )
    return y, dv


@pytest.mark.parametrize("name", list(ACTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_table_matches_torch(dtype, name, device):
    """Values and gradients within the dtype's tolerance (bf16: the interpreter truncates fp32 to
    bf16 where torch rounds, up to one more bf16 ulp, 2^-7 relative, which TOL's 2e-2 covers); NaN
    and +-inf exactly where torch has them; for the piecewise activations, exact zeros where torch
    has them and exact values at the kinks."""
    _, param, kinks = ACTS[name]
    v, dy, n_special = inputs(dtype)
    v, dy = v.to(device), dy.to(device)
    y, dv = run_table(v, dy, name, param)
    y_t, dv_t = torch_values(v, dy, name, param)
    for what, ours, theirs in (("act", y, y_t), ("grad", dv, dv_t)):
        ours, theirs = ours.cpu().double(), theirs.cpu().double()
        torch.testing.assert_close(
            ours, theirs, equal_nan=True, **TOL[dtype], msg=lambda m, what=what: f"{name} {what}: {m}"
        )
        if kinks is None:
            continue
        # elu's exp(v) underflows below the dtype's normal range: zero or not is the platform's call there
        exact = reference.activation_grad(dy.cpu().double().numpy(), v.cpu().double().numpy(), name, param)
        if what == "act":
            exact = reference.activation(v.cpu().double().numpy(), name, param)
        decided = torch.from_numpy(~((np.abs(exact) > 0) & (np.abs(exact) < torch.finfo(dtype).tiny)))
        assert torch.equal((ours == 0)[decided], (theirs == 0)[decided]), f"{name} {what}: zeros differ"
        at_kink = torch.isin(v.cpu().double(), torch.tensor(kinks, dtype=torch.float64))
        at_kink[n_special:] = False
        assert torch.equal(ours[at_kink], theirs[at_kink]), f"{name} {what} at {v[at_kink]}: {ours[at_kink]}"


@pytest.mark.parametrize("name", list(ACTS))
def test_reference_matches_torch_float64(name):
    """reference.activation and activation_grad against torch in float64, for several params:
    1e-12 relative, plus 1e-13 absolute for the gelus' 1 + erf and 1 + tanh (torch's own formulas
    cancel there for negative v: their last-bit differences are absolute, ~|v| 1e-16)."""
    params = {"leaky_relu": (0.01, 0.2, 0.25), "elu": (1.0, 0.3, 1.5)}.get(name, (0.0,))
    v, dy, _ = inputs(torch.float64, n_random=2000, seed=1)
    for param in params:
        y_t, dv_t = torch_values(v, dy, name, param)
        y = torch.from_numpy(reference.activation(v.numpy(), name, param))
        dv = torch.from_numpy(reference.activation_grad(dy.numpy(), v.numpy(), name, param))
        for what, ours, theirs in (("act", y, y_t), ("grad", dv, dv_t)):
            torch.testing.assert_close(
                ours,
                theirs,
                rtol=1e-12,
                atol=1e-13,
                equal_nan=True,
                msg=lambda m, p=param, w=what: f"{name}({p}) {w}: {m}",
            )


def test_reference_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown activation"):
        reference.activation(np.zeros(2), "tanh")
    with pytest.raises(ValueError, match="unknown activation"):
        reference.activation_grad(np.zeros(2), np.zeros(2), "tanh")


def test_unknown_name_fails_to_build(device):
    """A name outside the table stops the kernel's build (a static assert), never runs as identity."""
    v = torch.zeros(4, device=device)
    with pytest.raises(Exception) as info:
        run_table(v, v, "tanh", 0.0)
    messages, e = [], info.value
    while e is not None:
        messages.append(str(e))
        e = e.__cause__ or e.__context__
    assert any("unknown activation" in m for m in messages), messages
