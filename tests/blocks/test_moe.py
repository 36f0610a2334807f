"""The `moe` FFN: the block vs the same math through the dense twin (outputs, aux loss, every gradient,
float64), Jamba's sparse MoE block and transformers' load-balancing loss, recipe validation naming the
field, the aux loss collected from FFNs into ZooLM's aux_loss and trained and logged by the Trainer,
streaming and packed documents unchanged."""
import json

import pytest
import torch
import torch.nn.functional as F

import zoo
from tests.helpers import TOY_RECIPE, ToyData, assert_close
from zoo.blocks.ffn import FfnConfig, build_ffn
from zoo.blocks.moe import MoeFeedForward
from zoo.config import RecipeError
from zoo.ops.moe import moe_swiglu_ref, route

D = 12


def make(seed=0, **fields):
    torch.manual_seed(seed)
    cfg = FfnConfig(**{"type": "moe", "experts": 5, "top_k": 2, "hidden": 7, **fields})
    ffn = build_ffn(D, cfg).double()
    with torch.no_grad():
        for p in ffn.parameters():
            p.normal_(std=0.5)
    return ffn


def reference(ffn, x):
    """The FFN from the dense twin, with the load-balancing loss written from its definition."""
    cfg = ffn.cfg
    flat = x.reshape(-1, D)
    probs, w, e = route(flat @ ffn.router.weight.T, cfg.top_k, cfg.normalize_top_k)
    y = moe_swiglu_ref(flat, w, e, ffn.gate_up, ffn.down).view_as(x)
    if ffn.shared is not None:
        s = ffn.shared
        shared = s.out_proj(F.silu(s.gate_proj(x)) * s.up_proj(x))
        y = y + (shared if ffn.shared_gate is None else torch.sigmoid(x @ ffn.shared_gate.weight.T) * shared)
    f = F.one_hot(e, cfg.experts).double().sum(1).mean(0)     # share of top-k slots per expert
    return y, cfg.aux_loss_weight * cfg.experts * (f * probs.mean(0)).sum()


@pytest.mark.parametrize("fields", [{}, {"normalize_top_k": True}, {"top_k": 1, "shared_hidden": 3},
                                    {"experts": 3, "top_k": 3, "aux_loss_weight": 0.3},
                                    {"shared_hidden": 4, "shared_gate": True, "normalize_top_k": True}])
def test_block_matches_dense_reference(fields):
    ffn = make(**fields)
    assert isinstance(ffn, MoeFeedForward)
    x = torch.randn(3, 11, D, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 11, D, dtype=torch.float64)
    results = []
    for fn in (lambda: ffn(x), lambda: reference(ffn, x)):
        ffn.zero_grad()
        x.grad = None
        y, aux = fn()
        ((y * g).sum() + 10 * aux).backward()
        results.append((y, aux, x.grad.clone(), {n: p.grad.clone() for n, p in ffn.named_parameters()}))
    (y, aux, dx, grads), (y_ref, aux_ref, dx_ref, grads_ref) = results
    assert_close(y, y_ref, 1e-12)
    assert_close(aux, aux_ref, 1e-12, "aux")
    assert_close(dx, dx_ref, 1e-12, "grad x")
    assert grads.keys() == grads_ref.keys() == {n for n, _ in ffn.named_parameters()}
    for n in grads:
        assert_close(grads[n], grads_ref[n], 1e-12, f"grad {n}", floor=1.0)


def test_balance_matches_transformers_and_is_k_when_uniform():
    from transformers.models.jamba.modeling_jamba import load_balancing_loss_func
    ffn = make(aux_loss_weight=1.0)
    x = torch.randn(2, 9, D, dtype=torch.float64)
    _, aux = ffn(x)
    want = load_balancing_loss_func((x.reshape(-1, D) @ ffn.router.weight.T,), 5, 2)
    assert_close(aux, want.double(), 1e-6)
    with torch.no_grad():
        ffn.router.weight.zero_()     # every probability 1/E: E * sum_e f_e / E = k
    assert ffn(x)[1].item() == pytest.approx(2.0)
    assert make(aux_loss_weight=0.0)(x)[1] is None


