"""SyncBatchNorm: batch statistics of the global batch across a torch.distributed process group.

A drop-in for ``torch.nn.SyncBatchNorm`` (it subclasses it: constructor, parameters, buffers and
state_dict keys are torch's) whose local work runs in our kernels. torch.distributed is the only
transport (NCCL between GPUs, gloo on CPU or GPU tensors). Per training step, one collective in the
forward and one in the backward:

Forward
  1. each rank: local mean and biased variance per channel (our stats kernel, fp32; fp64 inputs fp64)
     and its local count n (the same for every channel);
  2. one all_reduce (SUM) of the float64 payload ``[n_bad, n, h, h^2, S1[C], S2[C]]`` where, around
     a pivot K that is identical on every rank, S1 = n (mean - K) and S2 = M2 + n (mean - K)^2 =
     sum (x - K)^2; ``n_bad`` counts ranks whose input failed validation and h is a fingerprint of
     K (both below);
  3. every rank: global mean = K + S1/N, M2 = S2 - S1^2/N (in float64), running statistics with the
     global count N (our running-stats kernel), and y with our normalize kernel.
Backward
  4. each rank: local sum(dy) and sum(dy * xhat) with the global mean/rstd (our reduction kernel);
     these are also the local weight/bias grads, which stay local (DDP averages them, as with torch);
  5. one all_reduce (SUM) of the 2C sums; our dx kernel with the global count N.

Bytes per step (C channels, w ranks): forward 8 (2C + 4) bytes, backward 2C values of the
accumulation dtype (8C bytes for fp32), so 24C + 32 bytes per rank in all whatever w is (a ring
all_reduce moves about 2 (w - 1) / w times that per rank). torch's SyncBatchNorm all-gathers
(2C + 1) fp32 values from every rank: 4 (2C + 1) w bytes received per rank, growing with w.

Why shifted sums in float64 rather than an all_gather of (n, mean, M2) merged with Chan's formula:
the all_gather is exact but its payload grows with the world size; shifted sums add up with a plain
all_reduce. Their weak point is cancellation in S2 - S1^2/N, which loses about 2 log10(|mean - K| / std)
significant digits. float64 carries ~16, so even with K = 0 and |mean| = 1e4 std (the first step of
a badly centred input) M2 keeps ~8 digits, at least as many as the fp32 statistics of the plain
BatchNorm; with a good K it loses none. The per-rank means are fp32 roundings, but that is harmless:
a rank's (mean + delta, M2) are the exact statistics of its data shifted by delta, an error of order
delta^2 in the variance.

The pivot K must be identical on every rank, and agreeing on one would cost a collective. We use the
global batch mean of this layer's previous synchronized step: an output of the previous all_reduce,
so the same on every rank by construction, and the best guess of this batch's mean. The first step
(and a change of channel count) uses K = 0. running_mean would be the other candidate, but it does
not exist with track_running_stats=False, is 0 on the first step, lags the batch mean by about
1/momentum steps, and is identical across ranks only while buffers are kept in sync. The pivot is a
plain attribute, not a buffer: no part of the state_dict, and dropped by pickling and deepcopy, so a
layer restored or copied starts again from K = 0 (the same on every rank that restores it).

The pivot is right only while every rank has run the same synchronized steps on the layer (which
the collectives require anyway). Should the ranks' pivots differ all the same, the statistics would
be silently wrong, so each rank also sends h = sum_c K_c (1 + c/C) and h^2: every rank then sees the
same sums A = sum h, B = sum h^2, and w B - A^2 = w^2 var(h) is ~0 exactly when all h agree. If not,
every rank raises a RuntimeError instead of normalizing with a wrong mean.

Bad input: every rank validates its input before any collective, and a rank whose input is invalid
still takes part in the forward all_reduce, with n_bad = 1 and no statistics. Then every rank raises:
the invalid ones their own error (torch's message), the others a RuntimeError naming how many ranks
failed. No collective is left hanging and no state (running statistics, num_batches_tracked) moves.
The payload is ``num_features`` wide on every rank, so an input whose channel count differs from
num_features is refused even when the layer has no weight or running statistics (torch's would run).
Failures that are not validation (out of memory in a kernel, a rank that skips the backward) still
leave the other ranks waiting in the collective until the process group's timeout, as with torch.

With no initialised process group, a world of one, or outside training, it behaves exactly as our
plain BatchNorm (torch's does the same with its plain batch_norm).
"""

