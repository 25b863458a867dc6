"""The backbone: a transformer autoencoder over windows of weight tokens (SANE-style), in one file.

A window holds `window` consecutive tokens of one model. Each token is `token_size` weights,
standardized with their tensor's mean and std, plus that tensor's statistics themselves (`n_stats`
numbers: asinh of the mean, log of the std — standardizing alone would hide the scale of a model's
weights, which is what tells a diverged or untrained model from a good one), and where it sits:
n (its index in the model's token sequence), l (layer index), k (row index within the tensor) and
the tensor's role (conv, linear, attention q, norm, ...). The decoder reconstructs values and
statistics, so the latent has to keep both.

    [values | stats] (B, T, S+F) ──linear──► (B, T, D) + sin(n) | sin(l) | sin(k) + role ─► encoder ─► latent (B, T, L)
    latent ──linear──► (B, T, D) + positions + role ─► decoder ─► reconstruction (B, T, S+F)
    masked mean of latent over the window ─► projection head ─► (B, P)   (contrastive loss)

Positions are parameter-free sinusoids (the Hub paper's choice: learned tables cannot handle
sequence lengths never seen in training); n, l and k each get their own slice of the model width,
so they never alias. The role is a learned embedding. A model's embedding is the mean of its
token latents (`embed`). Padding — entries of a token beyond `n_valid`, and tokens with
`n_valid == 0` that fill a window past the end of a model — never reaches the latent: padded
entries are zeroed at the input and padded tokens are masked out of attention and of every mean.

No distributed or Ray code lives here: see train/fit.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from catalog.roles import ROLES

Batch = dict[str, Tensor]
"""A batch of windows: `values` (B, T, S) and `stats` (B, T, F) float; `n_valid`, `n`, `l`, `k`, `role` (B, T) integer."""


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the backbone. `token_size` 0 means "take it from the catalog" (resolved at fit time)."""

    token_size: int = 0  # S: values per token; must equal the catalog's token size
    d_model: int = 1024  # D: transformer width (SANE's CNN zoos: 1024)
    n_layers: int = 4  # transformer blocks in the encoder, and again in the decoder
    n_heads: int = 8
    d_latent: int = 128  # L: latent per token
    # T: tokens per window (SANE's CNN zoos: 32-64). A model is rebuilt and run — behavioural loss, behaviour head,
    # accuracy kept, sampling — only from a window that holds it whole: the digits CNNs have 54 tokens
    window: int = 64
    dropout: float = 0.1
    n_roles: int = len(ROLES)
    proj_dim: int = 64  # P: output of the projection head (contrastive loss)
    mlp_ratio: int = 4
    n_stats: int = 13  # F: the tensor statistics row appended to each token (train.normalize.STAT_NAMES; 0: values only)
    pool_layers: int = 8  # K: layer groups pooled for the behaviour head (layers past K − 1 share the last group)
    behaviour_queries: int = 0  # Q: query images the behaviour head's target fingerprint is taken on (0: no head)
    behaviour_classes: int = 10  # C: outputs per query image (the fingerprint: 4 summaries + C class probabilities)

    def __post_init__(self) -> None:
        checks = [
            (self.token_size >= 0, "token_size must be >= 0 (0: the catalog's)"),
            (self.d_model >= 8 and self.d_model % 8 == 0, "d_model must be a positive multiple of 8"),
            (self.n_layers >= 1, "n_layers must be >= 1"),
            (self.n_heads >= 1 and self.d_model % self.n_heads == 0, "d_model must be divisible by n_heads"),
            (self.d_latent >= 1, "d_latent must be >= 1"),
            (self.window >= 1, "window must be >= 1"),
            (0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)"),
            (self.n_roles >= len(ROLES), f"n_roles must be >= {len(ROLES)} (catalog.roles.ROLES)"),
            (self.proj_dim >= 1, "proj_dim must be >= 1"),
            (self.mlp_ratio >= 1, "mlp_ratio must be >= 1"),
            (self.n_stats >= 0, "n_stats must be >= 0"),
            (self.pool_layers >= 1 and self.behaviour_queries >= 0 and self.behaviour_classes >= 1,
             "pool_layers and behaviour_classes must be >= 1, behaviour_queries >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"model: {message}")

    @classmethod
    def debug(cls, token_size: int = 0) -> ModelConfig:
        """A tiny backbone that trains in seconds on a CPU."""
        return cls(token_size=token_size, d_model=32, n_layers=1, n_heads=2, d_latent=16, window=64,
                   dropout=0.0, proj_dim=16, mlp_ratio=2)

    @classmethod
    def small(cls, token_size: int = 0) -> ModelConfig:
        """The CPU default: minutes on 2 cores for a zoo of ~1,000 small checkpoints."""
        # wider than a token plus its statistics row (73 + 11 for the digits CNNs), so the latent can keep both
        return cls(token_size=token_size, d_model=128, n_layers=2, n_heads=4, d_latent=96, window=64,
                   dropout=0.0, proj_dim=64, mlp_ratio=2, behaviour_queries=128)

    @property
    def fingerprint_dims(self) -> int:
        """Values of the fingerprint the behaviour head predicts (train.fingerprint.HEAD_SUMMARIES + C)."""
        return 4 + self.behaviour_classes

    @property
    def position_dims(self) -> tuple[int, int, int]:
        """Slices of d_model for the sinusoids of n, l and k (half, a quarter, a quarter; all even)."""
        d_n = self.d_model // 2
        d_l = self.d_model // 4
        return d_n, d_l, self.d_model - d_n - d_l


def sinusoid(pos: Tensor, dim: int, base: float = 10_000.0) -> Tensor:
    """Transformer sinusoids of integer positions: (B, T) -> (B, T, dim), dim even."""
    half = dim // 2
    freq = torch.exp(-math.log(base) * torch.arange(half, device=pos.device, dtype=torch.float32) / half)
    angle = pos.to(torch.float32)[..., None] * freq  # (B, T, half)
    return torch.cat([angle.sin(), angle.cos()], dim=-1)


def entry_mask(n_valid: Tensor, token_size: int) -> Tensor:
    """(B, T) counts of real entries -> (B, T, S) bool, True where an entry is a real weight."""
    return torch.arange(token_size, device=n_valid.device) < n_valid[..., None]


def token_mask(n_valid: Tensor, token_size: int, n_stats: int) -> Tensor:
    """(B, T) -> (B, T, S+F) bool: the real entries of each token, its statistics included (real tokens only)."""
    stats = (n_valid > 0)[..., None].expand(*n_valid.shape, n_stats)
    return torch.cat([entry_mask(n_valid, token_size), stats], dim=-1)


def masked_mean(x: Tensor, keep: Tensor) -> Tensor:
    """Mean over the tokens of each window that `keep` marks: (B, T, C), (B, T) -> (B, C)."""
    w = keep.to(x.dtype)[..., None]  # (B, T, 1)
    return (x * w).sum(1) / w.sum(1).clamp_min(1.0)


class SelfAttention(nn.Module):
    """Non-causal multi-head self-attention that never attends to padded tokens."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, keep: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # each (B, T, C)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))  # (B, H, T, hs)
        # every query may look at every real token of the window (and only at those); a window always
        # holds at least one real token, so no row of the mask is empty
        mask = keep[:, None, None, :]  # (B, 1, 1, T)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model)
        self.proj = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model)
        self.attn = SelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, keep: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x), keep)
        return x + self.mlp(self.ln_2(x))


class Stack(nn.Module):
    """Input projection + positions + role, then pre-LN blocks and a final LayerNorm and projection."""

    def __init__(self, cfg: ModelConfig, d_in: int, d_out: int, masking: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.inp = nn.Linear(d_in, cfg.d_model)
        # what a masked token's input becomes (encoder only): learned, so a masked token never looks like a
        # constant tensor
        self.mask = nn.Parameter(torch.zeros(cfg.d_model)) if masking else None
        self.role = nn.Embedding(cfg.n_roles, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layers)])
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.out = nn.Linear(cfg.d_model, d_out)

    def positions(self, n: Tensor, l: Tensor, k: Tensor) -> Tensor:  # noqa: E741 (SANE's names)
        """Sinusoids of (n, l, k), concatenated: (B, T) x3 -> (B, T, D)."""
        d_n, d_l, d_k = self.cfg.position_dims
        return torch.cat([sinusoid(n, d_n), sinusoid(l, d_l), sinusoid(k, d_k)], dim=-1)

    def forward(self, x: Tensor, batch: Batch, keep: Tensor, masked: Tensor | None = None) -> Tensor:
        h = self.inp(x)  # (B, T, D)
        if masked is not None and self.mask is not None:
            h = torch.where(masked[..., None], self.mask.to(h.dtype), h)
        h = h + self.positions(batch["n"], batch["l"], batch["k"]) + self.role(batch["role"])  # (B, T, D)
        h = self.drop(h)
        for block in self.blocks:
            h = block(h, keep)
        return self.out(self.ln_f(h))


class Backbone(nn.Module):
    """Encoder -> per-token latent -> decoder, plus a projection head for the contrastive loss."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.token_size < 1:
            raise ValueError("model: token_size is not set (take it from the catalog before building)")
        self.cfg = cfg
        self.encoder = Stack(cfg, cfg.token_size + cfg.n_stats, cfg.d_latent, masking=True)
        self.decoder = Stack(cfg, cfg.d_latent, cfg.token_size + cfg.n_stats)
        self.head = nn.Sequential(nn.Linear(cfg.d_latent, cfg.d_latent), nn.GELU(), nn.Linear(cfg.d_latent, cfg.proj_dim))
        # what the model computes — its behaviour fingerprint (train.fingerprint.head_target) — predicted from its
        # per-layer pooled latents: the embedding has to carry the function, and a model that cannot be run
        # (the wild) still gets a fingerprint from its weights
        self.behaviour_head = nn.Sequential(
            nn.Linear(cfg.pool_layers * cfg.d_latent, 2 * cfg.d_latent), nn.GELU(),
            nn.Linear(2 * cfg.d_latent, cfg.fingerprint_dims)) if cfg.behaviour_queries else None
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def inputs(self, batch: Batch) -> Tensor:
        """The tokens as the encoder sees them and the decoder rebuilds them: (B, T, S+F), padding zeroed."""
        x = batch["values"]
        if self.cfg.n_stats:
            x = torch.cat([x, batch["stats"]], dim=-1)
        return x * token_mask(batch["n_valid"], self.cfg.token_size, self.cfg.n_stats)

    def encode(self, batch: Batch) -> Tensor:
        """Token latents (B, T, L). Padded entries are zeroed here, so their content never matters; tokens
        that `batch["masked"]` marks (B, T) enter as the learned mask vector."""
        return self.encoder(self.inputs(batch), batch, batch["n_valid"] > 0, batch.get("masked"))  # (B, T, L)

    def decode(self, latent: Tensor, batch: Batch) -> Tensor:
        """Reconstructed tokens (B, T, S+F) from latents (B, T, L) at the batch's positions."""
        return self.decoder(latent, batch, batch["n_valid"] > 0)

    def project(self, latent: Tensor, keep: Tensor) -> Tensor:
        """Projection of each window's mean latent for the contrastive loss: (B, T, L) -> (B, P)."""
        return self.head(masked_mean(latent, keep))

    def pool(self, latent: Tensor, batch: Batch) -> Tensor:
        """Per-layer means of each window's real token latents, concatenated: (B, T, L) -> (B, K·L)."""
        B, T, L = latent.shape
        K = self.cfg.pool_layers
        group = batch["l"].clamp(0, K - 1)  # (B, T)
        w = ((batch["n_valid"] > 0)[..., None] & (group[..., None] == torch.arange(K, device=latent.device)))
        w = w.to(latent.dtype)  # (B, T, K)
        sums = torch.einsum("btk,btl->bkl", w, latent)  # (B, K, L)
        return (sums / w.sum(1)[..., None].clamp_min(1.0)).reshape(B, K * L)

    def forward(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """(reconstruction (B, T, S+F), latent (B, T, L), projection (B, P), predicted fingerprint (B, 4 + C) or None)."""
        latent = self.encode(batch)
        outputs = None
        if self.behaviour_head is not None:
            outputs = self.behaviour_head(self.pool(latent, batch))
        return self.decode(latent, batch), latent, self.project(latent, batch["n_valid"] > 0), outputs

    @torch.no_grad()
    def embed(self, batch: Batch) -> Tensor:
        """Each window's embedding: the mean of its real tokens' latents, (B, L)."""
        return masked_mean(self.encode(batch), batch["n_valid"] > 0)
