"""BatchNorm1d/2d/3d as drop-ins for torch.nn's, and convert_batchnorm."""

import copy

import pytest
import torch

import bn_triton
from bn_triton import launch
from tests.helpers import make

PAIRS = [
    (bn_triton.BatchNorm1d, torch.nn.BatchNorm1d, (6, 4)),
    (bn_triton.BatchNorm1d, torch.nn.BatchNorm1d, (3, 4, 5)),
    (bn_triton.BatchNorm2d, torch.nn.BatchNorm2d, (2, 4, 3, 5)),
    (bn_triton.BatchNorm3d, torch.nn.BatchNorm3d, (2, 4, 2, 3, 3)),
]
KWARGS = [
    dict(),
    dict(momentum=None),
    dict(affine=False),
    dict(track_running_stats=False),
    dict(eps=1e-3, momentum=0.3),
]


@pytest.mark.parametrize("kwargs", KWARGS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "default")
@pytest.mark.parametrize("ours,theirs,shape", PAIRS, ids=lambda v: getattr(v, "__name__", str(v)))
def test_module_matches_torch(ours, theirs, shape, kwargs, device, torch_bn_forbidden):
    """Several training steps, then eval: outputs, grads, buffers and num_batches_tracked match torch."""
    with torch_bn_forbidden.allowed():
        ref = theirs(shape[1], **kwargs).to(device)
    mod = ours(shape[1], **kwargs).to(device)
    assert isinstance(mod, theirs)
    assert list(mod.state_dict()) == list(ref.state_dict())
    if mod.affine:
        with torch.no_grad():
            for p, q in zip(mod.parameters(), ref.parameters(), strict=True):
                p.copy_(torch.randn_like(p))
                q.copy_(p)
    for step in range(3):
        x = make(shape, torch.float32, device, offset=step, scale=1 + step, seed=step)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya = mod(xa)
        with torch_bn_forbidden.allowed():
            yb = ref(xb)
        torch.testing.assert_close(ya, yb, atol=2e-5, rtol=2e-5)
        dy = make(shape, torch.float32, device, seed=100 + step)
        ya.backward(dy)
        with torch_bn_forbidden.allowed():
            yb.backward(dy)
        torch.testing.assert_close(xa.grad, xb.grad, atol=5e-5, rtol=5e-5)
    for name, buf in ref.named_buffers():
        torch.testing.assert_close(dict(mod.named_buffers())[name], buf, atol=2e-5, rtol=2e-5, msg=name)
    mod.eval()
    ref.eval()
    x = make(shape, torch.float32, device, seed=7)
    with torch_bn_forbidden.allowed():
        expected = ref(x)
    torch.testing.assert_close(mod(x), expected, atol=2e-5, rtol=2e-5)


class Net(torch.nn.Module):
    def __init__(self, bn2d, bn1d):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = bn2d(4)
        self.conv2 = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = bn2d(4, momentum=None)
        self.fc = torch.nn.Linear(4 * 16, 6)
        self.bn3 = bn1d(6)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.bn3(self.fc(x.flatten(1)))


@pytest.mark.parametrize("channels_last", [False, True])
def test_small_conv_net_trains_like_torch(channels_last, device):
    torch.manual_seed(0)
    theirs = Net(torch.nn.BatchNorm2d, torch.nn.BatchNorm1d).to(device)
    ours = Net(bn_triton.BatchNorm2d, bn_triton.BatchNorm1d).to(device)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (theirs, ours)]
    stats_launches = lambda: launch.LAUNCHES["stats"] + launch.LAUNCHES["forward"]  # split or single pass
    before = stats_launches()
    for step in range(3):
        x = make((4, 3, 4, 4), torch.float32, device, seed=step).contiguous(memory_format=fmt)
        target = make((4, 6), torch.float32, device, seed=50 + step)
        for model, opt in zip((theirs, ours), opts, strict=True):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), target)
            loss.backward()
            opt.step()
    assert stats_launches() == before + 9, "three BN layers x three steps ran our kernels"
    sa, sb = theirs.state_dict(), ours.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], atol=1e-4, rtol=1e-4, msg=k)


def test_state_dict_loads_both_ways(device):
    theirs = torch.nn.BatchNorm2d(5).to(device)
    theirs.running_mean.uniform_()
    theirs.num_batches_tracked += 7
    ours = bn_triton.BatchNorm2d(5).to(device)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    back = torch.nn.BatchNorm2d(5).to(device)
    back.load_state_dict(ours.state_dict(), strict=True)
    assert torch.equal(back.running_mean, theirs.running_mean)
    assert int(back.num_batches_tracked) == 7


def test_wrong_rank_is_refused_like_torch(device):
    with pytest.raises(ValueError, match="expected 4D input"):
        bn_triton.BatchNorm2d(3).to(device)(torch.randn(2, 3, device=device))
    with pytest.raises(ValueError, match="expected 2D or 3D input"):
        bn_triton.BatchNorm1d(3).to(device)(torch.randn(2, 3, 4, 5, device=device))


def test_bad_input_leaves_module_untouched(device):
    mod = bn_triton.BatchNorm1d(3).to(device)
    state = copy.deepcopy(mod.state_dict())
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        mod(torch.randn(1, 3, device=device))
    for k, v in mod.state_dict().items():
        assert torch.equal(v, state[k]), k
