"""Models torch.fx cannot trace are captured with torch.export and translated back to torch-level fx
(:mod:`sparsekern.export_trace`): the same channel rules plan them, and the compiled model equals the masked
reference, takes other input shapes, and returns the model's own output type. Hugging Face ``transformers``
models (an optional test dependency) are built from small configs: nothing is downloaded."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekern as sk
from sparsekern.graph import GraphError, trace_channels
from sparsekern.methods import l1_norm
from tests.conftest import assert_close_to_scale, random_plan


class ChunkLoop(nn.Module):
    """A forward fx cannot trace (it iterates over ``chunk``'s result) and export can."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.branches = nn.ModuleList(nn.Conv2d(8, 8, 3, padding=1) for _ in range(2))
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.stem(x))
        parts = [branch(part) for branch, part in zip(self.branches, y.chunk(2, dim=1))]
        return self.head(F.relu(torch.cat(parts, dim=1))).mean((2, 3))


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_a_model_fx_cannot_trace_is_exported_and_compiles_exactly() -> None:
    torch.manual_seed(0)
    model, x = ChunkLoop().eval(), torch.randn(2, 3, 8, 8)
    with pytest.raises(GraphError, match="torch.fx"):
        trace_channels(model, x, tracer="fx")
    cg = trace_channels(model, x)
    assert cg.groups["stem"].size == 16 and not cg.groups["stem"].pinned
    plan = sk.Plan.from_keep_sets(cg.groups, {"stem": [0, 3, 5, 9, 12, 13], "branches.0": [1, 2, 7]})
    compiled = sk.compile(model, plan, x).eval()
    assert compiled.get_submodule("stem").out_channels == 6
    assert compiled.get_submodule("branches.1").in_channels == 3  # the chunk sizes follow the kept channels
    reference = sk.masked(model, plan, x).eval()
    with torch.no_grad():
        for inputs in (x, torch.randn(5, 3, 11, 7)):  # export left batch and spatial sizes dynamic
            assert_close_to_scale(compiled(inputs), reference(inputs), 1e-5)
    assert _params(compiled) < _params(model)


