"""DeepSeek-V2 in plain PyTorch: MLA attention over a latent cache, DeepSeekMoE, YaRN rope.

Modules carry the Hugging Face names (model.layers.N.self_attn.q_proj, mlp.experts, lm_head, ...), so a checkpoint
tensor's name is its parameter's name; only routed experts differ: they are stacked, and
`model.layers.N.mlp.experts.E.gate_proj.weight` is slot E of `...mlp.experts.gate_proj.weight`. Every weight matmul goes
through dsq.layers.Linear, built in the format the checkpoint declares for it (`Build`). Modules are built with this
rank's shapes (`Dist.shard`, dsq/parallel.py): its heads, intermediate columns, experts and vocab rows; a Block sums the
ranks' partial outputs with `Dist.all_reduce`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from dsq.cache import PAGE_SIZE, Attention, LatentCache
from dsq.config import Config
from dsq.formats import FP8Channel, Scheme
from dsq.layers import Build, Embedding, RMSNorm, fp8_input, join, project, swiglu
from dsq.parallel import Dist
from dsq.quant import BLOCK
from dsq.rope import apply_rope, naive_qk_ref, rope_angles, rope_frequencies


class MLA(nn.Module):
    """Multi-head latent attention. Naive path (prefill chunks): expand K/V per head from the latent.
    Absorbed path (decodes): fold W_UK into the query and W_UV after attention, attending the latent cache
    (DeepSeek-V2 paper, section 2.1.2). On the Triton backend with an FP8 kv_b the kernels of kernels/mla_absorb.py
    read kv_b as stored (rope of q_pe included); otherwise W_UK [H, P, C] and W_UV [H, V, C], kv_b's rows per
    head, are laid out once in the model dtype by `prepare` after loading, so a decode step dequantizes nothing."""

    def __init__(self, cfg: Config, build: Build, dist: Dist, name: str):
        super().__init__()
        d, dtype = cfg.hidden_size, build.dtype
        self.n_heads = dist.shard.heads[1] - dist.shard.heads[0]  # this rank's heads
        self.qk_nope_head_dim, self.qk_rope_head_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        self.v_head_dim, self.kv_lora_rank = cfg.v_head_dim, cfg.kv_lora_rank
        self.scale = cfg.softmax_scale
        q_out = self.n_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
        if cfg.q_lora_rank:
            self.q_a_proj = build.linear(f"{name}.q_a_proj", d, cfg.q_lora_rank)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps, dtype, build.backend)
            self.q_b_proj = build.linear(f"{name}.q_b_proj", cfg.q_lora_rank, q_out)
        else:
            self.q_proj = build.linear(f"{name}.q_proj", d, q_out)
        # replicated: every rank caches the whole latent
        self.kv_a_proj_with_mqa = build.linear(f"{name}.kv_a_proj_with_mqa", d, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps, dtype, build.backend)
        self.kv_b_proj = build.linear(f"{name}.kv_b_proj", cfg.kv_lora_rank,
                                      self.n_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim))
        # row-parallel: a partial sum over this rank's heads
        self.o_proj = build.linear(f"{name}.o_proj", self.n_heads * cfg.v_head_dim, d)
        # derived from kv_b_proj, not checkpoint tensors: non-persistent, out of the state dict; None (no
        # buffer) where the kernels read kv_b itself
        fmt, p, v = self.kv_b_proj.fmt, cfg.qk_nope_head_dim, cfg.v_head_dim
        self.triton = build.backend == "triton"
        self.kernels = self.triton and isinstance(fmt, FP8Channel) and (
            not fmt.block or (p % BLOCK == 0 and v % BLOCK == 0))  # block scales split per head's halves
        for buf, rows in (("w_uk", cfg.qk_nope_head_dim), ("w_uv", cfg.v_head_dim)):
            w = None if self.kernels else torch.empty(self.n_heads, rows, cfg.kv_lora_rank, dtype=dtype)
            self.register_buffer(buf, w, persistent=False)

    def prepare(self) -> None:
        """Lay out W_UK and W_UV from this rank's kv_b_proj rows (its heads); call once its tensors are in."""
        if self.kernels:
            return
        uk, uv = self.uk_uv(self.kv_b_proj.dequantize())
        self.w_uk.copy_(uk)
        self.w_uv.copy_(uv)

    def uk_uv(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b's rows per head, W_UK's then W_UV's, as [H, P, *] and [H, V, *] views of t: its weight (stored or
        dequantized) or its scale (one per row, or one per 128 rows when P and V are whole blocks)."""
        t = t.view(self.n_heads, -1, t.shape[-1])
        p = t.shape[1] * self.qk_nope_head_dim // (self.qk_nope_head_dim + self.v_head_dim)
        return t.split([p, t.shape[1] - p], dim=1)

    def inputs(self) -> tuple[nn.Module, ...]:
        """The projections of x: one GEMM once joined."""
        return (getattr(self, "q_a_proj", None) or self.q_proj, self.kv_a_proj_with_mqa)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                attn: Attention, layer: int, xq: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x [N, D]: the step's new tokens, flattened over its sequences, at positions pos [N] (xq: x in FP8,
        dsq.layers.project)."""
        n, nope, rope_dim = x.shape[0], self.qk_nope_head_dim, self.qk_rope_head_dim
        q, kv_a = project(x, *self.inputs(), xq=xq)
        if hasattr(self, "q_a_proj"):  # the norm quantizes for q_b_proj too
            _, q, qq = self.q_a_layernorm.add(q, None, fp8_input(self.q_b_proj))
            q = project(q, self.q_b_proj, xq=qq)[0]
        q = q.view(n, self.n_heads, nope + rope_dim)
        cos, sin = rope
        attn.cache.write(layer, attn.slots, kv_a, self.kv_a_layernorm.weight, self.kv_a_layernorm.eps, cos, sin)
        if not attn.prefills:  # decodes only: no indexing, so a CUDA graph can replay it
            return self.o_proj(self._absorbed(q, cos, sin, attn, layer))
        o = q.new_empty(n, self.n_heads, self.v_head_dim)
        if len(rows := attn.decode_rows):
            o.flatten(1)[rows] = self._absorbed(q[rows], cos[rows], sin[rows], attn, layer)
        for seq in attn.prefills:
            at = slice(seq.start, seq.start + seq.length)
            if seq.fresh:  # k_pe as kv_a gives it, roped with q
                kv, k_pe = kv_a[at].split([self.kv_lora_rank, rope_dim], dim=-1)
                kv = self.kv_a_layernorm(kv)
            else:  # a chunk continuing a cached prefix: attend all of it, itself included (k_pe roped)
                kv, k_pe = attn.latents(layer, seq)
                kv, k_pe = kv.to(x.dtype), k_pe.to(x.dtype)
            o[at] = self._naive(q[at], kv, k_pe, cos[at], sin[at], seq.fresh)
        return self.o_proj(o.flatten(1))

    def _naive(self, q, kv, k_pe, cos, sin, fresh: bool) -> torch.Tensor:
        """One sequence's T queries q [T, H, P+R] (rope not applied yet), the last T of its S positions, against
        its latents kv [S, C], k_pe [S, R] (unroped if fresh): K and V expanded per head from the latent. Causal
        aligned to the last key (query i sees keys <= S - T + i) with no mask tensor, so SDPA can pick a flash
        or memory-efficient kernel."""
        t, s, nope, v_dim = q.shape[0], kv.shape[0], self.qk_nope_head_dim, self.v_head_dim
        k_nope, v = self.kv_b_proj(kv).view(s, self.n_heads, nope + v_dim).split([nope, v_dim], dim=-1)
        if self.triton:
            from dsq.kernels import naive_qk

            q, k = naive_qk(q, k_nope, k_pe, cos, sin, fresh)
        else:
            q, k = naive_qk_ref(q, k_nope, k_pe, cos, sin, fresh)
        causal = {"is_causal": True} if t == s else {"attn_mask": causal_lower_right(t, s)}
        o = F.scaled_dot_product_attention(q, k, v.transpose(0, 1), scale=self.scale, **causal)
        return o.transpose(0, 1)

    def _absorbed(self, q, cos, sin, attn: Attention, layer: int) -> torch.Tensor:
        """The decodes' queries q [Bd, H, P+R] (rope not applied yet) attending the latent cache: W_UK folded
        into the query, W_UV after. -> [Bd, H*V]."""
        if self.kernels:
            from dsq.kernels import absorb_o, absorb_q

            (uk, uv), (uk_s, uv_s) = self.uk_uv(self.kv_b_proj.weight), self.uk_uv(self.kv_b_proj.weight_scale)
            o_lat = attn.decode(layer, *absorb_q(q, cos, sin, uk, uk_s), self.scale)  # fp32
            return absorb_o(o_lat, uv, uv_s, q.dtype)
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q_lat = torch.einsum("bhp,hpc->bhc", q_nope, self.w_uk)
        o_lat = attn.decode(layer, q_lat, apply_rope(q_pe, cos[:, None], sin[:, None]), self.scale)  # fp32
        return torch.einsum("bhc,hvc->bhv", o_lat.to(self.w_uv.dtype), self.w_uv).flatten(1)


