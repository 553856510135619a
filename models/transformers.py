"""Transformer blocks whose training-time form hides linear structure around MatMul/Gemm.

Each takes an image-like input [B, C, H, W] and works on its H·W tokens [B, N, C] (channels on the
LAST axis), as a patch-embedded ViT stage does:

- ``LeViTBlock`` (Graham et al., LeViT, ICCV 2021): every Linear is followed by BatchNorm1d applied
  to the tokens flattened to [B·N, C] (``Linear_BN``); attention (q, k, v projections, Hardswish,
  projection) and an MLP, both residual. Deploy: every BN folds into its Linear (LeViT's own
  ``Linear_BN.fuse``); the flatten/reshape pair that only served the BN disappears.
- ``ViTLayerScaleBlock`` (CaiT / DeiT-III, Touvron et al. 2021, 2022): pre-norm attention and MLP
  branches, each scaled per channel by a learned ``layer_scale`` before its residual Add. Deploy:
  the scale folds into the projection / second MLP Linear (weight columns and bias).
- ``ConvNeXtBlock`` (Liu et al., ConvNeXt, CVPR 2022): depthwise 7×7, channels-last LayerNorm,
  Linear(4C) → GELU → Linear(C), per-channel gamma, residual. Deploy: gamma folds into the second
  Linear. (ConvNeXt's own code has no deploy conversion.)
- ``LoRAMergedAttention``: the fused qkv Linear as loralib's ``MergedLinear`` computes it unmerged:
  one A for the adapted groups (q and v), B as a grouped 1-wide conv1d, the adapter output
  zero-padded to 3C by index assignment and added to the qkv output.
- ``MixerBlock`` (Tolstikhin et al., MLP-Mixer, NeurIPS 2021): a token-mixing MLP written with
  the constant on the LEFT (``W_tok · X``, biases per token), its second Linear followed by
  BatchNorm1d over the tokens it makes (LeViT's Linear_BN, on the token axis), then a channel MLP;
  layer scale on both residual branches. Deploy: the BN folds into the token Linear's rows, the
  channel branch's layer scale into its second Linear; the token branch's per-channel layer scale
  stays (it scales the columns of a matrix whose rows are mixed: no Linear to take it).
- ``LoRAMLP`` / ``LoRAAttention`` (Hu et al., LoRA, ICLR 2022): Linears with an unmerged low-rank
  adapter ``x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ`` (rank 4 and 8, scale s = alpha / r); the attention adapts q
  and v. Deploy: the adapter merges into its base (loralib's ``merge``): as many MatMul/Gemm as
  the same model without adapters.

- ``LoRAInplaceAttention``: a fused qkv Linear whose output gets its q and v adapters added IN
  PLACE before the split (``r[..., :C] += s·B_q(A_q(x))``; ``cat=True``: the out-of-place
  ``r + cat([y_q, zeros, y_v], -1)``). Deploy: ``switch_to_deploy`` merges each adapter into its
  rows of the qkv weight.

In ``LoRAAttention`` q, k and v are separate Linears (LeViT and ViT fuse them into one qkv Linear
and split; the split is written differently by each exporter, which would make the deploy
histograms differ); the ``LoRAQKV``/``Merged``/``Inplace`` variants fuse them. LayerNorm is
nn.LayerNorm, exported as one LayerNormalization op, and GELU stays whole: neither is a fold target.
"""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["LinearBN", "LeViTBlock", "LayerScale", "ViTLayerScaleBlock", "ConvNeXtBlock",
           "LoRALinear", "LoRAMLP", "LoRAAttention", "LoRAQKVAttention", "MergedLoRALinear",
           "LoRAMergedAttention", "LoRAInplaceAttention", "MixerBlock", "to_tokens"]


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] → [B, H·W, C], as a patch embedding hands tokens to a transformer stage."""
    return x.flatten(2).transpose(1, 2)


# -- LeViT -----------------------------------------------------------------------------------------
class LinearBN(nn.Module):
    """LeViT's Linear_BN: Linear without bias, then BatchNorm1d over the tokens flattened to [B·N, C]."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.linear = nn.Linear(cin, cout, bias=False)
        self.bn = nn.BatchNorm1d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)

    @torch.no_grad()
    def fuse(self) -> nn.Linear:
        """LeViT's hand-written deploy conversion: the BN scales the Linear's rows and adds a bias."""
        bn = self.bn
        w = bn.weight / (bn.running_var + bn.eps) ** 0.5
        fused = nn.Linear(self.linear.in_features, self.linear.out_features)
        fused.weight.copy_(self.linear.weight * w[:, None])
        fused.bias.copy_(bn.bias - bn.running_mean * w)
        return fused


