"""The eager route: a plan per call signature, decided once; a call then allocates and launches.

A ``Plan`` is built by bn_triton/functional.py on the first call of a signature, after validation,
and cached there. It holds the geometry, the launches of the forward (bn_triton/launch.py: tiles,
grid, compiled kernel, argument order), the workspace layout, and per set of wanted gradients the
launches of the backward (built on the first backward that asks for them). A training forward then
makes two allocations (y and one workspace for the statistics and the reduction's partials) and
one or two launches; its backward allocates dx, dweight, dbias and one workspace.

``BatchNormFunction`` is the autograd formula for this route: y = act((x - mean) * s * weight +
bias + residual), its backward the closed form of docs/math.md (the statistics' paths included), and a
differentiable backward (composite.py) under create_graph=True. The traced route (torch.compile,
export, modes: bn_triton/ops.py) runs the same launches through the custom ops.
"""

import torch

from bn_triton import composite, launch
from bn_triton.launch import RunningSpec, dtypes


class Plan:
    """One call signature's decisions: ``forward(x, weight, bias, residual, running_mean, running_var,
    num_batches_tracked)`` launches it; with ``autograd``, a call goes through ``apply`` instead."""

    def __init__(self, x, weight, bias, residual, running_mean, running_var, momentum, num_batches_tracked, *,
                 training, eps, relu, autograd):  # fmt: skip
        xc, geom = launch.canonical(x)
        self.x_copy = xc is not x  # sliced, transposed or not 16-byte aligned: copied on every call
        self.geom, self.device, self.dtype, self.C = geom, x.device, x.dtype, geom.C
        self.acc = launch.acc_dtype(x.dtype)
        self.strides = xc.stride()
        self.training, self.eps, self.relu = training, eps, relu
        self.res_copy = residual is not None and (residual.stride() != self.strides or residual.data_ptr() % 16 != 0)
        self.w_copy = weight is not None and not weight.is_contiguous()
        self.b_copy = bias is not None and not bias.is_contiguous()
        self.has_w, self.has_b, self.has_res = weight is not None, bias is not None, residual is not None
        self.mask_from_y = relu and residual is not None  # the ReLU's backward mask (kernels/grad.py)
        self.pdtype = next((t.dtype for t in (weight, bias, running_mean) if t is not None), None)
        self.single = single = training and launch.single_pass(geom, x.device, x.element_size())
        stats_copy = False
        self.backwards: dict = {}  # needs_input_grad -> the backward's launches
        C, acc = self.C, self.acc
        stats_out = (self.acc,) * 2
        per_ch = dtypes(weight, bias)
        if training:
            self.has_running = running_mean is not None
            self.count_batch = num_batches_tracked is not None
            cumulative = momentum is None and self.count_batch
            # torch reads the counter on the host, and 1 / (num_batches_tracked + 1) raises for -1:
            # where that read costs no host sync (CPU tensors), so does ours.
            self.check_counter = cumulative and x.device.type == "cpu"
            running = RunningSpec(
                running_mean.stride(0) if self.has_running else 0,
                running_var.stride(0) if self.has_running else 0,
                0.0 if momentum is None else momentum,
                cumulative and self.has_running,
                self.count_batch,
            )
            rs = dtypes(running_mean, running_var, num_batches_tracked)
            # One workspace: mean at 0, rstd at C, then the statistics' partials. The kernels are
            # given it for each of those pointers, with the offsets (a view costs more than a launch).
            if single:
                self.fwd = launch.forward(
                    geom, self.device, (x.dtype, x.dtype, *stats_out, torch.int32, *per_ch,
                                        x.dtype if self.has_res else None, *rs),
                    eps, running, relu, rstd_offset=C,
                )  # fmt: skip
                self.ws, self.tickets = 2 * C, self.fwd.tickets
            else:
                self.stats = launch.stats(
                    geom, self.device, (x.dtype, acc, torch.int32, *stats_out, None, *rs), eps, running,
                    rstd_offset=C, part_offset=2 * C,
                )  # fmt: skip
                self.ws, self.tickets = 2 * C + self.stats.parts, self.stats.tickets
                self.norm = launch.normalize(
                    geom, self.device, (x.dtype, x.dtype, *stats_out, *per_ch, x.dtype if self.has_res else None),
                    eps, False, relu, scale_offset=C,
                )  # fmt: skip
        else:
            stats_copy = not (running_mean.is_contiguous() and running_var.is_contiguous())
            self.norm = launch.normalize(
                geom, self.device,
                (x.dtype, x.dtype, running_mean.dtype, running_var.dtype, *per_ch, x.dtype if self.has_res else None),
                eps, True, relu,
            )  # fmt: skip
            self.stat_dtype = running_mean.dtype
        self.autograd = autograd  # through BatchNormFunction (``apply``), else ``forward`` alone
        self.relayout = self.x_copy or self.res_copy or self.w_copy or self.b_copy or (not training and stats_copy)

    # ---------------------------------------------------------------- forward
    def forward(self, x, weight, bias, residual, running_mean, running_var, num_batches_tracked):
        """(y, mean, scale, x as the kernels read it): mean and scale are the workspace in training
        (rstd at offset C), running_mean and running_var in eval."""
        if self.relayout:  # a tensor in a layout the kernels do not read: a copy of it
            x, weight, bias, residual, running_mean, running_var = self.copies(
                x, weight, bias, residual, running_mean, running_var
            )
        y = torch.empty_like(x)
        if not self.training:
            self.norm(x, y, running_mean, running_var, weight, bias, residual)
            return y, running_mean, running_var, x
        if not self.has_running:
            running_mean = running_var = None
        if not self.count_batch:
            num_batches_tracked = None
        elif self.check_counter and num_batches_tracked.item() == -1:
            raise ZeroDivisionError("float division by zero")
        ws = torch.empty(self.ws, dtype=self.acc, device=self.device)
        t = launch.tickets(self.device, self.tickets)
        if self.single:
            self.fwd(x, y, ws, ws, t, weight, bias, residual, running_mean, running_var, num_batches_tracked)
            return y, ws, ws, x
        self.stats(x, ws, t, ws, ws, None, running_mean, running_var, num_batches_tracked)
        self.norm(x, y, ws, ws, weight, bias, residual)
        return y, ws, ws, x

    def copies(self, x, weight, bias, residual, running_mean, running_var) -> tuple:
        """The tensors as the kernels read them: x canonical and aligned, the residual in x's strides,
        the per-channel tensors contiguous (running statistics only in eval: training updates them
        in place, through their strides)."""
        if self.x_copy:
            x = launch.canonical_layout(x)
        if self.res_copy:
            residual = launch.like(residual, x)
        if self.w_copy:
            weight = weight.contiguous()
        if self.b_copy:
            bias = bias.contiguous()
        if not self.training:
            running_mean = launch.vec(running_mean)
            running_var = launch.vec(running_var)
        return x, weight, bias, residual, running_mean, running_var

    def statistics(self, mean, scale) -> tuple:
        """The per-channel mean and scale as their own tensors (the workspace's views in training)."""
        if not self.training:
            return mean, scale
        C = self.C
        return mean[:C], scale[C : 2 * C]