class Gate(nn.Module):
    """Router: softmax scores in fp32, greedy or group-limited top-k, then normalise or scale the weights."""

    def __init__(self, cfg: Config, backend: str = "torch"):
        super().__init__()
        self.backend = backend
        self.k, self.groups, self.topk_groups = cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
        self.group_limited = cfg.topk_method == "group_limited_greedy"
        self.norm, self.scale = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.backend == "triton":  # the logits too, in the kernel at decode sizes
            from dsq.kernels import route

            return route(x, self.weight, self.k, self.groups if self.group_limited else 1, self.topk_groups,
                         self.norm, self.scale)
        scores = F.linear(x.float(), self.weight.float()).softmax(dim=-1)
        if self.group_limited:
            n = scores.shape[0]
            best = scores.view(n, self.groups, -1).amax(dim=-1).topk(self.topk_groups, dim=-1).indices
            keep = torch.zeros(n, self.groups, dtype=torch.bool, device=x.device).scatter_(1, best, True)
            scores = scores.masked_fill(~keep.repeat_interleave(scores.shape[1] // self.groups, dim=1), 0.0)
        weight, idx = scores.topk(self.k, dim=-1, sorted=False)
        if self.k > 1 and self.norm:
            return weight / (weight.sum(dim=-1, keepdim=True) + 1e-20), idx
        return weight * self.scale, idx


class MLP(nn.Module):
    """SwiGLU: the dense layers and the shared experts. On N ranks `inter` is this rank's columns and the
    output a partial sum."""

    def __init__(self, build: Build, name: str, dim: int, inter: int):
        super().__init__()
        self.gate_proj = build.linear(f"{name}.gate_proj", dim, inter)
        self.up_proj = build.linear(f"{name}.up_proj", dim, inter)
        self.down_proj = build.linear(f"{name}.down_proj", inter, dim)

    def inputs(self) -> tuple[nn.Module, ...]:
        return self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor, xq: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        return swiglu(x, self.gate_proj, self.up_proj, self.down_proj, xq)


class MoE(nn.Module):
    """Routed experts + shared experts. On N ranks this rank holds experts [lo, hi) and its columns of the
    shared experts; the output is its partial sum (routed and shared together, so one all-reduce follows)."""

    def __init__(self, cfg: Config, build: Build, dist: Dist, name: str):
        super().__init__()
        d = cfg.hidden_size
        self.lo, hi = dist.shard.experts
        self.gate = Gate(cfg, build.backend)  # replicated: every rank routes every token
        self.experts = build.experts(f"{name}.experts", range(self.lo, hi), d, cfg.moe_intermediate_size)
        shared = dist.shard.shared[1] - dist.shard.shared[0]
        self.shared_experts = MLP(build, f"{name}.shared_experts", d, shared) if cfg.n_shared_experts else None
        self.all_here = hi - self.lo == cfg.n_routed_experts

    def inputs(self) -> tuple[nn.Module, ...]:
        """The projections of x that may read it in FP8: the shared experts' (not the router, the experts)."""
        return self.shared_experts.inputs() if self.shared_experts is not None else ()

    def forward(self, x: torch.Tensor, xq: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weight, idx = self.gate(flat)
        shared = self.shared_experts(flat, xq) if self.shared_experts is not None else None
        if self.all_here:  # the shared output is added in the routed experts' last launch
            return self.experts(flat, idx, weight, shared).view_as(x)
        y = self.experts.partial(flat, idx, weight, self.lo)
        return (y if shared is None else y + shared).view_as(x)


class Block(nn.Module):
    """Attention then MLP or MoE, each a residual. On N ranks each returns a partial sum, completed by one
    all-reduce: two per layer, the fewest the RMSNorm between them allows. The MLP's output is returned, not
    added: the next block's first norm (or the final one) adds it in the same kernel."""

    def __init__(self, cfg: Config, layer: int, build: Build, dist: Dist):
        super().__init__()
        self.layer, self.dist, name = layer, dist, f"model.layers.{layer}"
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, build.dtype, build.backend)
        self.self_attn = MLA(cfg, build, dist, f"{name}.self_attn")
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, build.dtype, build.backend)
        dense = dist.shard.dense[1] - dist.shard.dense[0]
        self.mlp = (MoE(cfg, build, dist, f"{name}.mlp") if cfg.is_moe(layer)
                    else MLP(build, f"{name}.mlp", cfg.hidden_size, dense))
        # the norms quantize their output once for the FP8 projections that read it
        self.attn_fp8, self.mlp_fp8 = fp8_input(*self.self_attn.inputs()), fp8_input(*self.mlp.inputs())

    def forward(self, x: torch.Tensor, mlp_out: torch.Tensor | None, pos: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor], attn: Attention) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual stream, MLP output) of the previous block -> those of this one."""
        x, h, hq = self.input_layernorm.add(x, mlp_out, self.attn_fp8)
        x, h, hq = self.post_attention_layernorm.add(x, self.dist.all_reduce(
            self.self_attn(h, pos, rope, attn, self.layer, hq)), self.mlp_fp8)
        return x, self.dist.all_reduce(self.mlp(h, hq))


class Decoder(nn.Module):
    """The embedding, the blocks and the final norm: HF's `model.` prefix."""

    def __init__(self, cfg: Config, build: Build, dist: Dist):
        super().__init__()
        self.embed_tokens = Embedding(cfg.hidden_size, build.dtype, dist)
        self.layers = nn.ModuleList(Block(cfg, i, build, dist) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, build.dtype, build.backend)