def test_matches_jamba_sparse_moe_block():
    from transformers import JambaConfig
    from transformers.models.jamba.modeling_jamba import JambaSparseMoeBlock
    cfg = JambaConfig(hidden_size=D, intermediate_size=7, num_experts=5, num_experts_per_tok=2)
    hf = JambaSparseMoeBlock(cfg)
    ffn = make()
    ffn.float()
    with torch.no_grad():
        hf.router.weight.copy_(ffn.router.weight)
        hf.experts.gate_up_proj.copy_(ffn.gate_up)
        hf.experts.down_proj.copy_(ffn.down)
    x = torch.randn(2, 13, D)
    assert_close(ffn(x)[0], hf(x), 1e-5)


@pytest.mark.parametrize("ffn, message", [
    ({"type": "moe"}, r"model.ffn.experts: type moe needs the number of experts"),
    ({"type": "moe", "experts": 4, "top_k": 5}, r"model.ffn.top_k: must be in \[1, experts=4\], got 5"),
    ({"type": "moe", "experts": 4, "top_k": 0}, r"model.ffn.top_k: must be in \[1, experts=4\], got 0"),
    ({"type": "moe", "experts": 4, "aux_loss_weight": -1}, r"model.ffn.aux_loss_weight: must be >= 0"),
    ({"type": "moe", "experts": 4, "shared_hidden": 0}, r"model.ffn.shared_hidden: must be null"),
    ({"type": "moe", "experts": 4, "shared_gate": True}, r"model.ffn.shared_gate: gates the shared expert, which "
                                                         r"needs shared_hidden"),
    ({"type": "moe", "experts": 4, "chunk": 8}, r"model.ffn.chunk: the blockwise FFN is not implemented"),
    ({"type": "moe", "experts": 4, "bias": True}, r"model.ffn.bias: type moe has no biases"),
    ({"type": "moe", "experts": 4, "topk": 2}, r"model.ffn.topk: unknown key"),
    ({"type": "moe", "experts": 4, "bias_update_rate": 0.001}, r"model.ffn.bias_update_rate: moves the sigmoid "
                                                                r"router's correction bias \(router: sigmoid\)"),
    ({"type": "moe", "experts": 4, "router": "sigmoid", "bias_update_rate": -1}, r"model.ffn.bias_update_rate: "
                                                                                 r"must be >= 0"),
    ({"type": "moee"}, r"did you mean 'moe'"),
])
def test_recipe_errors_name_the_field(ffn, message):
    with pytest.raises(RecipeError, match=message):
        zoo.load_recipe(_recipe(ffn))


def _recipe(ffn, block_ffn=None, pattern="AM"):
    blocks = {"A": {"type": "attn", "n_heads": 2}, "M": {"type": "mamba", "d_state": 4}}
    if block_ffn is not None:
        blocks["M"]["ffn"] = block_ffn
    return {"name": "moe-test", "model": {"d_model": 16, "n_layers": 2, "vocab_size": 40, "pattern": pattern,
                                          "blocks": blocks, "ffn": ffn, "init_std": 0.2},
            "train": {"seq_len": 32}}


MOE = {"type": "moe", "experts": 4, "top_k": 2, "hidden": 8, "aux_loss_weight": 0.1}