class SelfAttentionMLP(nn.Module):
    """``nn.MultiheadAttention`` called on one tensor three times, then an MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.attn = nn.Linear(16, 32), nn.MultiheadAttention(32, 4, batch_first=True)
        self.mlp, self.out = nn.Linear(32, 64), nn.Linear(64, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.out(torch.relu(self.mlp(h + a)))


def test_an_exported_module_call_that_needs_more_than_its_input_keeps_its_operators() -> None:
    torch.manual_seed(0)
    model, x = SelfAttentionMLP().eval(), torch.randn(2, 5, 16)
    cg = trace_channels(model, x, tracer="export")
    calls = {n.target for n in cg.gm.graph.nodes if n.op == "call_module"}
    assert "attn" not in calls and "inp" in calls  # not one call: it requires key and value too
    assert cg.groups["inp"].pinned and not cg.groups["mlp"].pinned  # its weights pin the stream it reads
    plan = sk.Plan.from_keep_sets(cg.groups, {"mlp": range(0, 64, 3)})
    _compiled_equals_masked(model, plan, x, 1e-5)


def test_export_failure_names_both_front_ends() -> None:
    class DataDependent(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x if x.sum() > 0 else -x  # Python control flow on a value: neither front end takes it

    with pytest.raises(GraphError, match="torch.export"):
        trace_channels(DataDependent(), torch.randn(4))


# ----------------------------------------------------------------------------- transformers
def _hf():
    return pytest.importorskip("transformers")


def _gpt2(tf):
    return tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=32,
                                            use_cache=False, bos_token_id=0, eos_token_id=0))


def _llama(tf):
    return tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                              max_position_embeddings=32, use_cache=False))


def _bert(tf):
    return tf.BertModel(tf.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=96, vocab_size=100, max_position_embeddings=32))


def _vit(tf):
    return tf.ViTForImageClassification(tf.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                     intermediate_size=96, image_size=32, patch_size=8,
                                                     num_labels=10))


def _phi3(tf):  # one fused qkv projection sliced into query, key and value; gate and up fused too
    return tf.Phi3ForCausalLM(tf.Phi3Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                            max_position_embeddings=32, use_cache=False, pad_token_id=0))


def _gpt_neox(tf):  # qkv viewed as (heads, 3 * head_dim), then split into query, key and value
    return tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                  num_attention_heads=4, vocab_size=100, max_position_embeddings=32,
                                                  use_cache=False))


BUILDERS = {"gpt2": _gpt2, "llama": _llama, "bert": _bert, "vit": _vit, "phi3": _phi3, "gpt_neox": _gpt_neox}


def _inputs(name: str, batch: int, length: int) -> tuple[torch.Tensor]:
    return (torch.randn(batch, 3, 32, 32),) if name == "vit" else (torch.randint(0, 100, (batch, length)),)


def _main_output(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state


def _compiled_equals_masked(model: nn.Module, plan: sk.Plan, x, tol: float = 1e-4) -> nn.Module:
    """``sk.compile(model, plan, x)``, checked against ``sk.masked`` on ``x`` (a ``ModelOutput``'s main tensor)."""
    x = x if isinstance(x, tuple) else (x,)
    compiled = sk.compile(model, plan, x).eval()
    with torch.no_grad():
        assert_close_to_scale(_main_output(compiled(*x)), _main_output(sk.masked(model, plan, x)(*x)), tol)
    return compiled


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", list(BUILDERS))
def test_transformers_models_compile_equal_to_the_masked_reference(name: str, seed: int) -> None:
    tf = _hf()
    torch.manual_seed(seed)
    model = BUILDERS[name](tf).eval()
    x = _inputs(name, 2, 16)
    plan = random_plan(model, x[0], seed=seed)
    assert plan.channels, "nothing prunable"
    compiled = sk.compile(model, plan, x).eval()
    reference = sk.masked(model, plan, x).eval()
    with torch.no_grad():
        out = compiled(*x)
        assert type(out) is type(model(*x))  # the model's own output class
        for inputs in (x, _inputs(name, 3, 7)):
            assert_close_to_scale(_main_output(compiled(*inputs)), _main_output(reference(*inputs)), 1e-4)
    assert _params(compiled) < _params(model)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_transformers_heads_and_mlps_are_prunable(name: str) -> None:
    tf = _hf()
    model = BUILDERS[name](tf).eval()
    cg = trace_channels(model, _inputs(name, 2, 16))
    heads = [g for g in cg.groups.values() if g.size in (2, 4) and not g.pinned]
    mlps = [g for g in cg.groups.values() if g.size in (96, 256) and not g.pinned]
    expected_heads = 2 if name in ("llama", "phi3") else 4  # GQA: one channel per key/value head and its queries
    assert len(heads) == 2 and all(g.size == expected_heads for g in heads)
    assert len(mlps) == 2
    assert not cg.opaque  # nothing pinned but outputs: the hidden size too (ViT's class token with it)
    hidden = cg.groups[next(iter(cg.groups))]
    assert hidden.size == 64 and bool(hidden.pinned) == (name == "bert")  # BertModel outputs its hidden states


class FusedQKV(nn.Module):
    """One projection whose output is sliced into query, key and value (``qkv[..., :d]``, ...)."""

    def __init__(self, d: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.d, self.heads = d, heads
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        qkv = self.qkv(x)
        q, k, v = qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]
        q, k, v = (z.reshape(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, d)) + x


def test_slices_of_the_channel_axis_with_constant_bounds_follow_the_kept_channels() -> None:
    torch.manual_seed(0)
    model, x = FusedQKV().eval(), torch.randn(2, 6, 32)
    cg = trace_channels(model, x)
    assert cg.groups["qkv"].size == 4 and not cg.groups["qkv"].pinned  # one channel per head
    assert len(cg.channel_slices) == 3
    plan = sk.Plan.from_keep_sets(cg.groups, {"qkv": [0, 3]})
    compiled = _compiled_equals_masked(model, plan, x, 1e-5)
    assert compiled.get_submodule("qkv").out_features == 3 * 2 * 8


def test_a_strided_slice_of_the_channel_axis_pins_its_channels() -> None:
    class Strided(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 16), nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x)[..., ::2])

    cg = trace_channels(Strided(), torch.randn(2, 8))
    assert cg.groups["a"].pinned and "step" in next(iter(cg.opaque.values()))


def test_vit_hidden_size_slices_the_class_token_and_position_table() -> None:
    tf = _hf()
    torch.manual_seed(0)
    model = _vit(tf).eval()
    x = _inputs("vit", 2, 0)
    cg = trace_channels(model, x)
    plan = sk.Plan.from_keep_sets(cg.groups, {"vit.embeddings.patch_embeddings.projection": range(0, 64, 2)})
    compiled = _compiled_equals_masked(model, plan, x)
    assert compiled.get_submodule("vit.embeddings").cls_token.shape == (1, 1, 32)
    assert compiled.get_submodule("vit.embeddings").position_embeddings.shape == (1, 17, 32)