import torch
import torch.distributed as dist
from torch import Tensor

from bn_triton import checks, functional, launch, modules, ops
from bn_triton.convert import convert_layer
from bn_triton.modules import TritonBatchNormMixin, fx_leaf

# Payload head: [n_bad, n, h, h^2], then S1[C], S2[C].
_HEAD = 4


def _all_reduce_sums(group):
    """BatchNormFunction's ``sync``: sum the local sum(dy), sum(dy * xhat) over the group, in place."""

    def sync(sum_dy: Tensor, sum_dy_xhat: Tensor) -> None:
        sums = torch.stack((sum_dy, sum_dy_xhat))
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        sum_dy.copy_(sums[0])
        sum_dy_xhat.copy_(sums[1])

    return sync


class SyncBatchNorm(TritonBatchNormMixin, torch.nn.SyncBatchNorm):
    """torch.nn.SyncBatchNorm computed by bn_triton's kernels, one all_reduce per pass.

    Same constructor as torch's: ``SyncBatchNorm(num_features, eps=1e-5, momentum=0.1, affine=True,
    track_running_stats=True, process_group=None)``. In training with an initialised process group of
    more than one rank, statistics are those of the global batch (ranks may hold different batch
    sizes, including none); otherwise it is our plain BatchNorm. Inputs: CUDA tensors, or CPU tensors
    with Triton's interpreter on (gloo). Like our plain layers it also takes keyword-only
    ``activation=None | "relu"`` and ``forward(input, residual=None)``: act(BN(input) + residual).
    """

    # Global batch mean (float64) of this layer's previous synchronized step: the shift of the next
    # step's sums. Identical on all ranks; None until the first step (see the module docstring).
    _sync_pivot: Tensor | None = None

    def _sync_group(self):
        """The process group to synchronize over, or None when no synchronization is needed."""
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        if isinstance(input, torch.fx.Proxy):
            return fx_leaf(self, input, residual)
        group = self._sync_group()
        if group is None:
            self._check_input_dim(input)
            self._check_non_zero_input_channels(input)
            return super().forward(input, residual)
        return self._sync_forward(input, residual, group)

    # torch.compile runs this part eagerly (a graph break around the layer), and must: the global
    # count is read on the host after the all_reduce (it decides, on every rank alike, whether to
    # raise and how to unbias running_var), and the backward's all_reduce runs inside the autograd
    # formula, where a compiled graph would have to trace a collective with a data-dependent guard.
    @torch.compiler.disable
    def _sync_forward(self, input: Tensor, residual: Tensor | None, group) -> Tensor:
        running_mean = self.running_mean if self.track_running_stats else None
        running_var = self.running_var if self.track_running_stats else None
        error = self._validate(input, running_mean, running_var, residual)
        C = self.num_features
        acc = launch.acc_dtype(input.dtype) if error is None else torch.float32
        payload = torch.zeros(_HEAD + 2 * C, dtype=torch.float64, device=self._payload_device(input))
        pivot = self._pivot(C, payload.device)
        h = torch.dot(pivot, torch.arange(C, dtype=torch.float64, device=payload.device).div_(C).add_(1.0))
        payload[2:4] = torch.stack((h, h * h))
        x, geom, n = input, None, 0
        if error is not None:
            payload[0] = 1.0
        else:
            x, geom = launch.canonical(input)
            n = geom.per_channel
            if n > 0:
                local_mean, _rstd, local_var = ops.step("stats", x, None, None, 0.0, None, self.eps, True)
                d = local_mean.to(torch.float64) - pivot
                payload[1] = float(n)
                torch.mul(d, n, out=payload[_HEAD : _HEAD + C])
                torch.mul(torch.addcmul(local_var.to(torch.float64), d, d), n, out=payload[_HEAD + C :])

        dist.all_reduce(payload, op=dist.ReduceOp.SUM, group=group)
        # One host sync: the global count sets the unbiasing of running_var and the 1/N of dx, and
        # both counts decide, identically on every rank, whether to raise.
        n_bad, N, h_sum, h2_sum = payload[:_HEAD].tolist()
        n_bad, N = int(n_bad), int(N)
        if error is not None:
            raise error
        if n_bad:
            raise RuntimeError(
                f"SyncBatchNorm: the input on {n_bad} other rank(s) of the process group was invalid "
                "(see the error raised there); nothing was computed"
            )
        w = dist.get_world_size(group)
        if w * h2_sum - h_sum * h_sum > 1e-9 * w * h2_sum:
            raise RuntimeError(
                "SyncBatchNorm: the ranks disagree on this layer's history (the shift of its sums "
                "differs), so its statistics cannot be combined; every rank must run the same "
                "synchronized steps on the layer (one restored or copied on some ranks only?)"
            )
        if N == 1:
            raise ValueError(
                "Expected more than 1 value per channel when training, got input size "
                f"{input.size()} on this rank and 1 value per channel in the whole process group"
            )

        if N > 0:
            s1, s2 = payload[_HEAD : _HEAD + C], payload[_HEAD + C :]
            d = s1 / N
            mean64 = pivot + d
            var64 = ((s2 - s1 * d) / N).clamp_(min=0.0)
            mean, var = mean64.to(acc), var64.to(acc)
            rstd = torch.rsqrt(var64 + self.eps).to(acc)
            self._sync_pivot = mean64
        else:  # every rank is empty: nothing to normalize, running statistics stay (as torch's do)
            mean = rstd = var = torch.zeros(C, dtype=acc, device=payload.device)

        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if running_mean is not None and N > 0:
                cumulative = self.momentum is None
                ops.step(
                    "update_running_stats",
                    running_mean,
                    running_var,
                    mean,
                    var,
                    self.momentum,
                    N,
                    self.num_batches_tracked if cumulative else None,
                )
        # The plain layers' autograd formula and kernels, fused epilogue included, with the global
        # statistics and count, and the backward's sums all-reduced between its two passes.
        relu = self.activation == "relu"
        return ops.batch_norm(
            x, self.weight, self.bias, residual, mean, rstd, self.eps, True, relu, N, _all_reduce_sums(group)
        )

    def _validate(self, input, running_mean, running_var, residual) -> Exception | None:
        """The error this rank's input deserves (torch's messages), or None. Raises nothing."""
        try:
            self._check_input_dim(input)
            self._check_non_zero_input_channels(input)
            if not functional.uses_triton(input):
                raise ValueError(
                    "SyncBatchNorm expected input tensor to be on GPU, or on CPU with Triton's "
                    f"interpreter on (TRITON_INTERPRET=1); got {input.device}"
                )
            # A rank may hold a single value per channel (the global batch decides, after the
            # collective): check that rank's input as if it held two (a view, not a copy).
            probe = input.expand(2, *input.shape[1:]) if input.numel() == input.shape[1] else input
            checks.check_inputs(probe, running_mean, running_var, self.weight, self.bias, True)
            checks.check_fused(input, self.activation, residual)
            if input.shape[1] != self.num_features:
                raise ValueError(
                    f"SyncBatchNorm: expected input with {self.num_features} channels, got {input.shape[1]}"
                )
        except (ValueError, RuntimeError, TypeError) as e:
            return e
        return None

    def __getstate__(self):
        # Pickling and deepcopy drop the pivot (see the module docstring).
        state = self.__dict__.copy()
        state.pop("_sync_pivot", None)
        return state

    def _payload_device(self, input: Tensor) -> torch.device:
        # The layer's own device, so that even a rank whose input sits on the wrong device sends a
        # payload the backend accepts (NCCL takes CUDA tensors only).
        for t in (self.weight, self.bias, self.running_mean):
            if t is not None:
                return t.device
        return input.device

    def _pivot(self, C: int, device: torch.device) -> Tensor:
        pivot = self._sync_pivot
        if pivot is None or pivot.numel() != C:
            return torch.zeros(C, dtype=torch.float64, device=device)
        return pivot.to(device)

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group=None) -> torch.nn.Module:
        """Replace every BatchNorm*d inside ``module`` (torch's, torch's SyncBatchNorm, ours) by ours.

        As torch's ``convert_sync_batchnorm``: in place for children, and a new layer is returned when
        ``module`` itself is a batch norm. Parameters and buffers are kept as the same objects (so an
        optimizer that holds them stays valid), with each layer's train/eval mode and qconfig.
        """
        out = module
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            out = convert_layer(module, cls, process_group=process_group)
        for name, child in module.named_children():
            out.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return out


modules.OWN_CLASSES.add(SyncBatchNorm)