class Transformer(nn.Module):
    """DeepSeek-V2 for causal LM on this rank. `scheme`: the formats of the linear modules (None:
    unquantized, in `dtype`); `backend`: "torch" references or "triton" kernels; `kv_cache_dtype`: the
    layout of the caches it makes (dsq.cache); `cache_tokens`: the most they may hold (None: no bound)."""

    def __init__(self, cfg: Config, dtype: torch.dtype = torch.bfloat16, dist: Dist | None = None,
                 scheme: Scheme | None = None, backend: str = "torch", kv_cache_dtype: str = "fp8",
                 cache_tokens: int | None = None):
        super().__init__()
        self.cfg, self.dtype, self.backend, self.kv_cache_dtype = cfg, dtype, backend, kv_cache_dtype
        self.cache_tokens = cache_tokens  # what the memory planner says the device's cache can hold
        self.dist = dist = dist or Dist.single(cfg)
        build = Build(scheme, dtype, backend)
        self.model = Decoder(cfg, build, dist)
        self.vocab = [hi - lo for lo, hi in (s.vocab for s in dist.shards)]  # every rank's slice of the logits
        self.lm_head = build.linear("lm_head", cfg.hidden_size, self.vocab[dist.rank])  # column-parallel
        self.register_buffer("inv_freq", torch.empty(cfg.qk_rope_head_dim // 2), persistent=False)
        self.requires_grad_(False)

    def init_rope(self) -> None:
        """Fill the rope frequencies (buffers are empty after building on the meta device)."""
        self.inv_freq.copy_(rope_frequencies(self.cfg))

    def prepare(self) -> None:
        """What is derived from the loaded tensors: each layer's absorbed-attention weights, and the projections
        of one input joined into one weight (dsq.layers.join)."""
        for layer in self.model.layers:
            layer.self_attn.prepare()
            for inputs in (layer.self_attn.inputs(), layer.mlp.inputs()):
                if inputs:
                    join(*inputs)

    def new_cache(self, num_pages: int, page_size: int = PAGE_SIZE) -> LatentCache:
        """Page pools for every layer, in this model's kv_cache_dtype, on its device."""
        return LatentCache(self.cfg, num_pages, page_size, self.kv_cache_dtype, self.inv_freq.device, self.backend)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, pos: torch.Tensor, attn: Attention,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """float32 logits of the step's flattened tokens [N] at positions pos [N]: all [N, V], or those of
        `rows` [M] only: [M, V]. Every new token's latent is written at its slot in `attn.cache`."""
        rope = rope_angles(self.cfg, self.inv_freq, pos)
        x, mlp_out = self.model.embed_tokens(tokens), None
        for layer in self.model.layers:
            x, mlp_out = layer(x, mlp_out, pos, rope, attn)
        if rows is not None:
            x, mlp_out = x[rows], mlp_out[rows]
        return self.dist.all_gather(self.lm_head(self.model.norm.add(x, mlp_out)[1]).float(), self.vocab)
