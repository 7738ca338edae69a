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
from pf2lora import batching, lora
from pf2lora import state as st
from pf2lora.config import PF2LoRAConfig
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


# -- the default estimator (one-sided since issue 13): its error is the O(e) term ------------------


def _second_directional(loss_fn, x, y, v, batch, h: float) -> st.Tensors:
    """d^2/ds^2 grad_x f(x, y + s v) at s = 0, by a central second difference (float64, O(h^2))."""

    def gx(s: float) -> st.Tensors:
        xl = {k: t.clone().requires_grad_(True) for k, t in x.items()}
        ys = {k: y[k] + s * v[k] for k in y}
        return dict(zip(xl, torch.autograd.grad(loss_fn(xl, ys, batch), list(xl.values())), strict=True))

    p, z, m = gx(h), gx(0.0), gx(-h)
    return {k: (p[k] - 2 * z[k] + m[k]) / h**2 for k in x}


def _norm(t: st.Tensors) -> float:
    return float(_flat(t, sorted(t)).double().norm())


def test_default_estimator_agrees_with_exact_within_its_O_e_error():
    """The default (``PF2LoRAConfig()``: one-sided difference, e0 = 1e-3) against the exact product.

    The one-sided difference's error is ``(e/2) d^2/ds^2 grad_x f(x, y + s v) + O(e^2)``, ``e = e0 /
    ||v||``. In float64 that predicted term must *be* the error (so the tolerance below rests on a
    measured constant, not a guess); in float32 the tolerance is that term plus the rounding of the
    difference, which the central difference at the same e shows (its own O(e^2) error is ~1e-7
    here, far below float32 rounding): 1.5 x (predicted O(e) error + central's float32 error)."""
    p = PF2LoRAConfig()
    assert (p.estimator, p.fd_one_sided) == ("finite-difference", True)
    loss_fn, x, y, xi, _ = _problem(torch.float64)
    v = _random_v(y)
    exact = mixed_hvp(loss_fn, x, y, v, xi, "exact")
    e = p.fd_eps / _norm(v)
    curvature = _second_directional(loss_fn, x, y, v, xi, h=1e-2 / _norm(v))
    predicted = (e / 2) * _norm(curvature) / _norm(exact)
    assert predicted > 1e-5  # a real O(e) error to predict
    err64 = _rel(mixed_hvp(loss_fn, x, y, v, xi, p.estimator, eps=p.fd_eps, one_sided=p.fd_one_sided), exact)
    assert err64 == pytest.approx(predicted, rel=0.05)
    # Halving e halves the error: first order, as the prediction says.
    half = _rel(mixed_hvp(loss_fn, x, y, v, xi, p.estimator, eps=p.fd_eps / 2, one_sided=True), exact)
    assert err64 / half == pytest.approx(2.0, rel=0.05)

    loss32, x32, y32, xi32, _ = _problem(torch.float32)
    v32 = _random_v(y32)
    exact32 = mixed_hvp(loss32, x32, y32, v32, xi32, "exact")
    central32 = _rel(mixed_hvp(loss32, x32, y32, v32, xi32, "finite-difference", eps=p.fd_eps, one_sided=False), exact32)
    default32 = _rel(mixed_hvp(loss32, x32, y32, v32, xi32, p.estimator, eps=p.fd_eps, one_sided=p.fd_one_sided), exact32)
    assert default32 < 1.5 * (predicted + central32)
    assert default32 < 2e-3  # what the above allows here (0.76e-3 predicted + ~0.13e-3 rounding)


def test_default_bilevel_step_agrees_with_the_exact_unroll():
    """The hypergradients differ only by ``eta (H_xy v - estimate)``: the default's error above."""
    p = PF2LoRAConfig()
    loss_fn, x, y, xi, zeta = _problem(torch.float32)
    eta = 0.3
    exact = bilevel_step(loss_fn, x, y, xi, zeta, eta, "exact")
    default = bilevel_step(loss_fn, x, y, xi, zeta, eta, p.estimator, p.fd_eps, p.fd_one_sided)
    assert _rel(default.hvp, exact.hvp) < 2e-3
    diff = {k: default.hypergrad[k] - exact.hypergrad[k] for k in x}
    assert _norm(diff) == pytest.approx(eta * _norm({k: default.hvp[k] - exact.hvp[k] for k in x}), rel=1e-3)
    assert _rel(default.y_next, exact.y_next) == 0.0


# -- no host synchronisation, clients stacked, a supplied H_xy v -----------------------------------


def _meta_problem():
    torch.manual_seed(0)
    model = _MLP().to("meta")
    lora.inject(model, ["fc1", "fc2"], {lora.COMMON: 2.0, lora.PRIVATE: 1.0})

    def loss_fn(xs, ys, b):
        out = functional_call(model, st.model_params(xs, ys), args=(b["inputs"],), strict=False)
        return ((out - b["targets"]) ** 2).mean()

    _, x, y, xi, zeta = _problem(torch.float32)
    meta = lambda d: {k: t.to("meta") for k, t in d.items()}
    return loss_fn, meta(x), meta(y), meta(xi), meta(zeta)


