"""Step-3.5 in PyTorch, for training the miniature model on the CPU.

Every semantic follows ../shared/docs/step35-model.md and tests/reference_model.py, so a
checkpoint exported from here runs unchanged in llama.cpp and in our runtime: zero-centred
RMSNorm (x * (1 + w)), per-head q/k norm, NeoX partial RoPE (half the dims on full layers,
all on sliding ones), a sliding-window mask, the head-wise sigmoid gate, a sigmoid router
whose bias only chooses, normalised weights x 3.0, a shared expert, SwiGLU clamps, and 3
MTP blocks. Parameter names are the Hugging Face checkpoint's.

Shape legend: B batch, T tokens, H hidden, V vocab, D head dim, Nh query heads,
Nk KV groups, E experts, K experts per token, N = B*T flattened tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from convert.hf_config import HFConfig


class ZeroCentredRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight)


def rope(x, pos, n_rot: int, theta: float):
    """x [B, T, N, D]: NeoX rotation of pairs (j, j + R/2) within the first R dims."""
    half = n_rot // 2
    inv = theta ** (-torch.arange(half, dtype=torch.float64) * 2.0 / n_rot)
    ang = (pos[:, None].double() * inv[None, :]).float()  # [T, R/2]
    cos, sin = ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]
    a, b, rest = x[..., :half], x[..., half:n_rot], x[..., n_rot:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin, rest], dim=-1)


def swiglu(x, gate, up, down, limit: float):
    g = F.silu(F.linear(x, gate))
    u = F.linear(x, up)
    if limit > 1e-6:
        g = torch.clamp(g, max=limit)
        u = torch.clamp(u, -limit, limit)
    return F.linear(g * u, down)


class Attention(nn.Module):
    def __init__(self, cfg: HFConfig, i: int):
        super().__init__()
        H, D = cfg.hidden_size, cfg.head_dim
        self.nh, self.nk, self.D = cfg.n_head[i], cfg.n_head_kv[i], D
        self.q_proj = nn.Linear(H, self.nh * D, bias=False)
        self.k_proj = nn.Linear(H, self.nk * D, bias=False)
        self.v_proj = nn.Linear(H, self.nk * D, bias=False)
        self.o_proj = nn.Linear(self.nh * D, H, bias=False)
        self.g_proj = nn.Linear(H, self.nh, bias=False)
        self.q_norm = ZeroCentredRMSNorm(D, cfg.rms_norm_eps)
        self.k_norm = ZeroCentredRMSNorm(D, cfg.rms_norm_eps)
        sliding = cfg.sliding[i]
        self.n_rot = D if sliding else D // 2
        self.theta = cfg.rope_theta_sliding if sliding else cfg.rope_theta_full
        self.window = cfg.sliding_window if sliding else None

    def forward(self, x):  # x [B, T, H] (normed)
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.nh, self.D))
        k = self.k_norm(self.k_proj(x).view(B, T, self.nk, self.D))
        v = self.v_proj(x).view(B, T, self.nk, self.D)
        pos = torch.arange(T)
        q, k = rope(q, pos, self.n_rot, self.theta), rope(k, pos, self.n_rot, self.theta)
        rep = self.nh // self.nk
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
        mask = pos[None, :] <= pos[:, None]
        if self.window is not None:
            mask &= pos[None, :] > pos[:, None] - self.window
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        out = out.transpose(1, 2) * torch.sigmoid(self.g_proj(x))[..., None]  # [B, T, Nh, D]
        return self.o_proj(out.reshape(B, T, self.nh * self.D))


class MLP(nn.Module):
    def __init__(self, H: int, F_: int, limit: float):
        super().__init__()
        self.gate_proj = nn.Linear(H, F_, bias=False)
        self.up_proj = nn.Linear(H, F_, bias=False)
        self.down_proj = nn.Linear(F_, H, bias=False)
        self.limit = limit

    def forward(self, x):
        return swiglu(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight, self.limit)


class MoE(nn.Module):
    def __init__(self, cfg: HFConfig, i: int):
        super().__init__()
        H, E, I = cfg.hidden_size, cfg.n_expert, cfg.expert_ffn
        self.k, self.scale, self.limit = cfg.n_expert_used, cfg.router_scale, cfg.swiglu_limit[i]
        self.gate = nn.Linear(H, E, bias=False)
        self.register_buffer("router_bias", torch.zeros(E))
        self.gate_proj = nn.Parameter(torch.empty(E, I, H))
        self.up_proj = nn.Parameter(torch.empty(E, I, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, I))
        self.load = torch.zeros(E)  # tokens per expert in the last forward, for bias balancing

    def forward(self, x):  # x [N, H]
        s = torch.sigmoid(self.gate(x))  # [N, E]
        chosen = torch.topk(s.detach() + self.router_bias, self.k, dim=-1).indices  # [N, K]
        w = torch.gather(s, 1, chosen)
        w = w / w.sum(-1, keepdim=True).clamp_min(6.103515625e-5) * self.scale
        out = torch.zeros_like(x)
        self.load = torch.bincount(chosen.flatten(), minlength=s.shape[1]).float()
        for e in range(s.shape[1]):
            tok, slot = (chosen == e).nonzero(as_tuple=True)
            if tok.numel():
                y = swiglu(x[tok], self.gate_proj[e], self.up_proj[e], self.down_proj[e], self.limit)
                out.index_add_(0, tok, y * w[tok, slot, None])
        return out


class Block(nn.Module):
    def __init__(self, cfg: HFConfig, i: int):
        super().__init__()
        H = cfg.hidden_size
        self.input_layernorm = ZeroCentredRMSNorm(H, cfg.rms_norm_eps)
        self.post_attention_layernorm = ZeroCentredRMSNorm(H, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, i)
        self.is_moe = cfg.is_moe(i)
        if self.is_moe:
            self.moe = MoE(cfg, i)
            self.share_expert = MLP(H, cfg.shared_ffn, cfg.swiglu_limit_shared[i])
        else:
            self.mlp = MLP(H, cfg.intermediate_size, cfg.swiglu_limit_shared[i])

    def forward(self, h):  # h [B, T, H]
        h = h + self.self_attn(self.input_layernorm(h))
        x = self.post_attention_layernorm(h)
        if self.is_moe:
            B, T, H = x.shape
            f = self.moe(x.reshape(B * T, H)).view(B, T, H) + self.share_expert(x)
        else:
            f = self.mlp(x)
        return h + f


class MTPBlock(Block):
    def __init__(self, cfg: HFConfig, i: int):
        super().__init__(cfg, i)
        H = cfg.hidden_size
        self.enorm = ZeroCentredRMSNorm(H, cfg.rms_norm_eps)
        self.hnorm = ZeroCentredRMSNorm(H, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * H, H, bias=False)
        self.shared_head_norm = ZeroCentredRMSNorm(H, cfg.rms_norm_eps)
        self.shared_head_output = nn.Linear(H, cfg.vocab_size, bias=False)

    def step(self, emb, h, every: int = 1, offset: int = 0):
        """emb: embeddings of the tokens one ahead of h's; (hidden, logits of positions offset::every)."""
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h)], dim=-1))
        out = self.forward(x)
        return out, self.shared_head_output(self.shared_head_norm(out[:, offset::every]))


