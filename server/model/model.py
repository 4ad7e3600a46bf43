"""A Llama-family decoder (Llama, Mistral, Qwen2) whose KV cache lives in pool
pages and whose linear layers add each token's own LoRA delta.

Weights are plain tensors, q/k/v and gate/up fused so each layer runs few large
matmuls, each a Linear (linear.py: reordered for oneDNN on a CPU); the forward pass
is written out so that a reader sees every op."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from lorapool.server.model import native
from lorapool.server.model.attention import AttentionMeta, PagedAttention
from lorapool.server.model.checkpoint import load_spec, load_tensors
from lorapool.server.model.linear import Linear, onednn_wanted
from lorapool.server.model.lora import LoraBatch
from lorapool.spec import ModelSpec


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: Linear  # [q + k + v, hidden], with q/k/v biases where the model has them
    o: Linear
    post_norm: torch.Tensor
    gate_up: Linear  # [2 * intermediate, hidden]
    down: Linear


class Model:
    def __init__(self, spec: ModelSpec, tensors: dict[str, torch.Tensor], dtype, device):
        self.spec = spec
        self.dtype = dtype
        self.device = torch.device(device)

        def w(name: str) -> torch.Tensor:
            return tensors[name].to(device=self.device, dtype=dtype).contiguous()

        pack = onednn_wanted(self.device, dtype)

        def linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> Linear:
            return Linear(weight, bias, pack=pack)

        self.embed = w("model.embed_tokens.weight")
        if spec.tie_word_embeddings or "lm_head.weight" not in tensors:
            self.lm_head = linear(self.embed)
        else:
            self.lm_head = linear(w("lm_head.weight"))
        self.norm = w("model.norm.weight")
        self.layers = []
        for i in range(spec.num_layers):
            p = f"model.layers.{i}."
            attn = p + "self_attn."
            bias = None
            if spec.attention_bias and (attn + "q_proj.bias") in tensors:
                bias = torch.cat([w(attn + f"{m}.bias") for m in ("q_proj", "k_proj", "v_proj")])
            self.layers.append(
                LayerWeights(
                    input_norm=w(p + "input_layernorm.weight"),
                    qkv=linear(
                        torch.cat(
                            [w(attn + f"{m}.weight") for m in ("q_proj", "k_proj", "v_proj")]
                        ),
                        bias,
                    ),
                    o=linear(w(attn + "o_proj.weight")),
                    post_norm=w(p + "post_attention_layernorm.weight"),
                    gate_up=linear(
                        torch.cat([w(p + "mlp.gate_proj.weight"), w(p + "mlp.up_proj.weight")])
                    ),
                    down=linear(w(p + "mlp.down_proj.weight")),
                )
            )
        self.cos, self.sin = _rope_tables(spec, self.device, dtype)
        # the C kernels of a layer's small ops (norms, rope, silu) on a CPU in float32
        self.kernels = native.load() if native.wanted(self.embed) else None
        self.q_size = spec.num_heads * spec.head_dim
        self.kv_size = spec.num_kv_heads * spec.head_dim

    @classmethod
    def from_pretrained(cls, model_dir, dtype=torch.float32, device="cpu") -> Model:
        spec = load_spec(model_dir)
        return cls(spec, load_tensors(model_dir), dtype, device)

    def dense_weights(self) -> list[Linear]:
        """Every weight matrix a token passes through, as the forward pass runs them:
        the matmul limit of a step."""
        mats = [m for layer in self.layers for m in (layer.qkv, layer.o, layer.gate_up, layer.down)]
        return mats + [self.lm_head]

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attention: PagedAttention,
        meta: AttentionMeta,
        lora: LoraBatch | None,
        logits_index: torch.Tensor,
    ) -> torch.Tensor:
        """Run all tokens of a step; return float32 logits of the rows in logits_index.

        attention reads and writes the pool's KV pages; the new tokens' K and V go to
        the slots meta names."""
        spec = self.spec
        t = input_ids.numel()
        x = self.embed.index_select(0, input_ids)  # this step's own tensor: added to in place
        rope = self._rope_for(positions)
        qs, ks = self.q_size, self.kv_size
        hd = spec.head_dim
        residual = None  # the last layer's output, added to x by the next norm
        for i, layer in enumerate(self.layers):
            h = self._add_norm(x, residual, layer.input_norm)
            qkv = layer.qkv(h)
            if lora is not None:
                lora.apply(i, "qkv", h, qkv)
            q, k = rope(qkv)
            v = qkv[:, qs + ks :].view(t, spec.num_kv_heads, hd)
            attention.write(i, k, v, meta)
            attn = attention(i, q, k, v, meta).reshape(t, qs)
            o = layer.o(attn)
            if lora is not None:
                lora.apply(i, "o", attn, o)
            h = self._add_norm(x, o, layer.post_norm)
            gu = layer.gate_up(h)
            if lora is not None:
                lora.apply(i, "gate_up", h, gu)
            act = self._silu_mul(gu)
            residual = layer.down(act)
            if lora is not None:
                lora.apply(i, "down", act, residual)
        x.add_(residual)
        x = self._add_norm(x.index_select(0, logits_index), None, self.norm)
        return self.lm_head(x).float()

    def _add_norm(self, x: torch.Tensor, residual: torch.Tensor | None, weight) -> torch.Tensor:
        """x += residual (in place), then rms_norm(x) * weight as a new tensor."""
        eps = self.spec.rms_norm_eps
        if self.kernels is not None and (residual is None or residual.stride(-1) == 1):
            return self.kernels.add_rms_norm(x, residual, weight, eps)
        if residual is not None:
            x.add_(residual)
        return _rms_norm(x, weight, eps)

    def _silu_mul(self, gu: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up of gu = [gate | up]."""
        if self.kernels is not None:
            return self.kernels.silu_mul(gu)
        inter = gu.shape[1] // 2
        return F.silu(gu[:, :inter]).mul_(gu[:, inter:])

    def _rope_for(self, positions: torch.Tensor):
        """The step's rotation: rope(qkv) -> (q, k), [tokens, heads, head_dim] each,
        q and k heads side by side in qkv rotated as one; in place in qkv by the C
        kernel, else as a new tensor."""
        nh, hd = self.spec.num_heads, self.spec.head_dim
        heads = nh + self.spec.num_kv_heads
        if self.kernels is not None:
            positions = positions.to(torch.long).contiguous()
            if positions.numel() and int(positions.max()) >= self.cos.shape[0]:
                raise IndexError(f"a position beyond the model's {self.cos.shape[0]}")

            def rotate_in_place(qkv: torch.Tensor):
                self.kernels.rope(qkv, heads, hd, self.cos, self.sin, positions)
                qk = qkv[:, : heads * hd].view(qkv.shape[0], heads, hd)
                return qk[:, :nh], qk[:, nh:]

            return rotate_in_place
        cos = self.cos.index_select(0, positions).unsqueeze(1)
        sin = self.sin.index_select(0, positions).unsqueeze(1)

        def rotate(qkv: torch.Tensor):
            qk = _rope(qkv[:, : heads * hd].view(qkv.shape[0], heads, hd), cos, sin)
            return qk[:, :nh], qk[:, nh:]

        return rotate


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:  # torch's fused kernel; same math as below
        return F.rms_norm(x, weight.shape, weight, eps)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x cos + rotate_half(x) sin, as transformers rotates, in three ops: x
    [tokens, heads, head_dim]; cos/sin [tokens, 1, head_dim], sin's first half
    negated (rotate_half's sign, folded into the table)."""
    half = x.shape[-1] // 2
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)
    return torch.addcmul(x * cos, swapped, sin)


def _rope_tables(spec: ModelSpec, device, dtype):
    """cos/sin for every position, computed as transformers does (incl. llama3,
    linear and yarn scaling through its ROPE_INIT_FUNCTIONS)."""
    config = spec.hf_config
    rope = getattr(config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default")
    if rope_type == "default":
        base = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        dim = spec.head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        scaling = 1.0
    else:
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    pos = torch.arange(spec.max_position, dtype=torch.float)
    freqs = torch.outer(pos, inv_freq.float())
    cos, sin = freqs.cos() * scaling, freqs.sin() * scaling
    return (
        torch.cat((cos, cos), dim=-1).to(device=device, dtype=dtype),
        torch.cat((-sin, sin), dim=-1).to(device=device, dtype=dtype),
    )
