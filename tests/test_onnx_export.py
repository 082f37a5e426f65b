"""export_onnx: compiled static CNNs and FLOP-compiled language models export to ONNX and compute in onnxruntime
what they compute in torch; the model passed in is untouched; dynamic models and existing files are refused."""
from __future__ import annotations

import copy

import pytest
import torch

import sparsekern as sk
from sparsekern.lowrank import LowRankLinear
from sparsekern.methods import flop
from sparsekern.methods.sanp import to_plan, to_sanp
from sparsekern.models import build
from sparsekern.onnx_export import check_onnx, export_onnx
from tests.conftest import random_plan, randomize_bn

pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")


def _flop_lm(arch: str, kwargs: dict) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = flop.factorize(build(arch, **kwargs).eval(), init="random").eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in flop.gated_layers(model).values():
            layer.log_alpha.fill_(10.0)
            layer.log_alpha[torch.randperm(layer.n_gates, generator=g)[: layer.n_gates // 2]] = -10.0
    x = torch.randint(0, 256, (2, 12), generator=g)
    return sk.compile(model, flop.prune(model, x), x).eval(), x


def test_compiled_cnn_exports_and_matches(tmp_path) -> None:
    model = randomize_bn(build("resnet20").eval())
    x = torch.randn(2, 3, 16, 16)
    fast = sk.compile(model, random_plan(model, x[:1], 0), x[:1]).eval()
    path = export_onnx(fast, x, tmp_path / "r20.onnx")
    assert check_onnx(path, fast, x) < 1e-5
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_onnx(fast, x, path)
    assert export_onnx(fast, x, path, overwrite=True) == path


@pytest.mark.parametrize("arch, kwargs", [("transformer_lm", dict(d_model=32, layers=2, heads=4, context=12)),
                                          ("sru_lm", dict(d_model=24, layers=2))])
def test_low_rank_language_models_export_as_standard_ops(tmp_path, arch, kwargs) -> None:
    lm, x = _flop_lm(arch, kwargs)
    before = copy.deepcopy(lm.state_dict())
    path = export_onnx(lm, x, tmp_path / f"{arch}.onnx")
    assert check_onnx(path, lm, x) < 1e-5
    assert any(isinstance(m, LowRankLinear) for m in lm.modules())  # the model passed in keeps its layers
    assert all(torch.equal(v, before[k]) for k, v in lm.state_dict().items())


def test_a_transformer_pruned_by_heads_exports_with_its_head_counts(tmp_path) -> None:
    from sparsekern.methods import l1_norm

    torch.manual_seed(0)
    model = build("transformer_lm", d_model=32, layers=2, heads=4, context=12).eval()
    x = torch.randint(0, 256, (2, 12))
    fast = sk.compile(model, l1_norm.prune(model, x, ratio=0.5), x).eval()
    assert fast.get_submodule("blocks.0.attn.qkv").weight.shape[0] == 3 * 2 * 8  # 2 of 4 heads of 8 features
    assert check_onnx(export_onnx(fast, x, tmp_path / "heads.onnx"), fast, x) < 1e-5


def test_dynamic_models_are_refused(tmp_path) -> None:
    model = build("resnet20").eval()
    x = torch.randn(1, 3, 16, 16)
    gated = to_sanp(model, granularity=4).eval()
    with pytest.raises(ValueError, match="per-sample channel masks"):
        export_onnx(sk.compile(gated, to_plan(gated, x), x), x, tmp_path / "sanp.onnx")
    assert not (tmp_path / "sanp.onnx").exists()


def test_a_compiled_transformers_model_exports_and_matches(tmp_path) -> None:
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                               num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                               max_position_embeddings=16, use_cache=False)).eval()
    x = torch.randint(0, 64, (2, 12))
    fast = sk.compile(model, random_plan(model, x, 0), x).eval()
    assert check_onnx(export_onnx(fast, x, tmp_path / "llama.onnx"), fast, x) < 1e-5