def test_model_collects_ffn_aux_losses_and_inits_experts():
    torch.manual_seed(0)
    model = zoo.build_model(_recipe(MOE)).double()
    assert [layer.ffn.cfg.type for layer in model.layers] == ["moe", "moe"]
    # a per-layer block ffn over a dense default, and back: fields of the other type are ignored
    mixed = zoo.build_model(_recipe({"type": "swiglu", "mult": 2}, block_ffn=MOE))
    assert [layer.ffn.cfg.type for layer in mixed.layers] == ["swiglu", "moe"]
    seen = []
    for layer in model.layers:
        layer.ffn.register_forward_hook(lambda m, i, out: seen.append(out[1]))
    ids = torch.randint(0, 40, (2, 10))
    out = model(ids, labels=ids)
    assert len(seen) == 2
    assert_close(out.aux_loss, seen[0] + seen[1], 1e-14, "aux_loss")
    out.aux_loss.backward()
    assert model.layers[0].ffn.router.weight.grad.abs().sum() > 0
    # the stacked experts take the model's init: N(0, init_std), the output side scaled by 1/sqrt(2 n_layers)
    big = zoo.build_model(zoo.load_recipe(_recipe({**MOE, "experts": 8, "hidden": 64}),
                                          ["model.d_model=64", "model.init_std=0.02"]))
    assert big.layers[0].ffn.gate_up.std().item() == pytest.approx(0.02, rel=0.05)
    assert big.layers[0].ffn.down.std().item() == pytest.approx(0.02 / 2, rel=0.05)
    assert "moe" in big.describe()


def test_streaming_and_packed_documents_are_unchanged():
    torch.manual_seed(0)
    model = zoo.build_model(_recipe(MOE)).double().eval()
    ids = torch.randint(0, 40, (2, 15))
    with torch.no_grad():
        whole = model(ids).logits
        cache = model.init_cache(2)
        parts = [model(ids[:, s:e], cache=cache).logits for s, e in ((0, 4), (4, 5), (5, 15))]
        assert_close(torch.cat(parts, 1), whole, 1e-12)
        # two packed documents: each equals the document alone
        seq_idx = torch.tensor([[0] * 6 + [1] * 9] * 2)
        packed = model(ids, seq_idx=seq_idx).logits
        assert_close(packed[:, :6], model(ids[:, :6]).logits, 1e-12)
        assert_close(packed[:, 6:], model(ids[:, 6:]).logits, 1e-12)


