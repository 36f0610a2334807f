"""zoo.ops.dispatch: the implementation table, the automatic choice on CPU, the process-wide setting,
errors for unavailable or unknown implementations, the recipe's model.kernels and describe(), and
Mamba / Mamba-2 models whose recipe picks the Triton kernels (float64, vs the torch path)."""
import warnings

import pytest
import torch

import zoo
from tests.helpers import assert_close
from zoo.config import RecipeError
from zoo.ops import dispatch
from zoo.ops.dispatch import OPS, choose, chosen, set_kernels, use_kernels

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _clean_process_setting():
    previous = set_kernels()
    yield
    set_kernels(previous)


def test_auto_on_cpu_is_torch_for_every_op():
    assert chosen(CPU) == {op: "torch" for op in OPS}


def test_explicit_triton_runs_under_the_interpreter():
    # tests/conftest.py sets TRITON_INTERPRET=1
    assert choose("ssd", "triton", torch.zeros(1)) == "triton"


def test_unavailable_impls_say_why(monkeypatch):
    with pytest.raises(RuntimeError, match=r"ssd: impl 'cuda' is unavailable: cuda: needs CUDA tensors"):
        choose("ssd", "cuda", torch.zeros(1))
    monkeypatch.setattr(dispatch, "interpreting", lambda: False)
    with pytest.raises(RuntimeError, match=r"triton: needs CUDA tensors or TRITON_INTERPRET=1"):
        choose("selective_scan", "triton", torch.zeros(1))


def test_unknown_impl_and_op_name_the_allowed_values():
    with pytest.raises(ValueError, match=r"impl: 'triton' is not an implementation of causal_conv1d "
                                         r"\(allowed: auto, cuda, torch\)"):
        choose("causal_conv1d", "triton", CPU)
    with pytest.raises(ValueError, match=r"unknown op 'sdd' \(known: ssd, selective_scan"):
        choose("sdd", "auto", CPU)


def test_unsupported_call_falls_back_with_a_warning():
    # an op marks an impl it has but that cannot handle the call's arguments
    dispatch._warned.clear()
    with pytest.warns(UserWarning, match=r"ssd: impl 'triton' does not handle this call \(no such argument\); "
                                         r"running 'torch' instead"):
        assert choose("ssd", "triton", CPU, {"triton": "no such argument"}) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # once per reason
        assert choose("ssd", "triton", CPU, {"triton": "no such argument"}) == "torch"
        assert choose("ssd", "auto", CPU, {"triton": "no such argument"}) == "torch"


def test_process_setting_and_context_manager():
    with use_kernels(ssd="triton"):
        assert choose("ssd", "auto", CPU) == "triton"
        assert choose("ssd", "torch", CPU) == "torch"          # an explicit argument wins
        with use_kernels({"selective_scan": "triton"}):
            assert chosen(CPU)["ssd"] == "triton" and chosen(CPU)["selective_scan"] == "triton"
        assert chosen(CPU)["selective_scan"] == "torch"
    assert choose("ssd", "auto", CPU) == "torch"
    set_kernels(infini="triton")
    assert choose("infini", "auto", CPU) == "triton"
    with pytest.raises(ValueError, match=r"kernels.infini: 'cuda' is not an implementation of infini"):
        set_kernels(infini="cuda")


def _tiny(block, **kernels):
    spec = {"type": block, "d_state": 4, "expand": 2, "ffn": "none"}
    if block == "mamba2":
        spec.update(head_dim=4, n_groups=2, chunk_size=8)
    return zoo.build_model({"name": f"tiny-{block}", "model": {
        "d_model": 8, "n_layers": 1, "vocab_size": 11, "pattern": "M", "blocks": {"M": spec}, "kernels": kernels}})


def test_recipe_kernels_are_validated():
    with pytest.raises(RecipeError, match=r"model.kernels.sdd: unknown op \(known: ssd, selective_scan"):
        _tiny("mamba", sdd="torch")
    with pytest.raises(RecipeError, match=r"model.kernels.ssd: 'cudnn' is not an implementation of ssd "
                                          r"\(allowed: auto, cuda, torch, triton\)"):
        _tiny("mamba", ssd="cudnn")


def test_describe_reports_the_kernels():
    text = _tiny("mamba2", ssd="triton").describe()
    assert "kernels (cpu): ssd=triton selective_scan=torch causal_conv1d=torch" in text
    with use_kernels(selective_scan="triton"):
        assert "selective_scan=triton" in _tiny("mamba").describe()


@pytest.mark.parametrize("block,op", [("mamba", "selective_scan"), ("mamba2", "ssd")])
def test_model_runs_the_kernels_its_recipe_picks(block, op):
    """A model with model.kernels {op: triton} gives the torch model's logits and gradients, whole and
    through the cache in two pieces (initial and final states); the process setting does not override
    the recipe."""
    torch.manual_seed(0)
    fast, slow = _tiny(block, **{op: "triton"}).double(), _tiny(block, **{op: "torch"}).double()
    slow.load_state_dict(fast.state_dict())
    ids = torch.randint(0, 11, (2, 19))
    calls = []
    module = __import__(f"zoo.ops.triton.{'ssm' if op == 'selective_scan' else 'ssd'}", fromlist=["x"])
    name = "selective_scan_triton" if op == "selective_scan" else "ssd_scan_triton"
    original = getattr(module, name)

    def counted(*a, **k):
        calls.append(1)
        return original(*a, **k)

    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("error")
        mp.setattr(module, name, counted)
        with use_kernels({op: "torch"}):
            out = fast(ids, labels=ids)
        out.loss.backward()
        cache = fast.init_cache(2, dtype=torch.float64)
        pieces = torch.cat([fast(ids[:, :12], cache=cache).logits, fast(ids[:, 12:], cache=cache).logits], 1)
    assert len(calls) == 3
    ref = slow(ids, labels=ids)
    ref.loss.backward()
    assert_close(out.logits, ref.logits, 1e-10)
    assert_close(pieces, ref.logits, 1e-10, "logits through the cache")
    for (name_, p), q in zip(fast.named_parameters(), slow.parameters()):
        assert_close(p.grad, q.grad, 1e-10, f"grad {name_}")
