"""Byte-level language models for FLOP (Wang, Wohlwend & Lei, "Structured Pruning of Large Language Models",
2019): a causal pre-LN Transformer and an SRU network.

Both map int64 bytes (B, T) to next-byte logits (B, T, vocab_size) and are causal: the logits at position t
depend only on bytes 0..t. Every weight matrix of the sequence layers is an ``nn.Linear``, so FLOP's
:func:`~sparsekern.methods.flop.factorize` can replace it by a factorized, gated layer; the embeddings and
the output layer ``head`` are kept dense (the paper's choice). A model may name, in ``sk_flop_input_masked``,
layers that FLOP gates by input features instead of factorizing: the SRU's first projection, as the official
enwik8 script. Both forwards are ``torch.fx``-traceable:
the SRU's elementwise recurrence runs inside :class:`SRURecurrence` (by default the fused op
:func:`sparsekern.ops.sru_recurrence`), which is marked ``sk_leaf`` and stays one opaque node.

* :class:`TransformerLM` (Vaswani et al. 2017, pre-LayerNorm as in GPT-2, Radford et al. 2019): token and
  learned position embeddings, ``layers`` blocks ``x + attn(LN(x))``, ``x + mlp(LN(x))`` with causal
  softmax attention (``qkv`` and ``proj`` linears) and a GELU MLP (``fc1``, ``fc2``), a final LayerNorm and
  ``head``. Inputs may be shorter than ``context``, never longer.
* :class:`SRULM` (Lei, Zhang, Wang, Dai & Artzi, "Simple Recurrent Units for Highly Parallelizable
  Recurrence", EMNLP 2018): token embedding, ``layers`` SRU layers, a final LayerNorm and ``head``. One SRU
  layer computes the three matrix products of the paper in one ``nn.Linear`` ``proj`` (d -> 3d, no bias),
  then the recurrence (eqs. 3-7)::

      f_t = sigmoid(W_f x_t + v_f * c_{t-1} + b_f)
      r_t = sigmoid(W_r x_t + v_r * c_{t-1} + b_r)
      c_t = f_t * c_{t-1} + (1 - f_t) * (W x_t)
      h_t = r_t * c_t + (1 - r_t) * x_t

  with c_0 = 0 at the start of every sequence and the highway bias ``b_r`` initialised to
  ``highway_bias`` (the FLOP code's SRU default: -3, so each layer starts close to the identity).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsekern.ops.sru_recurrence import sru_recurrence, sru_recurrence_reference

__all__ = ["SRULM", "SRULayer", "SRURecurrence", "TransformerBlock", "TransformerLM", "sru_lm", "transformer_lm"]

VOCAB_SIZE = 256


def _init_linear(m: nn.Linear, std: float) -> None:
    nn.init.normal_(m.weight, 0.0, std)
    if m.bias is not None:
        nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------------------- Transformer
class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: ``qkv`` (d -> 3d), softmax attention over earlier positions, ``proj``.

    Input and output (B, T, d).
    """

    def __init__(self, d_model: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model={d_model} must be divisible by heads={heads}")
        self.heads = heads
        self.head_dim = d_model // heads
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        b, t = x.size(0), x.size(1)
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))