class Step35(nn.Module):
    def __init__(self, cfg: HFConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.mtp = nn.ModuleList(MTPBlock(cfg, cfg.n_layers + j) for j in range(cfg.n_mtp))
        self.norm = ZeroCentredRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.zero_()
            elif name.startswith("embed_tokens"):
                p.normal_(0.0, 1.0)
            else:
                fan_in = p.shape[-1]
                p.normal_(0.0, 1.0 / math.sqrt(fan_in))
                if name.endswith(("o_proj.weight", "down_proj.weight", "down_proj")):
                    p.mul_(1.0 / math.sqrt(2 * len(self.layers)))

    def forward(self, tokens, mtp_every: int = 1, mtp_offset: int = 0):
        """tokens [B, T] -> (trunk logits [B, T, V], MTP logits list, entry j [B, T-1-j, V]).

        With mtp_every > 1 the MTP heads score only positions mtp_offset::mtp_every (the
        blocks still run on every position): a cheaper training signal for the heads.
        """
        h = self.embed_tokens(tokens)
        for layer in self.layers:
            h = layer(h)
        logits = self.lm_head(self.norm(h))
        drafts = []
        for j, blk in enumerate(self.mtp):
            n = tokens.shape[1] - 1 - j
            h, lg = blk.step(self.embed_tokens(tokens[:, 1 + j : 1 + j + n]), h[:, :n], mtp_every, mtp_offset)
            drafts.append(lg)
        return logits, drafts

    def hf_state(self) -> dict[str, torch.Tensor]:
        """Parameters under their Hugging Face checkpoint names."""
        out = {"model.embed_tokens.weight": self.embed_tokens.weight, "model.norm.weight": self.norm.weight,
               "lm_head.weight": self.lm_head.weight}
        for i, layer in enumerate(list(self.layers) + list(self.mtp)):
            for name, t in list(layer.named_parameters()) + [(n, b) for n, b in layer.named_buffers() if n.endswith("router_bias")]:
                name = name.replace("shared_head_norm.", "transformer.shared_head.norm.")
                name = name.replace("shared_head_output.", "transformer.shared_head.output.")
                if name in ("moe.gate_proj", "moe.up_proj", "moe.down_proj"):
                    name += ".weight"
                out[f"model.layers.{i}.{name}"] = t
        return out
