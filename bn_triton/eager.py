"""The eager route: a plan per call signature, decided once; a call then allocates and launches.

A ``Plan`` is built by bn_triton/functional.py on the first call of a signature, after validation,
and cached there. It holds the geometry, the launches of the forward (bn_triton/launch.py: tiles,
grid, compiled kernel), the workspace layout, and per set of wanted gradients the launches of the
backward (built on the first backward that asks for them). Which launches those are is
bn_triton/planner.py's decision, the same that the traced route reads. A training forward then
makes two allocations (y and one workspace for the statistics and the reduction's partials) and
one or two launches; its backward allocates dx, dweight, dbias and one workspace.

``BatchNormFunction`` is the autograd formula for this route: y = act((x - mean) * s * weight +
bias + residual), its backward the closed form of docs/math.md (the statistics' paths included), and a
differentiable backward (composite.py) under create_graph=True. The traced route (torch.compile,
export, modes: bn_triton/ops.py) runs the same launches through the custom ops.
"""

import torch

from bn_triton import composite, launch, planner
from bn_triton.launch import RunningSpec, dtypes


class Plan:
    """One call signature's decisions: ``forward(x, weight, bias, residual, running_mean, running_var,
    num_batches_tracked)`` launches it; with ``autograd``, a call goes through ``apply`` instead."""

    def __init__(self, x, weight, bias, residual, running_mean, running_var, momentum, num_batches_tracked, *,
                 training, eps, activation, autograd):  # fmt: skip
        xc, geom = launch.canonical(x)
        self.x_copy = xc is not x  # sliced, transposed or not 16-byte aligned: copied on every call
        self.geom, self.device, self.dtype, self.C = geom, x.device, x.dtype, geom.C
        self.acc = launch.acc_dtype(x.dtype)
        self.strides = xc.stride()
        self.training, self.eps, self.activation = training, eps, activation
        self.res_copy = residual is not None and (residual.stride() != self.strides or residual.data_ptr() % 16 != 0)
        self.w_copy = weight is not None and not weight.is_contiguous()
        self.b_copy = bias is not None and not bias.is_contiguous()
        self.has_w, self.has_b, self.has_res = weight is not None, bias is not None, residual is not None
        self.res_dtype = None if residual is None else residual.dtype
        self.saved = planner.saved(activation, self.has_res)  # y or the residual, for act' in backward
        self.pdtype = next((t.dtype for t in (weight, bias, running_mean) if t is not None), None)
        single = training and launch.single_pass(geom, x.device, x.element_size())
        self.kind = planner.forward(training, single)
        self.single = self.kind == "single"
        self.backwards: dict = {}  # needs_input_grad -> the backward's launches
        C, acc = self.C, self.acc
        common = dict(X=x.dtype, Y=x.dtype, W=weight, B=bias, RES=residual)
        stats_copy = False
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
            rs = dict(RUNNING_MEAN=running_mean, RUNNING_VAR=running_var, NUM_BATCHES=num_batches_tracked)
            # One workspace: mean at 0, rstd at C, then the statistics' partials. The kernels are
            # given it for each of those pointers, with the offsets (a view costs more than a launch).
            if self.single:
                types = dtypes(**common, MEAN=acc, RSTD=acc, TICKET=torch.int32, **rs)
                self.fwd = launch.forward(geom, self.device, types, eps, running, activation, rstd_offset=C)
                self.ws, self.tickets = 2 * C, self.fwd.tickets
            else:
                types = dtypes(X=x, PART=acc, COUNTER=torch.int32, MEAN=acc, RSTD=acc, **rs)
                self.stats = launch.stats(geom, self.device, types, eps, running, rstd_offset=C, part_offset=2 * C)
                self.ws, self.tickets = 2 * C + self.stats.parts, self.stats.tickets
                types = dtypes(**common, MEAN=acc, SCALE=acc)
                self.norm = launch.normalize(geom, self.device, types, eps, False, activation, scale_offset=C)
        else:
            stats_copy = not (running_mean.is_contiguous() and running_var.is_contiguous())
            types = dtypes(**common, MEAN=running_mean, SCALE=running_var)
            self.norm = launch.normalize(geom, self.device, types, eps, True, activation)
            self.stat_dtype = running_mean.dtype
        self.autograd = autograd  # through BatchNormFunction (``apply``), else ``forward`` alone
        self.relayout = self.x_copy or self.res_copy or self.w_copy or self.b_copy or (not training and stats_copy)

    # ---------------------------------------------------------------- forward
    def forward(self, x, weight, bias, residual, running_mean, running_var, num_batches_tracked):
        """(y, mean, scale, x as the kernels read it, residual as they read it): mean and scale are the
        workspace in training (rstd at offset C), running_mean and running_var in eval."""
        if self.relayout:  # a tensor in a layout the kernels do not read: a copy of it
            x, weight, bias, residual, running_mean, running_var = self.copies(
                x, weight, bias, residual, running_mean, running_var
            )
        y = torch.empty_like(x)
        if not self.training:
            self.norm(X=x, Y=y, MEAN=running_mean, SCALE=running_var, W=weight, B=bias, RES=residual)
            return y, running_mean, running_var, x, residual
        if not self.has_running:
            running_mean = running_var = None
        if not self.count_batch:
            num_batches_tracked = None
        elif self.check_counter and num_batches_tracked.item() == -1:
            raise ZeroDivisionError("float division by zero")
        ws = torch.empty(self.ws, dtype=self.acc, device=self.device)
        t = launch.tickets(self.device, self.tickets)
        if self.single:
            self.fwd(X=x, Y=y, MEAN=ws, RSTD=ws, TICKET=t, W=weight, B=bias, RES=residual, RUNNING_MEAN=running_mean,
                     RUNNING_VAR=running_var, NUM_BATCHES=num_batches_tracked)  # fmt: skip
            return y, ws, ws, x, residual
        self.stats(X=x, PART=ws, COUNTER=t, MEAN=ws, RSTD=ws, RUNNING_MEAN=running_mean, RUNNING_VAR=running_var,
                   NUM_BATCHES=num_batches_tracked)  # fmt: skip
        self.norm(X=x, Y=y, MEAN=ws, SCALE=ws, W=weight, B=bias, RES=residual)
        return y, ws, ws, x, residual

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
    """The launches of one plan's backward for one set of wanted gradients (ctx.needs_input_grad), as
    bn_triton/planner.py decides them, and the gradients' allocation: dx, dweight, dbias (the
    parameters' dtypes) and, through a reduction, one workspace for the partials and the two sums."""

    def __init__(self, plan: Plan, needs: tuple):
        s = self.spec = planner.backward(
            plan.training, plan.activation, plan.has_res, plan.has_w, plan.has_b, needs, plan.single
        )
        self.plan = plan
        x, acc, C, geom, device = plan.dtype, plan.acc, plan.C, plan.geom, plan.device
        stat = acc if plan.training else plan.stat_dtype
        scale_offset = C if plan.training else 0  # rstd in the forward's workspace; running_var on its own
        self.dw_dtype = plan.pdtype if s.dweight else None
        self.db_dtype = plan.pdtype if s.dbias else None
        # What act' is read from: y, or the pre-activation recomputed from x, the bias and the residual.
        recompute = s.activation is not None and not s.grad_from_y
        self.bias = recompute and plan.has_b
        act_in = dict(
            Y=x if s.grad_from_y else None,
            B=plan.pdtype if self.bias else None,
            RES=plan.res_dtype if s.read_residual else None,
        )
        w = plan.pdtype if plan.has_w else None
        out = dict(DW=self.dw_dtype, DB=self.db_dtype, DZ=x if s.store_g else None)
        if s.kind == "single":
            types = dtypes(DY=x, X=x, DX=x, MEAN=stat, RSTD=stat, W=w, **out, **act_in)
            self.launch = launch.backward(geom, device, types, s.activation, s.grad_from_y, rstd_offset=scale_offset)
        elif s.kind == "split":
            types = dtypes(DY=x, X=x, MEAN=stat, SCALE=stat, PART=acc, COUNTER=torch.int32, SUM_DY=acc,
                           SUM_DY_XHAT=acc, W=w, **out, **act_in)  # fmt: skip
            # One workspace: sum(dy) at 0, sum(dy * xhat) at C, then the reduction's partials.
            self.sums = launch.grad_sums(
                geom, device, types, plan.eps, not plan.training, s.activation, s.grad_from_y,
                offsets=(scale_offset, C, 2 * C),
            )  # fmt: skip
            self.ws = 2 * C + self.sums.parts
            if s.dx:  # from g when the reduction wrote it, else from dy and act'
                dx_in = {} if s.store_g else act_in
                types = dtypes(DY=x, X=x, DX=x, MEAN=stat, SCALE=stat, W=w, SUM_DY=acc, SUM_DY_XHAT=acc, **dx_in)
                self.dx = launch.grad_input(
                    geom, device, types, plan.eps, plan.training, 0, s.dx_activation, s.grad_from_y and not s.store_g,
                    offsets=(scale_offset, C),
                )  # fmt: skip
        elif s.kind == "elementwise":
            types = dtypes(DY=x, X=x, DX=x if s.dx else None, MEAN=stat, SCALE=stat, W=w, DZ=out["DZ"], **act_in)
            self.dx = launch.grad_input(
                geom, device, types, plan.eps, plan.training, 0, s.activation, s.grad_from_y, offsets=(scale_offset, C)
            )

    def __call__(self, dy, x, weight, bias, mean, scale, y, residual):
        dx = dw = db = g = None
        s, plan = self.spec, self.plan
        if plan.w_copy:  # strided views: the kernels index per-channel tensors as t[c]
            weight = weight.contiguous()
        if plan.b_copy:
            bias = bias.contiguous()
        act_in = dict(Y=y, B=bias if self.bias else None, RES=residual)  # None where not saved
        if s.dweight:
            dw = torch.empty(plan.C, dtype=self.dw_dtype, device=x.device)
        if s.dbias:
            db = torch.empty(plan.C, dtype=self.db_dtype, device=x.device)
        if s.kind == "single":  # mean and scale: the forward's workspace (rstd at C)
            dx = torch.empty_like(x)
            g = torch.empty_like(x) if s.store_g else None
            self.launch(DY=dy, X=x, DX=dx, MEAN=mean, RSTD=scale, W=weight, DW=dw, DB=db, DZ=g, **act_in)
        elif s.kind == "split":
            ws = torch.empty(self.ws, dtype=plan.acc, device=x.device)
            g = torch.empty_like(x) if s.store_g else None
            t = launch.tickets(x.device, self.sums.tickets)
            self.sums(DY=dy, X=x, MEAN=mean, SCALE=scale, PART=ws, COUNTER=t, SUM_DY=ws, SUM_DY_XHAT=ws, W=weight,
                      DW=dw, DB=db, DZ=g, **act_in)  # fmt: skip
            if s.dx:
                dx = torch.empty_like(x)
                if g is None:
                    self.dx(DY=dy, X=x, DX=dx, MEAN=mean, SCALE=scale, W=weight, SUM_DY=ws, SUM_DY_XHAT=ws, **act_in)
                else:
                    self.dx(DY=g, X=x, DX=dx, MEAN=mean, SCALE=scale, W=weight, SUM_DY=ws, SUM_DY_XHAT=ws)
        elif s.kind == "elementwise":
            dx = torch.empty_like(x) if s.dx else None
            g = torch.empty_like(x) if s.store_g else None
            self.dx(DY=dy, X=x, DX=dx, MEAN=mean, SCALE=scale, W=weight, DZ=g, **act_in)
        return dx, dw, db, dy if s.dresidual == "dy" else g, None