def test_trainer_trains_and_logs_the_balance_loss(tmp_path):
    from zoo.train.trainer import Trainer
    rec = zoo.load_recipe({**TOY_RECIPE, "model": {**TOY_RECIPE["model"], "ffn": MOE}})
    Trainer(rec, ToyData(), tmp_path, device="cpu", progress=False, log=lambda s: None).train()
    aux = [json.loads(line)["aux_loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # two MoE layers, each w E sum_e f_e P_e: w k for a uniform router (near init), at most w E k
    assert aux and all(2 * 0.1 * 2 * 0.75 < a < 2 * 0.1 * 4 * 2 for a in aux)


@pytest.mark.parametrize("groups,topk_group,normalize", [(1, 1, True), (4, 2, True), (2, 1, False)])
def test_sigmoid_router_equals_kimi_linears(groups, topk_group, normalize):
    """router: sigmoid (DeepSeek-V3's, as Kimi Linear routes): the same experts and weights as transformers'
    KimiLinearTopkRouter, correction bias and grouped top-k included."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.kimi_linear.modeling_kimi_linear import KimiLinearTopkRouter
    from zoo.ops.moe import route_sigmoid
    cfg = transformers.KimiLinearConfig(hidden_size=D, num_experts=8, num_experts_per_tok=3, num_expert_group=groups,
                                        topk_group=topk_group, moe_renormalize=normalize, routed_scaling_factor=2.5)
    router = KimiLinearTopkRouter(cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        router.weight.normal_()
        router.e_score_correction_bias.normal_(0.0, 0.3)
    x = torch.randn(17, D)
    _, want_w, want_e = router(x)
    _, w, e = route_sigmoid(x @ router.weight.T, 3, router.e_score_correction_bias, groups, topk_group, normalize, 2.5)
    order, want_order = e.sort(-1), want_e.sort(-1)
    assert torch.equal(order.values, want_order.values)
    torch.testing.assert_close(w.gather(1, order.indices), want_w.gather(1, want_order.indices))


def test_sigmoid_router_block_against_dense_twin():
    ffn = make(router="sigmoid", n_group=1, normalize_top_k=True, routed_scaling=2.0, aux_loss_weight=0.0)
    with torch.no_grad():
        ffn.correction_bias.normal_(0.0, 0.5)
    x = torch.randn(2, 9, D, dtype=torch.float64)
    from zoo.ops.moe import route_sigmoid
    flat = x.reshape(-1, D)
    _, w, e = route_sigmoid(flat @ ffn.router.weight.T, 2, ffn.correction_bias, 1, 1, True, 2.0)
    want = moe_swiglu_ref(flat, w, e, ffn.gate_up, ffn.down).view_as(x)
    got, aux = ffn(x)
    assert aux is None and "correction_bias" in dict(ffn.named_buffers())
    assert_close(got, want, 1e-12)


def test_bias_update_moves_overloaded_experts_down_and_underloaded_up():
    """bias_update_rate (DeepSeek-V3's aux-loss-free balancing): the training forwards' top-k slots per expert are
    counted; after the step the bias moves by the rate against sign(load - mean load), and the count restarts.
    Eval forwards count nothing."""
    ffn = make(router="sigmoid", normalize_top_k=True, aux_loss_weight=0.0, bias_update_rate=0.01)
    assert "load" not in ffn.state_dict()             # the count is not saved; the bias is
    x = torch.randn(3, 11, D, dtype=torch.float64)
    from zoo.ops.moe import expert_counts, route_sigmoid
    _, _, e = route_sigmoid(x.reshape(-1, D) @ ffn.router.weight.T, 2, ffn.correction_bias, 1, 1, True, 1.0)
    load = expert_counts(e, 4).double() * 2             # two training forwards
    ffn.eval()
    ffn(x)
    ffn.train()
    ffn(x)
    ffn(x)
    assert torch.equal(ffn.load, load)
    ffn.update_correction_bias()
    assert torch.equal(ffn.correction_bias, -0.01 * torch.sign(load - load.mean()))
    assert ffn.correction_bias.abs().sum() > 0 and not ffn.load.any()


def test_training_balances_a_skewed_router_without_a_loss(tmp_path):
    """A router skewed to one expert at the start: the trainer's step updates pull the loads together; the bias is
    saved with the checkpoint."""
    from zoo.train.trainer import Trainer
    ffn = {"type": "moe", "experts": 4, "top_k": 1, "hidden": 8, "router": "sigmoid", "aux_loss_weight": 0.0,
           "bias_update_rate": 0.05}
    rec = zoo.load_recipe({**TOY_RECIPE, "model": {**TOY_RECIPE["model"], "ffn": ffn}}, ["train.max_steps=30"])
    trainer = Trainer(rec, ToyData(), tmp_path, device="cpu", progress=False, log=lambda s: None)
    moe = [layer.ffn for layer in trainer.model.layers]
    with torch.no_grad():
        for m in moe:
            m.correction_bias[0] = 1.0    # every token to expert 0 at the start

    def spread(model):
        ids = torch.randint(0, TOY_RECIPE["model"]["vocab_size"], (4, 32), generator=torch.Generator().manual_seed(0))
        for m in model.modules():
            if isinstance(m, MoeFeedForward):
                m.load.zero_()
        model.train()
        with torch.no_grad():
            model(ids)
        loads = [m.load / m.load.sum() for m in model.modules() if isinstance(m, MoeFeedForward)]
        for m in moe:
            m.load.zero_()
        return max(load.max().item() for load in loads)

    before = spread(trainer.model)
    assert before == 1.0
    trainer.train()
    assert all(m.correction_bias.abs().sum() > 0 for m in moe)
    assert spread(trainer.model) < before
    saved = zoo.load_checkpoint(tmp_path)
    for a, b in zip(moe, [layer.ffn for layer in saved.layers]):
        assert torch.equal(a.correction_bias, b.correction_bias.to(a.correction_bias.dtype))
