"""Synthetic linear rank recovery (spec: "Synthetic rank-recovery experiment").

Client k's targets are ``W_k u + noise`` with ``W_k = W0 + U S V^T + U_k S_k V_k^T``: a shared
component of rank r_c and a client component of rank s_k, built orthogonal to the shared one so the
true update has exactly rank r_c + s_k with known singular values. The model is ``W0`` (frozen) in a
single linear layer with LoRA on it; what a method learns on top of ``W0`` is compared with the
truth.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from pf2lora import lora
from pf2lora.config import RunConfig
from pf2lora.metrics import effective_rank
from pf2lora.tasks import register_task
from pf2lora.tasks.base import Batch, ClientData, Task


class _Regressor(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.proj(inputs)


@register_task("synthetic")
class SyntheticRankTask(Task):
    primary_metric = "test_mse"
    higher_is_better = False
    device_tensors = ("shared_delta",)  # diagnostics compare the learned update with it
    stacking_pays_on_cpu = True  # a step is a few small matmuls: overhead-bound
    table_columns = ("test_mse", "rank_matched", "effective_rank", "common_rel_error", "private_norm", "global_test_mse")

    def __init__(self, cfg: RunConfig, *, double_backward: bool = False):
        """``double_backward`` needs nothing here: a linear layer supports it."""
        tc = cfg.task
        self.name = "synthetic-rank"
        self.threshold = cfg.eval.rank_threshold
        g = torch.Generator().manual_seed(tc.data_seed)
        d, rc = tc.dim, tc.shared_rank
        self.model = _Regressor(d)
        with torch.no_grad():
            self.model.proj.weight.copy_(torch.randn(d, d, generator=g) / d**0.5)
        w0 = self.model.proj.weight.detach().clone()
        self.targets = lora.inject(self.model, ["proj"], {lora.COMMON: cfg.lora.alpha, lora.PRIVATE: cfg.lora.private_alpha})

        def spectrum(k: int) -> torch.Tensor:
            return tc.singular_min + (tc.singular_max - tc.singular_min) * torch.rand(k, generator=g)

        # Orthonormal bases; client components live in the complement of the shared one.
        q_left, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
        q_right, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
        U, V = q_left[:, :rc], q_right[:, :rc]
        self.shared_delta = U @ torch.diag(spectrum(rc)) @ V.T
        self.clients = []
        for k in range(tc.num_clients):
            s_k = tc.private_ranks[k % len(tc.private_ranks)]
            perm_l = rc + torch.randperm(d - rc, generator=g)[:s_k]
            perm_r = rc + torch.randperm(d - rc, generator=g)[:s_k]
            own = q_left[:, perm_l] @ torch.diag(spectrum(s_k)) @ q_right[:, perm_r].T
            w_k = w0 + self.shared_delta + own
            n = tc.train_samples + tc.test_samples
            u = torch.randn(n, d, generator=g)
            y = u @ w_k.T + tc.noise * torch.randn(n, d, generator=g)
            train = {"inputs": u[: tc.train_samples], "targets": y[: tc.train_samples]}
            test = {"inputs": u[tc.train_samples :], "targets": y[tc.train_samples :]}
            self.clients.append(ClientData(f"client_{k}", train, test, info={"true_rank": rc + s_k, "private_rank": s_k}))
        self.noise_floor = tc.noise**2

    def model_inputs(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {"inputs": batch["inputs"]}

    def loss(self, params: Mapping[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        return ((self.forward(params, batch) - batch["targets"]) ** 2).mean()

    def stacked_loss(self, params: Mapping[str, torch.Tensor], batch: Batch, k: int) -> torch.Tensor:
        """The linear layer takes (k, batch, d) as it is; the mean is per client."""
        return ((self.forward(params, batch) - batch["targets"]) ** 2).flatten(1).mean(1)

    @torch.no_grad()
    def evaluate(self, params: Mapping[str, torch.Tensor], data: Batch) -> dict[str, float]:
        return {"test_mse": float(self.loss(params, data))}

    @torch.no_grad()
    def diagnostics(
        self, client: ClientData, personalized: Mapping[str, torch.Tensor], common: Mapping[str, torch.Tensor]
    ) -> dict[str, float | None]:
        path = self.targets[0].path
        delta = lora.delta_weights(self.model, self.targets, personalized)[path]
        rank, spectrum = effective_rank(delta, self.threshold)
        common_delta = lora.delta_weights(self.model, self.targets, common)[path]
        has_common = any(k.endswith(f".{lora.COMMON}") for k in common)
        rest = delta - common_delta
        return {
            "effective_rank": rank,
            "true_rank": client.info["true_rank"],
            "rank_matched": None if rank is None else float(rank == client.info["true_rank"]),
            "common_rel_error": (float((common_delta - self.shared_delta).norm() / self.shared_delta.norm()) if has_common else None),
            "private_norm": float(rest.norm()),
            "spectrum": spectrum,
        }

    def report_notes(self) -> list[str]:
        return [
            f"Effective rank counts singular values of the learned update above {self.threshold:g} x the largest.",
            f"Noise floor of test_mse: {self.noise_floor:.4f}.",
            "common_rel_error = ||common part - true shared component||_F / ||true shared component||_F; "
            "private_norm = ||learned update - common part||_F.",
        ]
