"""Which launches serve a call: decided here once, read by both routes that launch them.

The eager plans (bn_triton/eager.py) turn these decisions into cached launches with one workspace;
the traced route's autograd formula (bn_triton/ops.py ``BatchNormFunction``) into calls of the custom
ops. Neither decides anything of its own: what the forward saves for the backward, which kernels
the backward runs for a set of wanted gradients, which of them applies the activation and where its
derivative comes from.
"""

from typing import NamedTuple, Optional

from bn_triton import activations


def forward(training: bool, single: bool) -> str:
    """The forward's launches: "single" (kernels/single_pass.py's forward: statistics, running
    statistics and y in one launch), "split" (the statistics launch, then normalize) or "eval" (one
    normalize with the running statistics). ``single``: the single-pass kernels serve this input
    (launch.single_pass) on this route."""
    if not training:
        return "eval"
    return "single" if single else "split"


class Saved(NamedTuple):
    """What the forward keeps for a backward with an activation, besides x, weight, bias and the
    statistics (never a full-size pre-activation)."""

    y: bool  # the output: act' is read from it (ReLU with a residual)
    residual: bool  # the residual: the pre-activation is recomputed with it


def saved(activation: Optional[str], has_residual: bool) -> Saved:
    with_residual = activation is not None and has_residual
    from_y = with_residual and activations.grad_from_output(activation)
    return Saved(from_y, with_residual and not from_y)


class Backward(NamedTuple):
    """The launches of one backward.

    ``kind``: "single" (kernels/single_pass.py's backward, one launch), "split" (the reduction of the
    two gradient sums, then the dx pass if dx is wanted), "elementwise" (no dweight or dbias, and no
    dx in training: one pass writes dx (eval) and/or g), or "none" (no kernel: d(residual) is dy itself, or nothing
    is wanted). The first launch turns dy into g = dy * act'(pre) (``activation``; act' at the saved
    y with ``grad_from_y``, else at the pre-activation recomputed from x, the bias and, with
    ``read_residual``, the residual). ``store_g``: it writes g, which is d(residual); the dx pass of
    "split" then reads g instead of dy and applies nothing.
    """

    kind: str
    activation: Optional[str]
    grad_from_y: bool
    read_residual: bool
    store_g: bool
    dx: bool
    dweight: bool
    dbias: bool
    dresidual: Optional[str]  # where d(residual) comes from: "g", "dy", or None (not wanted)

    @property
    def dx_activation(self) -> Optional[str]:
        """The activation the dx pass of "split" applies to what it reads (None where it reads g)."""
        return None if self.store_g else self.activation


def backward(
    training: bool, activation: Optional[str], has_residual: bool, has_weight: bool, has_bias: bool,
    needs: tuple, single: bool,
) -> Backward:  # fmt: skip
    """The backward for ``needs`` (autograd's needs_input_grad of x, weight, bias, residual). Bytes
    per kind and activation: kernels/grad.py and docs/math.md."""
    want_dx, want_dw, want_db, want_dres = needs[:4]
    want_dw, want_db = want_dw and has_weight, want_db and has_bias
    keep = saved(activation, has_residual)
    act = activation is not None
    if training and want_dx and single:
        kind, store_g = "single", act and has_residual and want_dres
    elif want_dw or want_db or (training and want_dx):
        # With a residual g is written once and read once by the dx pass: the same bytes as
        # recomputing it there (re-reading y or the residual), and it is d(residual) too.
        kind, store_g = "split", act and has_residual and (want_dres or want_dx)
    elif want_dx or (act and want_dres):  # eval, or training with d(residual) alone (g only)
        kind, store_g = "elementwise", act and want_dres
    else:
        kind, store_g = "none", False
    dres = ("g" if act else "dy") if want_dres else None
    return Backward(kind, activation, keep.y, keep.residual, store_g, want_dx, want_dw, want_db, dres)
