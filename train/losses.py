"""Losses and augmentations of the backbone (SANE): L = γ·NT-Xent + (1−γ)·masked MSE.

- NT-Xent (SimCLR's normalized temperature-scaled cross entropy) between the projections of two
  augmented views of the same windows: each view must pick its partner out of the 2B−1 others.
- Masked reconstruction MSE: only real entries count (the first `n_valid` of each token and its
  tensor statistics; padded tokens have `n_valid == 0` and count nothing). Optionally normalized
  per layer (every layer of the batch weighs the same, divided by its target variance) or by the
  masked batch variance (MultiZoo-SANE), which keeps the loss scale comparable across architectures.
- Augmentations: multiplicative noise w·(1+σε) and random token masking (a masked token's input is
  zeroed; it must still be reconstructed from its neighbours).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from train.model import Batch, token_mask

LOSS_NORMS = ("none", "layer", "batch")


def nt_xent(z1: Tensor, z2: Tensor, tau: float = 0.1) -> Tensor:
    """NT-Xent of two views (B, P) each; row i of z1 and row i of z2 are the positive pair."""
    B = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # (2B, P)
    sim = z @ z.T / tau  # (2B, 2B)
    sim = sim.masked_fill(torch.eye(2 * B, dtype=torch.bool, device=z.device), float("-inf"))  # never yourself
    partner = torch.cat([torch.arange(B, 2 * B), torch.arange(0, B)]).to(z.device)
    return F.cross_entropy(sim, partner)


def masked_mse(pred: Tensor, target: Tensor, mask: Tensor, layer: Tensor | None = None, norm: str = "none") -> Tensor:
    """Mean squared error over the entries `mask` marks real. pred, target, mask (B, T, E); layer (B, T).

    norm "layer": mean over the layers present in the batch of (layer MSE / layer target variance);
    norm "batch": MSE / masked variance of the whole batch target.
    """
    n_valid = mask.sum(-1)  # (B, T) real entries per token; 0 for padded tokens
    mask = mask.to(pred.dtype)
    err = (pred.float() - target.float()) ** 2 * mask
    count = mask.sum()
    if count == 0:
        return err.sum()  # zero, but still attached to the graph
    if norm == "none":
        return err.sum() / count
    if norm == "batch":
        mu = (target * mask).sum() / count
        var = (((target - mu) * mask) ** 2).sum() / count
        return err.sum() / count / var.clamp_min(1e-6)
    if norm != "layer" or layer is None:
        raise ValueError(f"loss norm must be one of {LOSS_NORMS} (layer needs layer indices), got {norm!r}")
    real = n_valid > 0  # (B, T)
    ids, which = torch.unique(layer[real], return_inverse=True)  # which: (N,) layer slot of each real token
    m = mask[real]  # (N, S)
    t = target[real].float()
    n_l = torch.zeros(len(ids), device=pred.device).index_add_(0, which, m.sum(1))
    s_l = torch.zeros(len(ids), device=pred.device).index_add_(0, which, (t * m).sum(1))
    mu_l = s_l / n_l.clamp_min(1)
    var_l = torch.zeros(len(ids), device=pred.device).index_add_(0, which, (((t - mu_l[which, None]) * m) ** 2).sum(1))
    var_l = (var_l / n_l.clamp_min(1)).clamp_min(1e-6)
    e_l = torch.zeros(len(ids), device=pred.device).index_add_(0, which, err[real].sum(1))
    return (e_l / n_l.clamp_min(1) / var_l).mean()


def augment(batch: Batch, noise: float = 0.1, mask_prob: float = 0.0, key: str = "values") -> Batch:
    """One augmented view of `batch[key]` (the window, or its permuted twin `values2`): values w·(1+σε);
    then whole tokens marked `masked` with `mask_prob` (the encoder sees the learned mask vector instead)."""
    values, stats = batch[key], batch.get("stats")
    if noise > 0:
        values = values * (1 + noise * torch.randn_like(values))
    view = {k: v for k, v in batch.items() if k != "values2"}
    view["values"] = values
    view["masked"] = torch.zeros(values.shape[:2], dtype=torch.bool, device=values.device)
    if mask_prob > 0:
        drop = torch.rand(values.shape[:2], device=values.device) < mask_prob  # (B, T)
        view["values"] = values.masked_fill(drop[..., None], 0.0)
        if stats is not None:
            view["stats"] = stats.masked_fill(drop[..., None], 0.0)
        view["masked"] = drop
    return view


@dataclass(frozen=True)
class LossConfig:
    gamma: float = 0.05  # weight of NT-Xent; 1 − γ weighs the reconstruction
    tau: float = 0.1
    noise: float = 0.1
    mask_prob: float = 0.1
    norm: str = "none"
    stats_weight: float = 1.0  # weight of the statistics rows in the reconstruction, next to the values' 1
    behaviour: float = 0.0  # weight of the behavioural loss (train.behaviour); 0 turns it off
    behaviour_head: float = 1.0  # weight of the behaviour head's loss, where the backbone has one


def backbone_loss(model: nn.Module, batch: Batch, cfg: LossConfig, behaviour=None,
                  zeros: bool = False) -> dict[str, Tensor]:
    """Total, reconstruction, contrastive (and, with `behaviour` and a weight > 0, behavioural) loss of one
    batch of windows: γ·NT-Xent + (1 − γ)·(MSE + stats_weight·stats MSE + behaviour·behavioural); with `zeros`
    (validation), also `zeros_mse`, the MSE of predicting zeros on the same entries (not on the training path).

    Both views go through the model in one forward call of batch 2B (DDP wants one forward per
    backward); each view is asked to reconstruct the clean window.
    """
    B = batch["values"].shape[0]
    second = "values2" if "values2" in batch else "values"
    v1, v2 = augment(batch, cfg.noise, cfg.mask_prob), augment(batch, cfg.noise, cfg.mask_prob, second)
    both = {key: torch.cat([v1[key], v2[key]]) for key in v1}
    recon, _, proj, predicted = model(both)  # (2B, T, S+F), _, (2B, P), (2B, Q, C) or None
    core = model.module if hasattr(model, "module") else model  # DDP wraps the backbone
    clean = {**batch, "values": torch.cat([batch["values"], batch[second]]), "stats": torch.cat([batch["stats"]] * 2),
             "n_valid": both["n_valid"]}
    target = core.inputs(clean)  # (2B, T, S+F): each view rebuilds its own clean window
    S = core.cfg.token_size
    mask = token_mask(both["n_valid"], S, core.cfg.n_stats)
    mse = masked_mse(recon[..., :S], target[..., :S], mask[..., :S], both["l"], cfg.norm)
    stats_mse = masked_mse(recon[..., S:], target[..., S:], mask[..., S:]) if core.cfg.n_stats else mse * 0
    ntx = nt_xent(proj[:B], proj[B:], cfg.tau)
    rec = mse + cfg.stats_weight * stats_mse
    out = {"mse": mse, "stats_mse": stats_mse, "ntx": ntx}
    if zeros:
        with torch.no_grad():  # what predicting zeros (the mean, in normalized space) scores: the scale of `mse`
            out["zeros_mse"] = masked_mse(torch.zeros_like(target[..., :S]), target[..., :S], mask[..., :S],
                                          both["l"], cfg.norm)
    if predicted is not None and behaviour is None:
        raise ValueError("a backbone with a behaviour head needs the behaviour of its windows (train.behaviour)")
    rebuild = behaviour is not None and cfg.behaviour > 0
    if rebuild or predicted is not None:
        out.update(behaviour.losses(target[..., :S], both, recon[..., :S] if rebuild else None, predicted, twins=True))
        rec = rec + cfg.behaviour * out.get("behaviour", 0.0) + cfg.behaviour_head * out.get("behaviour_head", 0.0)
    return {"loss": cfg.gamma * ntx + (1 - cfg.gamma) * rec, **out}
