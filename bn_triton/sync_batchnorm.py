"""SyncBatchNorm: batch statistics of the global batch across a torch.distributed process group.

A drop-in for ``torch.nn.SyncBatchNorm`` (it subclasses it: constructor, parameters, buffers and
state_dict keys are torch's) whose local work runs in our kernels, with one collective per pass:
the forward all-gathers every rank's (count, mean, M2) per channel in float64 and merges them
(Chan et al.'s formula), the backward all-reduces the two gradient sums. A step's statistics come
from that step's inputs alone: the layer carries nothing from one step to the next but torch's
running statistics. Every rank validates its input before the collective and, if any rank's input
is bad, every rank raises and nothing moves. With no initialised process group, a world of one, or
outside training, it is our plain BatchNorm. The record, the merge and the byte counts:
docs/sync_batchnorm.md.
"""

import torch
import torch.distributed as dist
from torch import Tensor

from bn_triton import checks, functional, launch, modules, ops
from bn_triton.convert import convert_layer, is_norm_act
from bn_triton.modules import TritonBatchNormMixin, fx_leaf

# One rank's record (float64): [invalid, n], then mean[C], M2[C] (M2: n times the biased variance).
_HEAD = 2


def _all_reduce_sums(group):
    """BatchNormFunction's ``sync``: sum the local sum(dy), sum(dy * xhat) over the group, in place."""

    def sync(sum_dy: Tensor, sum_dy_xhat: Tensor) -> None:
        sums = torch.stack((sum_dy, sum_dy_xhat))
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        sum_dy.copy_(sums[0])
        sum_dy_xhat.copy_(sums[1])

    return sync


def _merge(records: Tensor, N: int) -> tuple[Tensor, Tensor]:
    """Global mean and biased variance (float64, per channel) of the ranks' records, ``[w, 2 + 2C]``.

    Chan et al.'s merge of partial (count, mean, M2), for all ranks at once rather than pairwise:
    mean = sum(n_r mean_r) / N and M2 = sum(M2_r + n_r (mean_r - mean)^2). Every term of M2 is
    non-negative, so nothing cancels, and the launches do not grow with the world size. Every rank
    merges the same gathered records with the same ops, so every rank gets the same statistics.
    """
    C = (records.shape[1] - _HEAD) // 2
    n = records[:, 1:2]
    means, m2s = records[:, _HEAD : _HEAD + C], records[:, _HEAD + C :]
    mean = (means * n).sum(0).div_(N)
    dev = means - mean
    # (dev * n) * dev: an empty rank (n = 0, mean 0) adds exactly 0 even where dev^2 would overflow.
    m2 = (dev * n).mul_(dev).add_(m2s).sum(0)
    return mean, m2.div_(N)


class SyncBatchNorm(TritonBatchNormMixin, torch.nn.SyncBatchNorm):
    """torch.nn.SyncBatchNorm computed by bn_triton's kernels, one collective per pass.

    Same constructor as torch's: ``SyncBatchNorm(num_features, eps=1e-5, momentum=0.1, affine=True,
    track_running_stats=True, process_group=None)``. In training with an initialised process group of
    more than one rank, statistics are those of the global batch (ranks may hold different batch
    sizes, including none); otherwise it is our plain BatchNorm. Inputs: CUDA tensors, or CPU tensors
    with Triton's interpreter on (gloo). Like our plain layers it also takes keyword-only
    ``activation`` (bn_triton/activations.py) and ``forward(input, residual=None)``:
    act(BN(input) + residual).
    """

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
    # count is read on the host after the all_gather (it decides, on every rank alike, whether to
    # raise and how to unbias running_var), and the backward's all_reduce runs inside the autograd
    # formula, where a compiled graph would have to trace a collective with a data-dependent guard.
    @torch.compiler.disable
    def _sync_forward(self, input: Tensor, residual: Tensor | None, group) -> Tensor:
        running_mean = self.running_mean if self.track_running_stats else None
        running_var = self.running_var if self.track_running_stats else None
        error = self._validate(input, running_mean, running_var, residual)
        C = self.num_features
        acc = launch.acc_dtype(input.dtype) if error is None else torch.float32
        record = torch.zeros(_HEAD + 2 * C, dtype=torch.float64, device=self._payload_device(input))
        x = input
        if error is not None:
            record[0] = 1.0
        else:
            x, geom = launch.canonical(input)
            n = geom.per_channel
            if n > 0:
                local_mean, _rstd, local_var = ops.step("stats", x, None, None, 0.0, None, self.eps, True)
                record[1] = float(n)
                record[_HEAD : _HEAD + C] = local_mean
                torch.mul(local_var.to(torch.float64), n, out=record[_HEAD + C :])

        records = record.new_empty(dist.get_world_size(group), record.numel())
        dist.all_gather(list(records.unbind(0)), record, group=group)
        # One host sync: the global count sets the unbiasing of running_var and the 1/N of dx, and
        # both counts decide, identically on every rank, whether to raise.
        heads = records[:, :_HEAD].tolist()
        n_bad = sum(int(invalid) for invalid, _ in heads)
        N = sum(int(n) for _, n in heads)
        if error is not None:
            raise error
        if n_bad:
            raise RuntimeError(
                f"SyncBatchNorm: the input on {n_bad} other rank(s) of the process group was invalid "
                "(see the error raised there); nothing was computed"
            )
        if N == 1:
            raise ValueError(
                "Expected more than 1 value per channel when training, got input size "
                f"{input.size()} on this rank and 1 value per channel in the whole process group"
            )

        if N > 0:
            mean64, var64 = _merge(records, N)
            mean, var = mean64.to(acc), var64.to(acc)
            rstd = torch.rsqrt(var64 + self.eps).to(acc)
        else:  # every rank is empty: nothing to normalize, running statistics stay (as torch's do)
            mean = rstd = var = torch.zeros(C, dtype=acc, device=records.device)

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
        return ops.batch_norm(
            x, self.weight, self.bias, residual, mean, rstd, self.eps, True, self.activation, N, _all_reduce_sums(group)
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

    def _payload_device(self, input: Tensor) -> torch.device:
        # The layer's own device, so that even a rank whose input sits on the wrong device sends a
        # payload the backend accepts (NCCL takes CUDA tensors only).
        for t in (self.weight, self.bias, self.running_mean):
            if t is not None:
                return t.device
        return input.device

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group=None) -> torch.nn.Module:
        """Replace every BatchNorm*d inside ``module`` (torch's, torch's SyncBatchNorm, ours) by ours.

        As torch's ``convert_sync_batchnorm``: in place for children, and a new layer is returned when
        ``module`` itself is a batch norm. Parameters and buffers are kept as the same objects (so an
        optimizer that holds them stays valid), with each layer's train/eval mode and qconfig.
        """
        out = module
        if is_norm_act(module):  # timm's BatchNormAct2d or SyncBatchNormAct, or ours
            out = convert_layer(module, SyncBatchNormAct, process_group=process_group, drop=module.drop, act=module.act)
        elif isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            out = convert_layer(module, cls, process_group=process_group)
        for name, child in module.named_children():
            out.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return out


class SyncBatchNormAct(modules.NormActMixin, SyncBatchNorm):
    """timm's SyncBatchNormAct (and its BatchNormAct2d under SyncBatchNorm.convert_sync_batchnorm)
    computed by our kernels: our SyncBatchNorm, then ``drop`` and ``act`` as in timm, the activation
    fused where it can be (modules.NormActMixin)."""


modules.OWN_CLASSES.update((SyncBatchNorm, SyncBatchNormAct))