class _Attention(nn.Module):
    """Multi-head self-attention over separate q, k, v projections; `proj` maps heads back to C."""

    def __init__(self, q, k, v, proj, heads: int, key_dim: int, act: nn.Module | None = None):
        super().__init__()
        self.q, self.k, self.v, self.proj = q, k, v, proj
        self.heads, self.key_dim = heads, key_dim
        self.scale = key_dim ** -0.5
        self.act = act if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q(x).reshape(b, n, self.heads, -1).transpose(1, 2)
        k = self.k(x).reshape(b, n, self.heads, -1).transpose(1, 2)
        v = self.v(x).reshape(b, n, self.heads, -1).transpose(1, 2)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        y = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, -1)
        return self.proj(self.act(y))


class LeViTBlock(nn.Module):
    """LeViT stage block on tokens: x + Attention(x), then x + MLP(x); every Linear is a LinearBN."""

    def __init__(self, dim: int = 16, heads: int = 2, key_dim: int = 8, mlp_ratio: int = 2):
        super().__init__()
        dv = key_dim
        self.attn = _Attention(LinearBN(dim, heads * key_dim), LinearBN(dim, heads * key_dim),
                               LinearBN(dim, heads * dv), LinearBN(heads * dv, dim), heads, key_dim,
                               act=nn.Hardswish())
        self.mlp = nn.Sequential(LinearBN(dim, dim * mlp_ratio), nn.Hardswish(), LinearBN(dim * mlp_ratio, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = to_tokens(x)
        x = x + self.attn(x)
        return x + self.mlp(x)

    @torch.no_grad()
    def switch_to_deploy(self) -> None:
        """Replace every LinearBN by its fused Linear (LeViT's own conversion)."""
        for parent in [self.attn, self.mlp]:
            for name, child in list(parent.named_children()):
                if isinstance(child, LinearBN):
                    setattr(parent, name, child.fuse())


# -- layer scale -----------------------------------------------------------------------------------
class LayerScale(nn.Module):
    """y = layer_scale ⊙ x per channel (CaiT's gamma_1 / gamma_2, timm's LayerScale)."""

    def __init__(self, dim: int, init_values: float = 1e-5):
        super().__init__()
        self.layer_scale = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.layer_scale


class ViTLayerScaleBlock(nn.Module):
    """Pre-norm ViT block with layer scale on both residual branches (CaiT, DeiT-III)."""

    def __init__(self, dim: int = 16, heads: int = 2, mlp_ratio: int = 2):
        super().__init__()
        hd = dim // heads
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _Attention(nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim),
                               nn.Linear(dim, dim), heads, hd)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * mlp_ratio), nn.GELU(), nn.Linear(dim * mlp_ratio, dim))
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = to_tokens(x)
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class ConvNeXtBlock(nn.Module):
    """ConvNeXt block: dw 7×7 → permute to channels-last → LayerNorm → Linear(4C) → GELU →
    Linear(C) → gamma → permute back → residual."""

    def __init__(self, dim: int = 16, mlp_ratio: int = 4):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, mlp_ratio * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(mlp_ratio * dim, dim)
        self.layer_scale = nn.Parameter(1e-6 * torch.ones(dim))  # ConvNeXt's gamma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + (self.layer_scale * y).permute(0, 3, 1, 2)


