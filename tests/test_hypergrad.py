"""The hypergradient of PF2LoRA's one-step unrolled objective, on a small *nonlinear* model.

On the synthetic (bilinear) task the finite difference is exact, so it cannot show estimator error;
here two LoRA-adapted linear layers with a tanh between them make grad_x f curved in y.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.func import functional_call

import pf2lora.methods  # noqa: F401  (must precede pf2lora.hypergrad: see test_import_hypergrad_first)
from pf2lora import lora
from pf2lora import state as st
from pf2lora.hypergrad import bilevel_step, mixed_hvp

D_IN, D_HID, D_OUT, R, R_PRIV = 5, 7, 3, 2, 1


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(D_IN, D_HID)
        self.fc2 = nn.Linear(D_HID, D_OUT)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(inputs)))


def test_import_hypergrad_first():
    """``import pf2lora.hypergrad`` must work in a fresh interpreter (as the first pf2lora import)."""
    proc = subprocess.run([sys.executable, "-c", "import pf2lora.hypergrad"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr.strip().splitlines()[-1:]


def _problem(dtype: torch.dtype, seed: int = 0):
    """(loss_fn, x, y, xi, zeta) with random non-zero common (x) and private (y) adapters."""
    torch.manual_seed(seed)
    model = _MLP().to(dtype)
    targets = lora.inject(model, ["fc1", "fc2"], {lora.COMMON: 2.0, lora.PRIVATE: 1.0})
    assert [t.path for t in targets] == ["fc1", "fc2"]
    g = torch.Generator().manual_seed(seed + 1)

    def adapter(name: str, role: str, rank: int) -> st.Tensors:
        out = {}
        for t in targets:
            k_a, k_b = lora.adapter_keys(t, name, role)
            out[k_a] = (0.5 * torch.randn(rank, t.in_features, generator=g)).to(dtype)
            out[k_b] = (0.5 * torch.randn(t.out_features, rank, generator=g)).to(dtype)
        return out

    x = adapter(lora.COMMON, st.SHARED, R)
    y = adapter(lora.PRIVATE, st.PRIVATE, R_PRIV)

    def batch(n: int) -> dict[str, torch.Tensor]:
        u = torch.randn(n, D_IN, generator=g).to(dtype)
        return {"inputs": u, "targets": torch.sin(2 * u[:, :D_OUT]) + 0.1 * torch.randn(n, D_OUT, generator=g).to(dtype)}

    xi, zeta = batch(16), batch(16)

    def loss_fn(xs, ys, b):
        out = functional_call(model, st.model_params(xs, ys), args=(b["inputs"],), strict=False)
        return ((out - b["targets"]) ** 2).mean()

    return loss_fn, x, y, xi, zeta


def _flat(t: dict[str, torch.Tensor], keys) -> torch.Tensor:
    return torch.cat([t[k].reshape(-1) for k in keys])


def _rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    keys = sorted(b)
    fa, fb = _flat(a, keys).double(), _flat(b, keys).double()
    return float((fa - fb).norm() / fb.norm())


def _random_v(y: st.Tensors, seed: int = 7, scale: float = 1.0) -> st.Tensors:
    g = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(v.shape, generator=g).to(v.dtype) for k, v in y.items()}


def _hvp_by_explicit_matrix(loss_fn, x, y, v, batch) -> st.Tensors:
    """Independent reference: build the mixed Hessian d(grad_x f)/dy row by row, multiply by v."""
    xk, yk = sorted(x), sorted(y)
    xl = {k: x[k].clone().requires_grad_(True) for k in xk}
    yl = {k: y[k].clone().requires_grad_(True) for k in yk}
    gx = torch.autograd.grad(loss_fn(xl, yl, batch), [xl[k] for k in xk], create_graph=True)
    gx_flat = torch.cat([g.reshape(-1) for g in gx])
    rows = []
    for j in range(gx_flat.numel()):
        r = torch.autograd.grad(gx_flat[j], [yl[k] for k in yk], retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(ri if ri is not None else torch.zeros_like(yl[k])).reshape(-1) for ri, k in zip(r, yk, strict=True)]))
    hv = torch.stack(rows) @ _flat(v, yk)
    out, i = {}, 0
    for k in xk:
        out[k] = hv[i : i + x[k].numel()].reshape(x[k].shape)
        i += x[k].numel()
    return out


def test_exact_matches_explicit_mixed_hessian():
    loss_fn, x, y, xi, _ = _problem(torch.float64)
    v = _random_v(y)
    exact = mixed_hvp(loss_fn, x, y, v, xi, "exact")
    ref = _hvp_by_explicit_matrix(loss_fn, x, y, v, xi)
    assert _flat(exact, sorted(x)).norm() > 1e-3  # a real mixed second derivative
    assert _rel(exact, ref) < 1e-10


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-2), (torch.float64, 1e-6)])
def test_central_difference_matches_exact(dtype, tol):
    loss_fn, x, y, xi, _ = _problem(dtype)
    v = _random_v(y)
    exact = mixed_hvp(loss_fn, x, y, v, xi, "exact")
    fd = mixed_hvp(loss_fn, x, y, v, xi, "finite-difference", eps=1e-3)
    assert _rel(fd, exact) < tol
    assert all(fd[k].dtype == dtype and fd[k].shape == x[k].shape for k in x)


def test_one_sided_difference_close_to_exact():
    loss_fn, x, y, xi, _ = _problem(torch.float32)
    v = _random_v(y)
    exact = mixed_hvp(loss_fn, x, y, v, xi, "exact")
    fd1 = mixed_hvp(loss_fn, x, y, v, xi, "finite-difference", eps=1e-3, one_sided=True)
    assert _rel(fd1, exact) < 5e-2
    # Reusing a supplied grad_x f(x, y) gives the same estimate as recomputing it.
    xl = {k: t.clone().requires_grad_(True) for k, t in x.items()}
    base = dict(zip(xl, torch.autograd.grad(loss_fn(xl, y, xi), list(xl.values())), strict=True))
    fd1b = mixed_hvp(loss_fn, x, y, v, xi, "finite-difference", eps=1e-3, one_sided=True, grad_x_at_y=base)
    assert _rel(fd1b, fd1) < 1e-6


def test_model_is_curved_so_the_estimator_test_means_something():
    """In float64 the one-sided difference has a visible O(e) error: grad_x f is not linear in y."""
    loss_fn, x, y, xi, _ = _problem(torch.float64)
    v = _random_v(y)
    exact = mixed_hvp(loss_fn, x, y, v, xi, "exact")
    fd1 = mixed_hvp(loss_fn, x, y, v, xi, "finite-difference", eps=1e-2, one_sided=True)
    fd2 = mixed_hvp(loss_fn, x, y, v, xi, "finite-difference", eps=1e-2)
    assert _rel(fd1, exact) > 1e-6
    assert _rel(fd2, exact) < _rel(fd1, exact)  # central is second-order accurate


def test_finite_difference_step_is_relative_to_norm_of_v():
    """e = e0 / ||v||: a huge or tiny v still gets a well-sized perturbation (H_xy v is linear in v)."""
    loss_fn, x, y, xi, _ = _problem(torch.float32)
    for scale in (1e4, 1e-4):
        v = _random_v(y, scale=scale)
        exact = mixed_hvp(loss_fn, x, y, v, xi, "exact")
        fd = mixed_hvp(loss_fn, x, y, v, xi, "finite-difference", eps=1e-3)
        assert _rel(fd, exact) < 1e-2, scale


def test_first_order_and_zero_direction_give_zeros():
    loss_fn, x, y, xi, _ = _problem(torch.float32)
    v = _random_v(y)
    fo = mixed_hvp(loss_fn, x, y, v, xi, "first-order")
    assert set(fo) == set(x)
    assert all(fo[k].shape == x[k].shape and not fo[k].any() for k in x)
    zero_v = {k: torch.zeros_like(t) for k, t in y.items()}
    fd = mixed_hvp(loss_fn, x, y, zero_v, xi, "finite-difference")
    assert all(not fd[k].any() for k in x)
    with pytest.raises(ValueError):
        mixed_hvp(loss_fn, x, y, v, xi, "second-order")  # type: ignore[arg-type]


def _unrolled_reference(loss_fn, x, y, xi, zeta, eta):
    """grad_x of x -> f(x, y - eta grad_y f(x, y; xi); zeta), by autograd through the unroll."""
    xl = {k: t.clone().requires_grad_(True) for k, t in x.items()}
    yl = {k: t.clone().requires_grad_(True) for k, t in y.items()}
    gy = torch.autograd.grad(loss_fn(xl, yl, xi), list(yl.values()), create_graph=True)
    y_plus = {k: yl[k] - eta * g for k, g in zip(yl, gy, strict=True)}
    outer = loss_fn(xl, y_plus, zeta)
    gx = torch.autograd.grad(outer, list(xl.values()))
    return dict(zip(xl, gx, strict=True)), {k: t.detach() for k, t in y_plus.items()}


def test_bilevel_step_exact_equals_gradient_through_the_unroll():
    loss_fn, x, y, xi, zeta = _problem(torch.float64)
    eta = 0.3
    x0, y0 = st.clone(x), st.clone(y)
    ref, y_plus = _unrolled_reference(loss_fn, x, y, xi, zeta, eta)
    res = bilevel_step(loss_fn, x, y, xi, zeta, eta, "exact")
    assert _rel(res.hypergrad, ref) < 1e-8
    assert _rel(res.y_next, y_plus) < 1e-12
    assert float(res.loss) == pytest.approx(float(loss_fn(x, y, xi)), rel=1e-12)
    # The second-order term matters here, so the check would catch a first-order-only hypergradient.
    fo = bilevel_step(loss_fn, x, y, xi, zeta, eta, "first-order")
    assert _rel(fo.hypergrad, ref) > 1e-3
    # Inputs untouched, outputs detached.
    assert all(torch.equal(x[k], x0[k]) for k in x) and all(torch.equal(y[k], y0[k]) for k in y)
    assert not any(t.requires_grad for t in [*res.hypergrad.values(), *res.y_next.values()])


@pytest.mark.parametrize("one_sided, tol", [(False, 1e-2), (True, 5e-2)])
def test_bilevel_step_finite_difference_close_to_unroll_float32(one_sided, tol):
    loss_fn, x, y, xi, zeta = _problem(torch.float32)
    eta = 0.3
    ref, _ = _unrolled_reference(loss_fn, x, y, xi, zeta, eta)
    res = bilevel_step(loss_fn, x, y, xi, zeta, eta, "finite-difference", eps=1e-3, one_sided=one_sided)
    assert _rel(res.hypergrad, ref) < tol


def test_bilevel_first_order_is_partial_gradient_at_y_plus():
    loss_fn, x, y, xi, zeta = _problem(torch.float64)
    eta = 0.3
    _, y_plus = _unrolled_reference(loss_fn, x, y, xi, zeta, eta)
    xl = {k: t.clone().requires_grad_(True) for k, t in x.items()}
    partial = dict(zip(xl, torch.autograd.grad(loss_fn(xl, y_plus, zeta), list(xl.values())), strict=True))
    fo = bilevel_step(loss_fn, x, y, xi, zeta, eta, "first-order")
    assert _rel(fo.hypergrad, partial) < 1e-12
