"""sparsekern.cost: FLOP totals agree with torch's FlopCounterMode; per-layer formulas; reports."""
from __future__ import annotations

import json

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

import sparsekern as sk
from sparsekern.cost import FlopReport, LayerCost, flops, theoretical_speedup


def torch_total(model: nn.Module, *args: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(*args)
    return fc.get_total_flops()


def conv_formula(n: int, c_in: int, c_out: int, out_hw: tuple[int, ...], k: tuple[int, ...],
                 groups: int = 1) -> int:
    """2 * N * C_out * prod(out spatial) * (C_in / groups) * prod(kernel)."""
    prod_out = 1
    for s in out_hw:
        prod_out *= s
    prod_k = 1
    for s in k:
        prod_k *= s
    return 2 * n * c_out * prod_out * (c_in // groups) * prod_k


# ----------------------------------------------------------------------------- models
class SmallCNN(nn.Module):
    def __init__(self, w: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, stride=2, padding=1), nn.BatchNorm2d(w), nn.ReLU())
        self.layer1 = nn.Sequential(
            nn.Conv2d(w, w, 3, padding=2, dilation=2, groups=w),  # depthwise, dilated
            nn.Conv2d(w, 2 * w, 1),
            nn.ReLU(),
        )
        self.head = nn.Linear(2 * w, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer1(self.stem(x))
        return self.head(x.mean((2, 3)))


class GroupedConvs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(4, 12, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2,
                            bias=False)
        self.c2 = nn.Conv2d(12, 12, 3, groups=12, padding=1)
        self.c1d = nn.Conv1d(12, 6, 3, stride=2)
        self.up = nn.ConvTranspose2d(12, 8, 3, stride=2, padding=1, output_padding=1, groups=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c2(self.c1(x))
        z = self.c1d(y.flatten(2))
        return self.up(y).sum() + z.sum()


class Conv3dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv3d(2, 4, 3, padding=1, stride=(1, 2, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(x)


class Attention(nn.Module):
    """Linear on 3D input plus a matmul/bmm in forward (charged to this module)."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.scale = nn.Parameter(torch.ones(d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
        y = torch.matmul(att, v) @ self.scale
        return self.proj(y)


class TwiceNet(nn.Module):
    """The same Linear called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.out = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.fc(torch.relu(self.fc(x))))


class Blocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Attention(16), Attention(16)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = x + b(x)
        return x


CASES = {
    "small_cnn": (lambda: SmallCNN(), lambda: (torch.randn(2, 3, 16, 16),)),
    "grouped_strided_dilated_transposed": (lambda: GroupedConvs(), lambda: (torch.randn(2, 4, 9, 10),)),
    "conv3d": (lambda: Conv3dNet(), lambda: (torch.randn(1, 2, 4, 6, 6),)),
    "attention_3d_linear_matmul": (lambda: Attention(), lambda: (torch.randn(2, 5, 16),)),
    "called_twice": (lambda: TwiceNet(), lambda: (torch.randn(3, 8),)),
    "nested_blocks": (lambda: Blocks(), lambda: (torch.randn(2, 4, 16),)),
    "fx_small_cnn": (lambda: fx.symbolic_trace(SmallCNN()), lambda: (torch.randn(2, 3, 16, 16),)),
    "fx_nested_blocks": (lambda: fx.symbolic_trace(Blocks()), lambda: (torch.randn(2, 4, 16),)),
    "pruned_small_cnn": (lambda: SmallCNN(w=5), lambda: (torch.randn(2, 3, 16, 16),)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_total_matches_flop_counter_mode(case: str) -> None:
    torch.manual_seed(0)
    make_model, make_inputs = CASES[case]
    model = make_model().eval()
    args = make_inputs()
    report = flops(model, args)
    assert report.total == torch_total(model, *args)
    assert report.total == sum(lc.flops for lc in report.layers.values())
    assert report.total > 0


def test_tensor_input_accepted_and_sk_flops_alias() -> None:
    model = SmallCNN().eval()
    x = torch.randn(2, 3, 16, 16)
    assert sk.flops(model, x).total == flops(model, (x,)).total
    assert flops(model, x).batch == 2


# ----------------------------------------------------------------------------- per layer
def test_conv_layers_match_hand_formulas() -> None:
    model = GroupedConvs().eval()
    x = torch.randn(2, 4, 9, 10)
    r = flops(model, x)
    # c1: H_out = (9 + 2*1 - 1*(3-1) - 1) // 2 + 1 = 5, W_out = (10 + 2*2 - 2*(5-1) - 1) // 1 + 1 = 6
    assert r.layers["c1"].output_shape == (2, 12, 5, 6)
    assert r.layers["c1"].flops == conv_formula(2, 4, 12, (5, 6), (3, 5), groups=2)
    assert r.layers["c1"].params == 12 * 2 * 3 * 5  # no bias
    assert r.layers["c1"].kind == "Conv2d"
    # depthwise c2
    assert r.layers["c2"].flops == conv_formula(2, 12, 12, (5, 6), (3, 3), groups=12)
    # conv1d on length 30, stride 2 -> 14
    assert r.layers["c1d"].output_shape == (2, 6, 14)
    assert r.layers["c1d"].flops == conv_formula(2, 12, 6, (14,), (3,))
    # transposed: 2 * N * C_in * prod(in spatial) * (C_out / groups) * prod(kernel)
    assert r.layers["up"].output_shape == (2, 8, 10, 12)
    assert r.layers["up"].flops == 2 * 2 * 12 * (5 * 6) * (8 // 4) * 9
    assert r.layers["up"].kind == "ConvTranspose2d"


def test_linear_on_3d_input_and_matmul_attribution() -> None:
    model = Attention(16).eval()
    x = torch.randn(2, 5, 16)
    r = flops(model, x)
    assert r.layers["qkv"].flops == 2 * (2 * 5) * 16 * 48
    assert r.layers["qkv"].input_shape == (2, 5, 16)
    assert r.layers["qkv"].output_shape == (2, 5, 48)
    assert r.layers["proj"].flops == 2 * (2 * 5) * 16 * 16
    # root module: q k^T (2x5x16 @ 2x16x5), att v (2x5x5 @ 2x5x16), y @ scale (10x16 @ 16x16)
    root = 2 * 2 * 5 * 5 * 16 + 2 * 2 * 5 * 16 * 5 + 2 * 10 * 16 * 16
    assert r.layers[""].flops == root
    assert r.layers[""].params == 16 * 16  # owns `scale` only
    assert set(r.layers) == {"", "qkv", "proj"}
    assert r.layers[""].kind == "bmm+mm"  # Attention has children: kind names the ops


class FusedAttention(nn.Module):
    def __init__(self, causal: bool) -> None:
        super().__init__()
        self.causal = causal

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=self.causal)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("t_q,t_k", [(7, 7), (5, 9), (9, 4), (1, 6)])
def test_fused_attention_counts_the_pairs_it_computes(causal: bool, t_q: int, t_k: int) -> None:
    b, h, e, e_v = 2, 3, 8, 8  # equal head dims: torch runs its fused kernel (its math fallback is counted as
    # the matmuls it runs, every pair)
    q, k, v = torch.randn(b, h, t_q, e), torch.randn(b, h, t_k, e), torch.randn(b, h, t_k, e_v)
    mask = torch.ones(t_q, t_k, dtype=torch.bool)
    if causal:
        mask = mask.tril()  # torch's is_causal: query i sees keys 0..i
    pairs = int(mask.sum())
    expected = 2 * b * h * pairs * (e + e_v)  # q k^T over the pairs, then the weights times v
    assert flops(FusedAttention(causal).eval(), (q, k, v)).total == expected
    if not causal:  # explicit matmuls count the same
        assert torch_total(FusedAttention(False), q, k, v) in (0, expected)


def test_module_called_twice_counts_both_calls() -> None:
    model = TwiceNet().eval()
    x = torch.randn(3, 8)
    r = flops(model, x)
    assert r.layers["fc"].calls == 2
    assert r.layers["fc"].flops == 2 * (2 * 3 * 8 * 8)
    assert r.layers["out"].calls == 1
    assert r.layers["out"].flops == 2 * 3 * 8 * 2
    # bytes of one addmm: bias + x + W^T + out, fp32; the second call reads the weights again
    one_call = (8 + 3 * 8 + 8 * 8 + 3 * 8) * 4
    assert r.layers["fc"].bytes == 2 * one_call


def test_fx_graph_module_has_same_layers_as_eager() -> None:
    torch.manual_seed(0)
    eager = Blocks().eval()
    gm = fx.symbolic_trace(eager)
    x = torch.randn(2, 4, 16)
    re, rg = flops(eager, x), flops(gm, x)
    assert "blocks.0.qkv" in rg.layers and "blocks.1.proj" in rg.layers
    # matmuls in Attention.forward are charged to the original module name, not the fx root
    assert {k: v.flops for k, v in re.layers.items()} == {k: v.flops for k, v in rg.layers.items()}
    assert re.params == rg.params


def test_pruned_model_by_hand_and_theoretical_speedup() -> None:
    x = torch.randn(2, 3, 16, 16)
    dense, pruned = SmallCNN(w=8).eval(), SmallCNN(w=4).eval()
    rd, rp = flops(dense, x), flops(pruned, x)

    def expected(w: int) -> int:
        stem = conv_formula(2, 3, w, (8, 8), (3, 3))
        dw = conv_formula(2, w, w, (8, 8), (3, 3), groups=w)
        pw = conv_formula(2, w, 2 * w, (8, 8), (1, 1))
        head = 2 * 2 * (2 * w) * 10
        return stem + dw + pw + head

    assert rd.total == expected(8)
    assert rp.total == expected(4)
    assert rp.layers["layer1.1"].flops == conv_formula(2, 4, 8, (8, 8), (1, 1))
    assert theoretical_speedup(rd, rp) == pytest.approx(expected(8) / expected(4))
    with pytest.raises(ValueError):
        theoretical_speedup(rd, FlopReport(total=0, params=0, bytes=0))


def test_params_and_bytes_definitions() -> None:
    model = SmallCNN(w=8).eval()
    x = torch.randn(2, 3, 16, 16)
    r = flops(model, x)
    assert r.params == sum(p.numel() for p in model.parameters())  # includes BN
    stem = r.layers["stem.0"]
    assert stem.params == 8 * 3 * 9 + 8
    # conv op: input + weight + bias read, output written, fp32
    assert stem.bytes == (2 * 3 * 16 * 16 + 8 * 3 * 9 + 8 + 2 * 8 * 8 * 8) * 4
    assert r.bytes == sum(lc.bytes for lc in r.layers.values())
    half = flops(SmallCNN(w=8).eval().to(torch.float64), x.double())
    assert half.layers["stem.0"].bytes == 2 * stem.bytes  # dtype size counts


def test_mode_and_buffers_unchanged() -> None:
    model = SmallCNN()
    model.train()
    bn = model.stem[1]
    before = bn.running_mean.clone()
    r_train = flops(model, torch.randn(2, 3, 16, 16))
    assert model.training and bn.training
    assert torch.equal(bn.running_mean, before)
    assert bn.num_batches_tracked.item() == 0
    model.eval()
    flops(model, torch.randn(2, 3, 16, 16))
    assert not model.training
    assert r_train.total > 0


def test_uncounted_custom_op_is_reported() -> None:
    @torch.library.custom_op("sparsekern_test_cost::twice", mutates_args=())
    def twice(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return twice(self.fc(x))

    r = flops(M(), torch.randn(2, 4))
    assert r.total == 2 * 2 * 4 * 4
    assert any("twice" in k for k in r.uncounted_ops)


def test_to_dict_json_round_trip_and_table() -> None:
    model = Attention(16).eval()
    r = flops(model, torch.randn(2, 5, 16))
    d = json.loads(json.dumps(r.to_dict()))
    assert d["total"] == r.total
    assert d["per_sample"] is None
    assert d["layers"]["qkv"]["input_shape"] == [2, 5, 16]
    back = FlopReport.from_dict(d)
    assert back == r
    assert isinstance(back.layers["qkv"], LayerCost)
    text = r.table()
    assert "qkv" in text and "<root>" in text and "total" in text
    assert len(r.table(top=1).splitlines()) == 1 + 1 + 1  # header, one layer, total


def test_per_sample_flops_of_dynamic_layers() -> None:
    """``per_sample``: a module declaring ``sk_flops_per_sample`` replaces the even share of the ops it runs (which
    still count in ``total``); ``channel_skip_conv2d`` is counted from its masks; other ops cost ``flops / B``."""
    from sparsekern.cost import SampleFlops
    from sparsekern.ops import channel_skip_conv2d

    class Declares(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x)

        def sk_flops_per_sample(self, args, kwargs, output) -> torch.Tensor:
            return torch.tensor([1, 2, 3])

    class Skip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 3, 3, 3))

        def forward(self, x: torch.Tensor, m_in: torch.Tensor, m_out: torch.Tensor) -> torch.Tensor:
            return channel_skip_conv2d(x, self.weight, None, m_in, m_out, 1, 1, 1, True, backend="reference")

    net = nn.Sequential()
    net.add_module("d", Declares())
    net.add_module("out", nn.Linear(4, 2))
    r = flops(net, torch.randn(3, 4))
    assert r.total == 2 * 3 * 4 * 4 + 2 * 3 * 4 * 2  # what ran
    assert r.per_sample == [1 + 16, 2 + 16, 3 + 16] and isinstance(r.per_sample, SampleFlops)
    assert r.layers["d"].per_sample == [1, 2, 3] and r.layers["d"].kind == "Declares"
    assert r.layers["d.fc"].per_sample == [0, 0, 0] and r.layers["out"].per_sample == [16] * 3
    assert r.skipped_total == 54 and (r.per_sample.mean, r.per_sample.min, r.per_sample.max) == (18.0, 17, 19)
    assert theoretical_speedup(r, r) == pytest.approx(r.total / 54)
    back = FlopReport.from_dict(json.loads(json.dumps(r.to_dict())))
    assert back == r and isinstance(back.per_sample, SampleFlops) and back.layers["d"].per_sample.max == 3

    x = torch.randn(2, 3, 5, 5)
    m_in = torch.tensor([[True, False, True], [False, False, False]])
    m_out = torch.tensor([[True, True, False, True], [True, False, False, False]])
    r = flops(Skip(), (x, m_in, m_out))
    assert r.per_sample == [2 * 9 * 25 * 2 * 3, 0]  # 2 k^2 H W |in| |out| per sample
    assert r.total == r.skipped_total == 2 * 9 * 25 * 6 and not r.uncounted_ops
    assert torch_total(Skip(), x, m_in, m_out) == r.total  # FlopCounterMode uses the same formula


def test_roofline_is_the_slower_of_compute_and_memory() -> None:
    from sparsekern.cost import linear_bytes, lowrank_bytes, roofline_seconds

    assert roofline_seconds(100.0, 10.0, peak_flops=10.0, bandwidth=100.0) == 10.0  # compute-bound
    assert roofline_seconds(100.0, 1000.0, peak_flops=10.0, bandwidth=100.0) == 10.0
    assert roofline_seconds(1.0, 1000.0, peak_flops=10.0, bandwidth=100.0) == 10.0  # memory-bound
    t, n_in, n_out, r = 8, 64, 32, 4
    assert linear_bytes(t, n_in, n_out) == 4 * (t * n_in + n_in * n_out + n_out + t * n_out)
    assert lowrank_bytes(t, n_in, n_out, r, element_size=2) == 2 * (t * n_in + r * n_in + n_out * r + n_out + t * n_out)
    # one token: the weights dominate, so the roofline speedup is the ratio of the weights moved
    peak, bw = 1e12, 1e9
    dense = roofline_seconds(2 * n_in * n_out, linear_bytes(1, n_in, n_out), peak, bw)
    low = roofline_seconds(2 * r * (n_in + n_out), lowrank_bytes(1, n_in, n_out, r), peak, bw)
    assert dense / low == pytest.approx(linear_bytes(1, n_in, n_out) / lowrank_bytes(1, n_in, n_out, r))