class MLP(nn.Module):
    """``fc2(gelu(fc1(x)))`` with hidden width ``hidden``; (B, T, d) -> (B, T, d)."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TransformerBlock(nn.Module):
    """Pre-LN block: ``x + drop(attn(ln1(x)))``, then ``x + drop(mlp(ln2(x)))``."""

    def __init__(self, d_model: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, heads, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, round(mlp_ratio * d_model))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.mlp(self.ln2(x)))


class TransformerLM(nn.Module):
    """Causal pre-LN Transformer over bytes: int64 (B, T) with T <= ``context`` -> logits (B, T, vocab_size).

    Args:
        vocab_size: number of symbols (256 bytes).
        d_model: residual width.
        layers: number of blocks.
        heads: attention heads (``d_model`` must be divisible by it).
        context: longest input (size of the learned position embedding).
        mlp_ratio: MLP hidden width / ``d_model``.
        dropout: dropout on attention weights and on the residual branches.

    Initialisation as GPT-2: N(0, 0.02) weights, zero biases, and the residual output projections
    (``attn.proj``, ``mlp.fc2``) scaled by ``1 / sqrt(2 * layers)``.
    """

    def __init__(self, vocab_size: int = VOCAB_SIZE, d_model: int = 256, layers: int = 4, heads: int = 4,
                 context: int = 128, mlp_ratio: float = 4.0, dropout: float = 0.0) -> None:
        super().__init__()
        self.context = context
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(context, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(TransformerBlock(d_model, heads, mlp_ratio, dropout) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                _init_linear(m, 0.02)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, 0.0, 0.02)
        for blk in self.blocks:
            _init_linear(blk.attn.proj, 0.02 / math.sqrt(2 * layers))
            _init_linear(blk.mlp.fc2, 0.02 / math.sqrt(2 * layers))

    def forward(self, x: Tensor) -> Tensor:
        t = x.size(1)
        torch._assert(t <= self.context, "TransformerLM: the input is longer than the model's context; "
                                         "cut it into windows of at most `context` bytes")
        h = self.drop(self.embed(x) + self.pos.weight[:t])
        for blk in self.blocks:
            h = blk(h)
        return self.head(self.ln_f(h))


# ----------------------------------------------------------------------------------------------- SRU
class SRURecurrence(nn.Module):
    """The elementwise SRU recurrence (Lei et al. 2018, eqs. 3-7) given the projected inputs.

    ``forward(u, x)``: ``u`` (B, T, 3d) holds ``[W x_t, W_f x_t, W_r x_t]`` along the last axis, ``x`` (B, T, d)
    the layer input (for the highway connection); returns h (B, T, d).

    With ``fused=True`` (the default) it runs the op :func:`sparsekern.ops.sru_recurrence`, forward and
    backward: its C++ kernels for CPU float32, its plain-torch reference elsewhere (one opaque op either way, so
    ``torch.compile`` sees no loop). With ``fused=False`` it runs the plain-torch loop
    :func:`sparsekern.ops.sru_recurrence.sru_recurrence_reference` directly (about five small ops per time step,
    differentiated by autograd). Both compute the same function; they agree to float32 rounding. Marked
    ``sk_leaf``: tracers keep it as one opaque node (it loops over the input's length).
    """

    sk_leaf = True

    def __init__(self, d: int, highway_bias: float = -3.0, fused: bool = True) -> None:
        super().__init__()
        self.d = d
        self.fused = fused
        bound = 1.0 / math.sqrt(d)
        self.v_f = nn.Parameter(torch.empty(d).uniform_(-bound, bound))
        self.v_r = nn.Parameter(torch.empty(d).uniform_(-bound, bound))
        self.b_f = nn.Parameter(torch.zeros(d))
        self.b_r = nn.Parameter(torch.full((d,), float(highway_bias)))

    def forward(self, u: Tensor, x: Tensor) -> Tensor:
        if u.shape[-1] != 3 * self.d or x.shape[-1] != self.d or u.shape[:-1] != x.shape[:-1]:
            raise ValueError(f"SRURecurrence(d={self.d}): expected u (B, T, {3 * self.d}) and x (B, T, {self.d}), "
                             f"got {tuple(u.shape)} and {tuple(x.shape)}")
        args = (u, x, self.v_f, self.v_r, self.b_f, self.b_r)
        return sru_recurrence(*args) if self.fused else sru_recurrence_reference(*args)

    def extra_repr(self) -> str:
        return f"d={self.d}, fused={self.fused}"


class SRULayer(nn.Module):
    """One SRU layer: ``proj`` (d -> 3d, no bias; the paper's W, W_f, W_r stacked) and :class:`SRURecurrence`
    (``fused``: its fused op, see there)."""

    def __init__(self, d: int, highway_bias: float = -3.0, fused: bool = True) -> None:
        super().__init__()
        self.proj = nn.Linear(d, 3 * d, bias=False)
        self.rnn = SRURecurrence(d, highway_bias, fused)
        bound = math.sqrt(3.0 / d)  # uniform with variance 1/d, as the SRU reference code
        nn.init.uniform_(self.proj.weight, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        return self.rnn(self.proj(x), x)


class SRULM(nn.Module):
    """SRU language model over bytes: int64 (B, T) -> logits (B, T, vocab_size), any T >= 1.

    FLOP (:func:`~sparsekern.methods.flop.factorize`) factorizes every ``proj`` but the first layer's, which
    keeps its dense weight and gets a hard-concrete mask on its input features (``sk_flop_input_masked``), as
    the official enwik8 script (asappresearch/flop, ``train_enwik8.py``) does with its first SRU layer.

    Args:
        vocab_size: number of symbols (256 bytes).
        d_model: hidden width of every layer.
        layers: number of SRU layers.
        dropout: dropout between layers.
        highway_bias: initial highway-gate bias ``b_r``.
        fused: run the recurrence through the fused op (:class:`SRURecurrence`).
    """

    #: Layers that FLOP gates by input features instead of factorizing (the official enwik8 SRU recipe).
    sk_flop_input_masked: tuple[str, ...] = ("layers.0.proj",)

    def __init__(self, vocab_size: int = VOCAB_SIZE, d_model: int = 256, layers: int = 4, dropout: float = 0.0,
                 highway_bias: float = -3.0, fused: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.layers = nn.ModuleList(SRULayer(d_model, highway_bias, fused) for _ in range(layers))
        self.drop = nn.Dropout(dropout)
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)
        nn.init.normal_(self.embed.weight, 0.0, 1.0)
        _init_linear(self.head, 1.0 / math.sqrt(d_model))

    def forward(self, x: Tensor) -> Tensor:
        h = self.drop(self.embed(x))
        for layer in self.layers:
            h = self.drop(layer(h))
        return self.head(self.ln_f(h))


def transformer_lm(*, vocab_size: int = VOCAB_SIZE, d_model: int = 256, layers: int = 4, heads: int = 4,
                   context: int = 128, mlp_ratio: float = 4.0, dropout: float = 0.0) -> TransformerLM:
    """:class:`TransformerLM` (registered in the zoo as ``"transformer_lm"``)."""
    return TransformerLM(vocab_size, d_model, layers, heads, context, mlp_ratio, dropout)


def sru_lm(*, vocab_size: int = VOCAB_SIZE, d_model: int = 256, layers: int = 4, dropout: float = 0.0,
           highway_bias: float = -3.0, fused: bool = True) -> SRULM:
    """:class:`SRULM` (registered in the zoo as ``"sru_lm"``)."""
    return SRULM(vocab_size, d_model, layers, dropout, highway_bias, fused)