class BatchNormFunction(torch.autograd.Function):
    """y = act((x - mean) * s * weight + bias + residual) by a ``Plan``, and its gradients.

    ``call`` is (plan, running_mean, running_var, num_batches_tracked): training computes the batch
    statistics (and moves the running ones) in the forward's launches; the backward's closed form
    carries the paths through the statistics. Eval normalizes with the running statistics.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, residual, call):
        plan, running_mean, running_var, num_batches_tracked = call
        y, mean, scale, x, residual = plan.forward(
            x, weight, bias, residual, running_mean, running_var, num_batches_tracked
        )
        # For act' in backward: y (ReLU with a residual) or the residual, as the planner says.
        aux = y if plan.saved.y else residual if plan.saved.residual else None
        if plan.training:  # one workspace holds mean and rstd: saved once
            ctx.save_for_backward(x, weight, bias, mean, aux)
        else:
            ctx.save_for_backward(x, weight, bias, mean, aux, scale)
        ctx.plan = plan
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, mean, aux, *scale = ctx.saved_tensors
        scale = scale[0] if scale else mean
        plan, needs = ctx.plan, ctx.needs_input_grad
        # composite.needed_in_backward's test, written out (C calls only: this runs on every backward)
        if torch.is_grad_enabled() or not torch._C._has_storage(dy):  # create_graph=True, or a vmap-batched dy
            wants = (needs[0], needs[1] and weight is not None, needs[2] and bias is not None, needs[3])
            mean, scale = plan.statistics(mean, scale)
            y, res = (aux, None) if plan.saved.y else (None, aux)
            grads = composite.differentiable_backward(
                dy, x, weight, bias, mean, scale, y, res, plan.training, plan.eps, plan.activation, wants
            )
            return (*grads, None)
        if dy.stride() != plan.strides or dy.data_ptr() % 16 != 0:
            dy = launch.like(dy, x)
        back = plan.backwards.get(needs)
        if back is None:
            back = plan.backwards[needs] = Backward(plan, needs)
        saved = plan.saved
        return back(dy, x, weight, bias, mean, scale, aux if saved.y else None, aux if saved.residual else None)


# Function.apply's own checks (functorch wrappers, setup_context) without its Python: what the
# eager route hands it is already known plain (bn_triton/functional.py).
apply = super(torch.autograd.Function, BatchNormFunction).apply