def test_llama_grouped_query_attention_keeps_whole_key_value_groups() -> None:
    tf = _hf()
    torch.manual_seed(0)
    model = _llama(tf).eval()
    x = _inputs("llama", 2, 16)
    cg = trace_channels(model, x)
    group = next(n for n, g in cg.groups.items() if "layers.0.self_attn" in n and g.size == 2)
    plan = sk.Plan.from_keep_sets(cg.groups, {group: [1]})
    compiled = _compiled_equals_masked(model, plan, x)
    attn = compiled.get_submodule("model.layers.0.self_attn.q_proj")
    assert attn.out_features == 2 * 16  # the two query heads of key/value head 1, head dimension whole
    assert compiled.get_submodule("model.layers.0.self_attn.k_proj").out_features == 16
    assert compiled.get_submodule("model.layers.0.self_attn.o_proj").in_features == 32


def test_l1_norm_prunes_gpt2_heads_through_its_conv1d_layers() -> None:
    tf = _hf()
    torch.manual_seed(0)
    model = _gpt2(tf).eval()
    with torch.no_grad():  # head 1 of layer 0 gets the largest query/key/value weights
        w = model.transformer.h[0].attn.c_attn.weight.view(64, 3, 4, 16)
        w[:, :, 1] *= 10
    x = _inputs("gpt2", 2, 16)
    plan = l1_norm.prune(model, x, ratio=0.5)
    assert 1 in plan.channels["transformer.h.0.attn.c_attn"].keep
    compiled = _compiled_equals_masked(model, plan, x)
    assert compiled.get_submodule("transformer.h.0.attn.c_attn").weight.shape == (64, 3 * 2 * 16)


def test_a_model_returning_a_cache_gets_the_fix_in_the_error() -> None:
    tf = _hf()
    model = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50, n_positions=16,
                                             bos_token_id=0, eos_token_id=0)).eval()
    with pytest.raises(GraphError, match="use_cache=False"):
        trace_channels(model, torch.randint(0, 50, (1, 8)))


def small_bert() -> nn.Module:
    """The architecture factory a saved model names (``sk.save(..., arch={"factory": ...})``)."""
    return _bert(_hf())


def test_a_compiled_transformers_model_saves_and_loads_without_pickle(tmp_path) -> None:
    torch.manual_seed(0)
    model = small_bert().eval()
    x = _inputs("bert", 2, 16)
    compiled = sk.compile(model, random_plan(model, x[0], seed=0), x).eval()
    name = "tests.graph.test_export_front_end:small_bert"
    path = sk.save(compiled, tmp_path / "bert.sk", arch={"factory": name, "kwargs": {}})
    torch.manual_seed(1)  # the loaded tensors, not the factory's initialisation, must give the outputs
    loaded = sk.load(path, factories={name: small_bert})
    with torch.no_grad():
        assert torch.equal(loaded(*x).last_hidden_state, compiled(*x).last_hidden_state)


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_flop_factorizes_every_linear_of_a_transformers_model_and_compiles_exactly(name: str) -> None:
    tf = _hf()
    from sparsekern.methods import flop

    torch.manual_seed(0)
    model = flop.factorize(BUILDERS[name](tf), init="svd")
    for layer in flop.gated_layers(model).values():  # gates as after training: some components switched off
        with torch.no_grad():
            layer.log_alpha.copy_(torch.randn_like(layer.log_alpha) * 3)
    model.eval()
    x = _inputs(name, 2, 16)
    plan = flop.prune(model, x)
    linears = [n for n, m in BUILDERS[name](tf).named_modules() if isinstance(m, nn.Linear) and "head" not in n]
    assert set(linears) <= set(plan.lowrank)
    compiled = _compiled_equals_masked(model, plan, x)
    assert sk.flops(compiled, x).total < sk.flops(model, x).total


def test_flop_trains_a_transformers_llama_to_its_target_and_compiles_it() -> None:
    """FLOP end to end on a ``transformers`` model: trained on the bundled byte corpus with the Lagrangian
    constraint, the expected and hard sparsity reach the target (the margin of tests/methods/test_flop.py's
    claim, 0.02, for the same step budget), and the pruned model compiles equal to its masked reference."""
    tf = _hf()
    from sparsekern.methods import flop
    from sparsekern.text_data import LMSequences, pystdlib
    from sparsekern.train import TrainConfig

    data = LMSequences(pystdlib().train[:200_000], 32)
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = flop.factorize(tf.LlamaForCausalLM(tf.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=256, max_position_embeddings=32, use_cache=False)), init="random")
        cfg = TrainConfig(max_steps=300, batch_size=16, optimizer="adam", lr=3e-3, weight_decay=0.0,
                          schedule="constant", progress=False, device="cpu", seed=seed)
        flop.train_flop(model, data, cfg, target=0.5)
        assert flop.hard_sparsity(model) == pytest.approx(0.5, abs=0.02), seed
        x = (data[0][0][None],)
        plan = flop.prune(model.eval(), x)
        _compiled_equals_masked(model, plan, x)