# -- LoRA ------------------------------------------------------------------------------------------
class LoRALinear(nn.Module):
    """Linear with an unmerged low-rank adapter: x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ, s = alpha / rank.

    B is drawn non-zero (as after fine-tuning; LoRA initializes it to 0, which would hide a wrong
    merge)."""

    def __init__(self, cin: int, cout: int, rank: int, alpha: float | None = None):
        super().__init__()
        self.base = nn.Linear(cin, cout)
        self.lora_a = nn.Linear(cin, rank, bias=False)
        self.lora_b = nn.Linear(rank, cout, bias=False)
        nn.init.normal_(self.lora_b.weight, std=1.0 / math.sqrt(rank))
        self.scaling = (alpha if alpha is not None else 2.0 * rank) / rank
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        return y + self.lora_b(self.lora_a(x)) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """loralib's deploy conversion: W += s·B·A, then the adapter is skipped."""
        if not self.merged:
            self.base.weight += self.scaling * (self.lora_b.weight @ self.lora_a.weight)
            self.merged = True


class LoRAMLP(nn.Module):
    """Transformer MLP with LoRA on both Linears (rank 4 on fc1, rank 8 on fc2), GELU between."""

    def __init__(self, dim: int = 16, hidden: int = 32, ranks: tuple[int, int] = (4, 8)):
        super().__init__()
        self.fc1 = LoRALinear(dim, hidden, ranks[0], alpha=8.0)
        self.act = nn.GELU()
        self.fc2 = LoRALinear(hidden, dim, ranks[1], alpha=4.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(to_tokens(x))))

    def merge(self) -> None:
        self.fc1.merge()
        self.fc2.merge()


