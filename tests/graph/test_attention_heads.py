"""Attention heads as prunable channels: a view that splits a projection into heads for
``F.scaled_dot_product_attention`` ties each head's query, key and value features into one channel, and the
compiled model has fewer heads, equal to ``sk.masked`` of the same plan."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekern as sk
from sparsekern.graph import trace_channels
from sparsekern.methods import l1_norm
from sparsekern.models import build
from tests.conftest import assert_close_to_scale


class SeparateProjections(nn.Module):
    """Attention written as Hugging Face models write it: separate q, k, v and output projections, each head
    ``view``-ed out and moved to axis 1; ``kv_heads`` < ``heads`` is grouped-query attention, the key/value heads
    repeated (``gqa="repeat"``: ``repeat_interleave``; ``"expand"``: Llama's ``repeat_kv``) or left to attention
    (``gqa="enable"``)."""

    def __init__(self, d: int = 32, heads: int = 4, kv_heads: int | None = None, mask: str = "none",
                 gqa: str = "repeat") -> None:
        super().__init__()
        self.heads, self.kv_heads, self.hd, self.mask, self.gqa = heads, kv_heads or heads, d // heads, mask, gqa
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, self.kv_heads * self.hd)
        self.v = nn.Linear(d, self.kv_heads * self.hd)
        self.o = nn.Linear(d, d)
        self.register_buffer("head_bias", torch.randn(1, heads, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.heads, self.hd).transpose(1, 2)
        k = self.k(x).view(b, t, self.kv_heads, self.hd).transpose(1, 2)
        v = self.v(x).view(b, t, self.kv_heads, self.hd).transpose(1, 2)
        if self.kv_heads != self.heads and self.gqa == "repeat":
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        elif self.kv_heads != self.heads and self.gqa == "expand":
            k, v = _repeat_kv(k, self.heads // self.kv_heads), _repeat_kv(v, self.heads // self.kv_heads)
        mask = self.head_bias + q.new_zeros(1, 1, t, t) if self.mask == "per_head" else None
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.gqa == "enable")
        return self.o(y.transpose(1, 2).contiguous().view(b, t, self.heads * self.hd)) + x


def _repeat_kv(x: torch.Tensor, n: int) -> torch.Tensor:
    b, h, t, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n, t, d).reshape(b, h * n, t, d)


def _compiled_equals_masked(model: nn.Module, plan: sk.Plan, x: torch.Tensor) -> nn.Module:
    compiled = sk.compile(model, plan, x).eval()
    reference = sk.masked(model, plan, x).eval()
    with torch.no_grad():
        assert_close_to_scale(compiled(x), reference(x), 1e-5)
    return compiled


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_zoo_transformer_prunes_whole_heads(seed: int) -> None:
    torch.manual_seed(seed)
    model = build("transformer_lm", d_model=48, layers=2, heads=4, context=16).eval()
    x = torch.randint(0, 256, (2, 16))
    cg = trace_channels(model, x)
    for block in range(2):
        group = cg.groups[f"blocks.{block}.attn.qkv"]
        assert group.size == 4 and not group.pinned  # one channel per head, 3 x 12 features each
    keep = {"blocks.0.attn.qkv": sorted(torch.randperm(4)[:2].tolist()), "blocks.1.attn.qkv": [int(seed) % 4]}
    plan = sk.Plan.from_keep_sets(cg.groups, keep)
    compiled = _compiled_equals_masked(model, plan, x)
    assert compiled.get_submodule("blocks.0.attn.qkv").weight.shape == (3 * 2 * 12, 48)
    assert compiled.get_submodule("blocks.1.attn.proj").weight.shape == (48, 12)
    shorter = torch.randint(0, 256, (3, 7))  # the rewritten views hold the head count, not the shape
    with torch.no_grad():
        assert_close_to_scale(compiled(shorter), sk.masked(model, plan, x)(shorter), 1e-5)


def test_zoo_transformer_prunes_its_residual_stream_with_the_position_table() -> None:
    torch.manual_seed(0)
    model = build("transformer_lm", d_model=48, layers=2, heads=4, context=16).eval()
    x = torch.randint(0, 256, (2, 16))
    cg = trace_channels(model, x)
    stream = cg.groups["embed"]
    assert stream.size == 48 and not stream.pinned and {"blocks.1.mlp.fc2", "ln_f"} <= set(stream.members)
    plan = sk.Plan.from_keep_sets(cg.groups, {"embed": range(0, 48, 3), "blocks.0.attn.qkv": [1, 2]})
    compiled = _compiled_equals_masked(model, plan, x)
    assert compiled.get_submodule("pos").weight.shape == (16, 16)  # its rows are read as pos.weight[:t]
    assert compiled.get_submodule("head").weight.shape == (256, 16)


def test_l1_norm_ranks_heads_by_their_query_key_value_weights() -> None:
    torch.manual_seed(0)
    model = build("transformer_lm", d_model=48, layers=1, heads=4, context=8).eval()
    with torch.no_grad():  # head 2 gets the largest weights, head 0 the smallest
        qkv = model.get_submodule("blocks.0.attn.qkv").weight.view(3, 4, 12, 48)
        for h, scale in enumerate((0.1, 1.0, 5.0, 2.0)):
            qkv[:, h] *= scale
    x = torch.randint(0, 256, (1, 8))
    plan = l1_norm.prune(model, x, ratio=0.5)
    assert plan.channels["blocks.0.attn.qkv"].keep == (2, 3)
    _compiled_equals_masked(model, plan, x)


def test_separate_projections_tie_query_key_value_and_output_by_head() -> None:
    torch.manual_seed(0)
    model = SeparateProjections().eval()
    x = torch.randn(2, 5, 32)
    cg = trace_channels(model, x)
    group = cg.groups["q"]
    assert group.size == 4 and not group.pinned and {"q", "k", "v"} <= set(group.members)
    compiled = _compiled_equals_masked(model, sk.Plan.from_keep_sets(cg.groups, {"q": [1, 3]}), x)
    assert compiled.get_submodule("k").weight.shape == (16, 32) and compiled.get_submodule("o").weight.shape == (32, 16)


@pytest.mark.parametrize("gqa", ["repeat", "expand", "enable"])
def test_grouped_query_attention_prunes_a_key_value_head_with_its_query_heads(gqa: str) -> None:
    torch.manual_seed(0)
    model = SeparateProjections(d=48, heads=6, kv_heads=2, gqa=gqa).eval()
    x = torch.randn(2, 5, 48)
    cg = trace_channels(model, x)
    group = cg.groups["q"]
    assert group.size == 2 and not group.pinned and {"q", "k", "v"} <= set(group.members)
    compiled = _compiled_equals_masked(model, sk.Plan.from_keep_sets(cg.groups, {"q": [1]}), x)
    # key/value head 1 and query heads 3, 4, 5 remain: 3 x 8 query features, 8 key features
    assert compiled.get_submodule("q").weight.shape == (24, 48) and compiled.get_submodule("k").weight.shape == (8, 48)


def test_a_per_head_attention_mask_keeps_every_head() -> None:
    torch.manual_seed(0)
    model = SeparateProjections(mask="per_head").eval()
    x = torch.randn(2, 5, 32)
    cg = trace_channels(model, x)
    assert any("per-head attention mask" in reason for reason in cg.opaque.values())
    assert all(cg.groups[g].pinned for g in cg.groups if "q" in cg.groups[g].members)
    assert set(cg.groups["q"].pinned) == set(range(cg.groups["q"].size))


def test_a_head_split_that_never_reaches_attention_stays_unprunable() -> None:
    class Pooled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 12)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x).view(x.shape[0], 3, 4).sum(-1)

    cg = trace_channels(Pooled().eval(), torch.randn(2, 8))
    assert set(cg.groups["fc"].pinned) == set(range(12))


class SwiGLUStack(nn.Module):
    """A Llama-style stream: an input projection to width ``d``, pre-RMSNorm blocks with head-split attention
    and a SwiGLU MLP (``down(silu(gate(h)) * up(h))``) added to the stream, a final RMSNorm and a head."""

    def __init__(self, d: int = 32, hidden: int = 48, blocks: int = 2) -> None:
        super().__init__()
        self.inp = nn.Linear(16, d)
        self.attn = nn.ModuleList(SeparateProjections(d, heads=4) for _ in range(blocks))
        self.norm1 = nn.ModuleList(nn.RMSNorm(d) for _ in range(blocks))
        self.norm2 = nn.ModuleList(nn.RMSNorm(d) for _ in range(blocks))
        self.gate = nn.ModuleList(nn.Linear(d, hidden, bias=False) for _ in range(blocks))
        self.up = nn.ModuleList(nn.Linear(d, hidden, bias=False) for _ in range(blocks))
        self.down = nn.ModuleList(nn.Linear(hidden, d, bias=False) for _ in range(blocks))
        self.norm = nn.RMSNorm(d)
        self.head = nn.Linear(d, 10)
        for norm in [*self.norm1, *self.norm2, self.norm]:
            nn.init.uniform_(norm.weight, 0.5, 1.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for i in range(len(self.gate)):
            h = self.attn[i](self.norm1[i](h)) + h  # the attention adds its own input, norm1(h), too
            z = self.norm2[i](h)
            h = h + self.down[i](F.silu(self.gate[i](z)) * self.up[i](z))
        return self.head(self.norm(h))


def test_rmsnorm_stream_swiglu_and_heads_prune_together() -> None:
    torch.manual_seed(0)
    model = SwiGLUStack().eval()
    x = torch.randn(2, 5, 16)
    cg = trace_channels(model, x)
    stream = cg.groups["inp"]
    assert stream.size == 32 and not stream.pinned and {"norm", "norm1.0", "down.1"} <= set(stream.members)
    assert {"gate.0", "up.0"} <= set(cg.groups["gate.0"].members)  # SwiGLU's gate and up tied by the product
    keep = {"inp": range(0, 32, 2), "gate.0": range(0, 48, 3), "attn.0.q": [0, 2], "attn.1.q": [3]}
    compiled = _compiled_equals_masked(model, sk.Plan.from_keep_sets(cg.groups, keep), x)
    assert compiled.get_submodule("norm1.1").weight.shape == (16,)
    assert compiled.get_submodule("up.0").weight.shape == (16, 16)


class TinyLlama(SwiGLUStack):
    """:class:`SwiGLUStack` over byte ids: an embedding table instead of the input projection, the output head
    optionally tied to it."""

    def __init__(self, tied: bool) -> None:
        super().__init__()
        self.inp = nn.Embedding(64, 32)
        self.head = nn.Linear(32, 64, bias=False)
        if tied:
            self.head.weight = self.inp.weight


@pytest.mark.parametrize("tied", [False, True])
def test_the_embedding_width_is_the_residual_stream_channels(tied: bool) -> None:
    torch.manual_seed(0)
    model = TinyLlama(tied).eval()
    x = torch.randint(0, 64, (2, 6))
    cg = trace_channels(model, x)
    assert cg.groups["inp"].size == 32 and not cg.groups["inp"].pinned
    plan = sk.Plan.from_keep_sets(cg.groups, {"inp": range(1, 32, 2), "attn.1.q": [0, 1]})
    compiled = _compiled_equals_masked(model, plan, x)
    assert compiled.get_submodule("inp").weight.shape == (64, 16) and compiled.get_submodule("head").weight.shape == (64, 16)
    assert model.inp.weight.shape == (64, 32)  # the model passed in is untouched
