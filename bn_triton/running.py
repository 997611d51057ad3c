"""What a training call does to the running statistics, as one value that every layer passes on."""

from typing import NamedTuple, Optional

from torch import Tensor


class Running(NamedTuple):
    """The running statistics of a training call, and how they move.

    With ``mean`` and ``var`` (running_mean, running_var), the call updates them in place:
    running <- (1 - f) running + f batch, unbiased variance, with f = ``momentum``. With
    ``num_batches_tracked`` (the modules), the call counts its batch there (+1), and a ``momentum``
    of None takes the cumulative average f = 1 / num_batches_tracked, this batch counted, read on the
    device by our kernels. Nothing happens to buffers that are None.
    """

    mean: Optional[Tensor] = None
    var: Optional[Tensor] = None
    momentum: Optional[float] = 0.0
    num_batches_tracked: Optional[Tensor] = None


NO_RUNNING = Running()  # no running statistics to update, no batch to count