class LoRAAttention(nn.Module):
    """Self-attention with LoRA on q (rank 4) and v (rank 8), as LoRA's paper adapts W_q and W_v."""

    def __init__(self, dim: int = 16, heads: int = 2, ranks: tuple[int, int] = (4, 8)):
        super().__init__()
        self.attn = _Attention(LoRALinear(dim, dim, ranks[0], alpha=4.0), nn.Linear(dim, dim),
                               LoRALinear(dim, dim, ranks[1], alpha=16.0), nn.Linear(dim, dim), heads, dim // heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(to_tokens(x))

    def merge(self) -> None:
        self.attn.q.merge()
        self.attn.v.merge()


def fused_qkv_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, b, n, dim: int
                        ) -> torch.Tensor:
    """softmax(q·kᵀ/√d)·v over `heads` heads of [b, n, dim] q, k, v (the slices of a fused qkv
    Linear), heads merged back to [b, n, dim]. b and n are the token tensor's sizes as the caller
    read them (so the exporters write the same shape arithmetic as before), dim a Python int."""
    q, k, v = (t.reshape(b, n, heads, -1).transpose(1, 2) for t in (q, k, v))
    attn = (q @ k.transpose(-2, -1)) * (dim // heads) ** -0.5
    return (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, -1)


class LoRAQKVAttention(nn.Module):
    """Self-attention with one fused qkv Linear (ViT's) and LoRA adapters on its q and v slices
    (rank 4 and 8), added after the split: q = qkv[..., :C] + s·B_q(A_q(x)), v likewise."""

    def __init__(self, dim: int = 16, heads: int = 2, ranks: tuple[int, int] = (4, 8)):
        super().__init__()
        self.dim, self.heads = dim, heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.lora_q = nn.Sequential(nn.Linear(dim, ranks[0], bias=False), nn.Linear(ranks[0], dim, bias=False))
        self.lora_v = nn.Sequential(nn.Linear(dim, ranks[1], bias=False), nn.Linear(ranks[1], dim, bias=False))
        for r, m in zip(ranks, (self.lora_q, self.lora_v)):
            nn.init.normal_(m[1].weight, std=1.0 / math.sqrt(r))
        self.scaling = (2.0, 0.5)
        self.proj = nn.Linear(dim, dim)
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = to_tokens(x)
        b, n, _ = x.shape
        q, k, v = self.qkv(x).split(self.dim, dim=-1)
        if not self.merged:
            q = q + self.lora_q(x) * self.scaling[0]
            v = v + self.lora_v(x) * self.scaling[1]
        return self.proj(fused_qkv_attention(q, k, v, self.heads, b, n, self.dim))

    @torch.no_grad()
    def merge(self) -> None:
        """loralib's MergedLinear merge: each adapter into its columns of the qkv weight."""
        if self.merged:
            return
        c = self.dim
        for i, (m, s) in zip((0, 2), ((self.lora_q, self.scaling[0]), (self.lora_v, self.scaling[1]))):
            self.qkv.weight[i * c:(i + 1) * c] += s * (m[1].weight @ m[0].weight)
        self.merged = True


class MergedLoRALinear(nn.Module):
    """A fused Linear(cin, groups·cg) with LoRA on some of its output groups, computed the way
    loralib's MergedLinear does before merging:

        a = x·Aᵀ                         A [r·k, cin], k = number of adapted groups
        b = conv1d(a, B, groups=k)       B [cg·k, r]: group i maps its r rows to its cg columns
        z = zeros(..., groups·cg); z[..., adapted columns] = b   (zero padding by index assignment)
        y = x·Wᵀ + bias + s·z

    The adapted columns are kept as integer positions (loralib keeps a boolean mask; assigning
    through a mask on the last axis does not export with torch's dynamo exporter). B is drawn
    non-zero, as after fine-tuning."""

    def __init__(self, cin: int, cg: int, enable=(True, False, True), rank: int = 4, alpha: float = 8.0):
        super().__init__()
        self.cg, self.groups, self.k = cg, len(enable), sum(enable)
        self.base = nn.Linear(cin, cg * len(enable))
        self.lora_a = nn.Parameter(torch.randn(rank * self.k, cin) / math.sqrt(cin))
        self.lora_b = nn.Parameter(torch.randn(cg * self.k, rank) / math.sqrt(rank))
        self.scaling = alpha / rank
        cols = [g * cg + j for g, e in enumerate(enable) if e for j in range(cg)]
        self.register_buffer("cols", torch.tensor(cols, dtype=torch.long), persistent=False)
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        a = torch.nn.functional.linear(x, self.lora_a)
        b = torch.nn.functional.conv1d(a.transpose(-2, -1), self.lora_b.unsqueeze(-1), groups=self.k)
        b = b.transpose(-2, -1)
        width = self.cg * self.groups
        z = b.new_zeros((*b.shape[:-1], width)).view(-1, width)
        z[:, self.cols] = b.reshape(-1, self.cg * self.k)
        return y + z.view((*b.shape[:-1], width)) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """The deploy conversion (loralib's merge): group i's rows of W grow by s·B_i·A_i."""
        if self.merged:
            return
        r = self.lora_a.shape[0] // self.k
        delta = torch.cat([self.lora_b[i * self.cg:(i + 1) * self.cg] @ self.lora_a[i * r:(i + 1) * r]
                           for i in range(self.k)])
        self.base.weight[self.cols] += self.scaling * delta
        self.merged = True


class LoRAMergedAttention(nn.Module):
    """Self-attention whose fused qkv Linear is a MergedLoRALinear adapting q and v (rank 4)."""

    def __init__(self, dim: int = 16, heads: int = 2, rank: int = 4):
        super().__init__()
        self.dim, self.heads = dim, heads
        self.qkv = MergedLoRALinear(dim, dim, (True, False, True), rank, alpha=8.0)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = to_tokens(x)
        b, n, _ = x.shape
        q, k, v = self.qkv(x).split(self.dim, dim=-1)
        return self.proj(fused_qkv_attention(q, k, v, self.heads, b, n, self.dim))

    def merge(self) -> None:
        self.qkv.merge()


class MixerBlock(nn.Module):
    """MLP-Mixer block on tokens [B, N, C] with the token-mixing Linears written as W·X."""

    def __init__(self, dim: int = 16, tokens: int = 16, token_hidden: int = 32, channel_hidden: int = 32):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.tok_w1 = nn.Parameter(torch.randn(token_hidden, tokens) / math.sqrt(tokens))
        self.tok_b1 = nn.Parameter(0.1 * torch.randn(token_hidden, 1))
        self.tok_w2 = nn.Parameter(torch.randn(tokens, token_hidden) / math.sqrt(token_hidden))
        self.tok_b2 = nn.Parameter(0.1 * torch.randn(tokens, 1))
        self.tok_bn = nn.BatchNorm1d(tokens)  # on [B, N, C]: axis 1 is the token Linear's output
        self.ls1 = LayerScale(dim, 0.1)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, channel_hidden), nn.GELU(), nn.Linear(channel_hidden, dim))
        self.ls2 = LayerScale(dim, 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = to_tokens(x)
        h = nn.functional.gelu(self.tok_w1 @ self.norm1(x) + self.tok_b1)
        x = x + self.ls1(self.tok_bn(self.tok_w2 @ h + self.tok_b2))
        return x + self.ls2(self.mlp(self.norm2(x)))

    @torch.no_grad()
    def switch_to_deploy(self) -> None:
        """The hand-written conversion: the token BN scales W_tok2's rows (and its bias), the channel
        branch's layer scale scales fc2's rows; the token branch's layer scale stays."""
        bn = self.tok_bn
        if isinstance(bn, nn.Identity):
            return
        s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        self.tok_w2.copy_(s[:, None] * self.tok_w2)
        self.tok_b2.copy_(s[:, None] * self.tok_b2 + (bn.bias - bn.running_mean * s)[:, None])
        self.tok_bn = nn.Identity()
        fc2, g = self.mlp[2], self.ls2.layer_scale
        fc2.weight.copy_(g[:, None] * fc2.weight)
        fc2.bias.copy_(g * fc2.bias)
        self.ls2 = nn.Identity()


class LoRAInplaceAttention(LoRAQKVAttention):
    """Self-attention whose fused qkv Linear gets its q and v adapters (rank 4 and 8) written IN
    PLACE into its output before the split: ``r = qkv(x); r[..., :C] += s·B_q(A_q(x));
    r[..., 2C:] += s·B_v(A_v(x))``. The exporters write each ``+=`` as a Slice of r, an Add of the
    branch and a ScatterND (legacy) or slice_scatter (dynamo) of the sum back into r. With
    ``cat=True`` the same sum is written out of place, ``r + cat([y_q, zeros, y_v], -1)``. The layers
    and the deploy merge (into the qkv weight's rows) are LoRAQKVAttention's."""

    def __init__(self, dim: int = 16, heads: int = 2, ranks: tuple[int, int] = (4, 8), cat: bool = False):
        super().__init__(dim, heads, ranks)
        self.cat = cat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = to_tokens(x)
        b, n, _ = x.shape
        c = self.dim
        r = self.qkv(x)
        if not self.merged and self.cat:  # the out-of-place spelling: r + cat([y_q, 0, y_v], -1)
            yq, yv = self.lora_q(x) * self.scaling[0], self.lora_v(x) * self.scaling[1]
            r = r + torch.cat([yq, torch.zeros_like(yq), yv], dim=-1)
        elif not self.merged:
            r[..., :c] += self.lora_q(x) * self.scaling[0]
            r[..., 2 * c:] += self.lora_v(x) * self.scaling[1]
        q, k, v = r.split(c, dim=-1)
        return self.proj(fused_qkv_attention(q, k, v, self.heads, b, n, self.dim))

    def switch_to_deploy(self) -> None:
        """The hand-written deploy: LoRAQKVAttention's merge of each adapter into the qkv rows."""
        self.merge()