class Backward:
    """The launches of one plan's backward for one set of wanted gradients (ctx.needs_input_grad),
    and the gradients' allocation: dx, dweight, dbias (the parameters' dtypes) and, through a
    reduction, one workspace for the partials and the two sums."""

    def __init__(self, plan: Plan, needs: tuple):
        want_dx, want_dw, want_db, want_dres = needs[:4]
        self.want_dw, self.want_db = want_dw and plan.has_w, want_db and plan.has_b
        self.want_dx, self.want_dres = want_dx, want_dres
        self.plan = plan
        training, relu, x_dtype = plan.training, plan.relu, plan.dtype
        geom, device = plan.geom, plan.device
        stat = plan.acc if training else plan.stat_dtype
        scale_offset = plan.C if training else 0  # rstd in the forward's workspace; running_var on its own
        w = plan.pdtype if plan.has_w else None
        # With a residual and ReLU, the reduction writes the masked dy g (it is d(residual)), and the
        # dx pass reads g instead of dy and y.
        self.store_g = plan.mask_from_y
        self.dw_dtype = plan.pdtype if self.want_dw else None
        self.db_dtype = plan.pdtype if self.want_db else None
        self.mode = "none"
        self.recompute_b = relu and not plan.mask_from_y and plan.has_b  # the mask recomputed from x and bias
        recompute_b = plan.pdtype if self.recompute_b else None
        y_dtype = x_dtype if plan.mask_from_y else None
        if training and want_dx and plan.single:
            self.mode = "single"
            dz = x_dtype if self.store_g and want_dres else None
            self.launch = launch.backward(
                geom, device, (x_dtype, x_dtype, x_dtype, stat, stat, w, self.dw_dtype, self.db_dtype, y_dtype,
                               recompute_b, dz),
                relu, rstd_offset=scale_offset,
            )  # fmt: skip
            self.store_dz = dz is not None
        elif self.want_dw or self.want_db or (training and want_dx):
            self.mode = "reduce"
            acc = plan.acc
            self.store_dz = self.store_g and (want_dres or want_dx)
            dz = x_dtype if self.store_dz else None
            # One workspace: sum(dy) at 0, sum(dy * xhat) at C, then the reduction's partials.
            C = geom.C
            self.sums = launch.grad_sums(
                geom, device, (x_dtype, x_dtype, stat, stat, acc, torch.int32, acc, acc, self.dw_dtype, self.db_dtype,
                               y_dtype, w, recompute_b, dz),
                plan.eps, not training, relu, offsets=(scale_offset, C, 2 * C),
            )  # fmt: skip
            self.ws = 2 * C + self.sums.parts
            if want_dx:  # from g (already masked) when the reduction wrote it, else from dy and the mask
                mask_relu = relu and not self.store_dz
                self.dx_bias = mask_relu and self.recompute_b
                self.dx = launch.grad_input(
                    geom, device, (x_dtype, x_dtype, x_dtype, stat, stat, w, acc, acc, None,
                                   recompute_b if self.dx_bias else None, None),
                    plan.eps, training, 0, mask_relu, offsets=(scale_offset, C),
                )  # fmt: skip
        elif want_dx or (relu and want_dres):  # eval, elementwise only: dx and/or d(residual)
            self.mode = "elementwise"
            self.store_dz = relu and want_dres
            self.dx = launch.grad_input(
                geom, device, (x_dtype, x_dtype, x_dtype if want_dx else None, stat, stat, w, None, None, y_dtype,
                               recompute_b, x_dtype if self.store_dz else None),
                plan.eps, False, 0, relu,
            )  # fmt: skip

    def __call__(self, dy, x, weight, bias, mean, scale, y):
        dx = dw = db = dz = None
        mode, plan = self.mode, self.plan
        if plan.w_copy:  # strided views: the kernels index per-channel tensors as t[c]
            weight = weight.contiguous()
        if plan.b_copy:
            bias = bias.contiguous()
        b = bias if self.recompute_b else None
        if self.want_dw:
            dw = torch.empty(self.plan.C, dtype=self.dw_dtype, device=x.device)
        if self.want_db:
            db = torch.empty(self.plan.C, dtype=self.db_dtype, device=x.device)
        if mode == "single":  # mean and scale: the forward's workspace (rstd at C)
            dx = torch.empty_like(x)
            dz = torch.empty_like(x) if self.store_dz else None
            self.launch(dy, x, dx, mean, scale, weight, dw, db, y, b, dz)
        elif mode == "reduce":
            ws = torch.empty(self.ws, dtype=plan.acc, device=x.device)
            g = torch.empty_like(x) if self.store_dz else None
            t = launch.tickets(x.device, self.sums.tickets)
            self.sums(dy, x, mean, scale, ws, t, ws, ws, dw, db, y, weight, b, g)
            if self.want_dx:
                dx = torch.empty_like(x)
                b = b if self.dx_bias else None
                self.dx(dy if g is None else g, x, dx, mean, scale, weight, ws, ws, None, b, None)
            dz = g
        elif mode == "elementwise":
            dx = torch.empty_like(x) if self.want_dx else None
            dz = torch.empty_like(x) if self.store_dz else None
            self.dx(dy, x, dx, mean, scale, weight, None, None, y, b, dz)
        if self.want_dres and not self.plan.relu:
            dz = dy
        return dx, dw, db, dz, None