@pytest.mark.parametrize(
    "estimator, one_sided", [("finite-difference", True), ("finite-difference", False), ("exact", False), ("first-order", False)]
)
def test_step_reads_nothing_back_to_the_host(estimator, one_sided):
    """On the meta device any ``.item()``, ``float()`` or ``bool()`` of a tensor raises: the step
    (e = e0 / ||v||, the v = 0 case included) runs without a host synchronisation."""
    loss_fn, x, y, xi, zeta = _meta_problem()
    res = bilevel_step(loss_fn, x, y, xi, zeta, 0.3, estimator, one_sided=one_sided)
    assert res.loss.device.type == "meta" and res.loss.dim() == 0
    assert all(res.hypergrad[k].shape == x[k].shape for k in x)
    with pytest.raises(RuntimeError):
        float(res.loss)


K = 3


def _clients(dtype: torch.dtype = torch.float64):
    """K clients on the same frozen model: their own x, y, batches, and v of very different sizes
    (one of them zero)."""
    loss_fn, x0, y0, xi0, zeta0 = _problem(dtype)
    g = torch.Generator().manual_seed(11)
    jitter = lambda d, s: {k: t + s * torch.randn(t.shape, generator=g).to(dtype) for k, t in d.items()}
    xs = [jitter(x0, 0.2) for _ in range(K)]
    ys = [jitter(y0, 0.2) for _ in range(K)]
    xis = [jitter(xi0, 0.5) for _ in range(K)]
    zetas = [jitter(zeta0, 0.5) for _ in range(K)]
    vs = [_random_v(y0, seed=20 + i, scale=s) for i, s in enumerate((1e3, 1e-3, 0.0))]

    def stacked_loss(xs_, ys_, b):
        def part(d, i):
            return {k: t[i] for k, t in d.items()}

        return torch.stack([loss_fn(part(xs_, i), part(ys_, i), part(b, i)) for i in range(K)])

    return loss_fn, stacked_loss, xs, ys, xis, zetas, vs


@pytest.mark.parametrize("estimator, one_sided", [("finite-difference", True), ("finite-difference", False), ("exact", False)])
def test_stacked_clients_get_their_own_mixed_hvp(estimator, one_sided):
    """With K clients stacked (:mod:`pf2lora.batching`) the norm of v, the step e and the result are
    per client: each slice equals that client's own product (a zero v gives zeros)."""
    loss_fn, stacked_loss, xs, ys, xis, _, vs = _clients()
    singles = [mixed_hvp(loss_fn, xs[i], ys[i], vs[i], xis[i], estimator, one_sided=one_sided) for i in range(K)]
    with batching.stacked(K):
        together = mixed_hvp(
            stacked_loss, batching.stack(xs), batching.stack(ys), batching.stack(vs), batching.stack(xis), estimator, one_sided=one_sided
        )
    for i, single in enumerate(batching.unstack(together, K)):
        if i == K - 1:
            assert all(not t.any() for t in single.values())
        else:
            assert _rel(single, singles[i]) < 1e-9, i


@pytest.mark.parametrize("estimator", ["finite-difference", "exact", "first-order"])
def test_stacked_bilevel_step_is_each_clients_step(estimator):
    loss_fn, stacked_loss, xs, ys, xis, zetas, _ = _clients()
    singles = [bilevel_step(loss_fn, xs[i], ys[i], xis[i], zetas[i], 0.3, estimator, one_sided=True) for i in range(K)]
    with batching.stacked(K):
        res = bilevel_step(stacked_loss, *(batching.stack(d) for d in (xs, ys, xis, zetas)), 0.3, estimator, one_sided=True)
    assert res.loss.shape == (K,) and not res.loss.requires_grad
    for i in range(K):
        assert float(res.loss[i]) == pytest.approx(float(singles[i].loss), rel=1e-12)
        assert _rel(batching.unstack(res.hypergrad, K)[i], singles[i].hypergrad) < 1e-9
        assert _rel(batching.unstack(res.y_next, K)[i], singles[i].y_next) < 1e-12
        hvp = batching.unstack(res.hvp, K)[i]
        assert _rel(hvp, singles[i].hvp) < 1e-9 if estimator != "first-order" else not any(t.any() for t in hvp.values())


def test_supplied_hvp_replaces_the_estimate():
    """``hvp=``: the step uses it as is (no estimate), and the rest of the step is unchanged."""
    loss_fn, x, y, xi, zeta = _problem(torch.float64)
    eta = 0.3
    fresh = bilevel_step(loss_fn, x, y, xi, zeta, eta, "exact")
    again = bilevel_step(loss_fn, x, y, xi, zeta, eta, "finite-difference", hvp=fresh.hvp)
    assert _rel(again.hypergrad, fresh.hypergrad) < 1e-12 and _rel(again.y_next, fresh.y_next) == 0.0
    assert all(torch.equal(again.hvp[k], fresh.hvp[k]) for k in x)
    stale = {k: 2 * t for k, t in fresh.hvp.items()}
    res = bilevel_step(loss_fn, x, y, xi, zeta, eta, "exact", hvp=stale)
    assert _rel(res.hypergrad, {k: fresh.hypergrad[k] - eta * fresh.hvp[k] for k in x}) < 1e-12