class BatchNormFunction(torch.autograd.Function):
    """y = act((x - mean) * s * weight + bias + residual) by a ``Plan``, and its gradients.

    ``call`` is (plan, running_mean, running_var, num_batches_tracked): training computes the batch
    statistics (and moves the running ones) in the forward's launches; the backward's closed form
    carries the paths through the statistics. Eval normalizes with the running statistics.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, residual, call):
        plan, running_mean, running_var, num_batches_tracked = call
        y, mean, scale, x = plan.forward(x, weight, bias, residual, running_mean, running_var, num_batches_tracked)
        mask_y = y if plan.mask_from_y else None
        if plan.training:  # one workspace holds mean and rstd: saved once
            ctx.save_for_backward(x, weight, bias, mean, mask_y)
        else:
            ctx.save_for_backward(x, weight, bias, mean, mask_y, scale)
        ctx.plan = plan
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, mean, y, *scale = ctx.saved_tensors
        scale = scale[0] if scale else mean
        plan, needs = ctx.plan, ctx.needs_input_grad
        # create_graph=True: a differentiable backward; a vmap-batched dy (is_grads_batched) has no
        # memory for the kernels: plain torch ops serve it, under the batching rules.
        if torch.is_grad_enabled() or not torch._C._has_storage(dy):
            wants = (needs[0], needs[1] and weight is not None, needs[2] and bias is not None, needs[3])
            mean, scale = plan.statistics(mean, scale)
            grads = composite.differentiable_backward(
                dy, x, weight, bias, mean, scale, y, plan.training, plan.eps, plan.relu, wants
            )
            return (*grads, None)
        if dy.stride() != plan.strides or dy.data_ptr() % 16 != 0:
            dy = launch.like(dy, x)
        back = plan.backwards.get(needs)
        if back is None:
            back = plan.backwards[needs] = Backward(plan, needs)
        return back(dy, x, weight, bias, mean, scale, y)


# Function.apply's own checks (functorch wrappers, setup_context) without its Python: what the
# eager route hands it is already known plain (bn_triton/functional.py).
apply = super(torch.autograd.Function, BatchNormFunction).apply
