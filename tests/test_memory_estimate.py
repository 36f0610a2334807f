"""The memory estimate: exact parameter counts from the recipe alone, and the refusal of a model that cannot fit
before anything is allocated."""
import pytest
import torch

import zoo
from tests.helpers import every_block_recipe
from zoo.memory import available_memory, check_memory, estimate_memory, kept_for_backward, memory_cap, parse_memory

TINY = {"name": "tiny", "model": {"d_model": 32, "n_layers": 2, "vocab_size": 64, "pattern": "A",
                                  "blocks": {"A": {"type": "attn", "n_heads": 2}}}, "train": {"seq_len": 16}}


@pytest.mark.parametrize("tie", [False, True])
def test_estimate_counts_every_blocks_parameters_exactly(tie):
    recipe = zoo.load_recipe(every_block_recipe("every", 32, 64, 16, tie_embeddings=tie))
    est = estimate_memory(recipe)
    model = zoo.build_model(recipe)
    assert est.params == model.num_params()["total"]
    assert est.weight_bytes == sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def test_training_adds_gradients_adamw_and_activations():
    recipe = zoo.load_recipe(TINY)
    inference, training = estimate_memory(recipe), estimate_memory(recipe, training=True, batch_size=4, seq_len=8)
    assert training.optimizer_bytes == 3 * inference.weight_bytes
    assert training.activation_bytes > 0 and training.total > inference.total
    assert "train.batch_size 4 x train.seq_len 8" in training.describe()


def test_a_huge_d_model_is_refused_before_allocating():
    # 7.2e13 parameters: 268,223 GiB in float32. Without the check this tries to allocate them.
    with pytest.raises(zoo.RecipeError) as err:
        zoo.build_model("recipes/transformer.yaml", ["model.d_model=1000000"])
    message = str(err.value)
    assert message.startswith("model.d_model: 1000000 (with model.n_layers 6, model.vocab_size 256) needs an estimated ")
    for word in ("268,223.2 GiB", "72,000,621,000,000 parameters in float32", "GiB available on cpu", "--max-memory"):
        assert word in message, f"{word!r} missing from: {message}"
    assert "\n" not in message


def test_a_huge_vocabulary_names_model_vocab_size():
    with pytest.raises(zoo.RecipeError, match=r"^model\.vocab_size: 1000000000 \(with model\.d_model 256\) needs"):
        zoo.build_model("recipes/transformer.yaml", ["model.vocab_size=1000000000"])


def test_training_activations_name_the_batch():
    recipe = zoo.load_recipe(TINY, ["train.batch_size=100000", "train.seq_len=100000"])
    with pytest.raises(zoo.RecipeError, match=r"^train\.batch_size: 100000 x train\.seq_len 100000 needs .* of activations"):
        check_memory(recipe, training=True)


def test_max_memory_caps_and_lifts_the_check():
    with pytest.raises(zoo.RecipeError, match=r"^model\.d_model: 32 .* more than the 1\.0 KiB max_memory cap"):
        zoo.build_model(TINY, max_memory="1KiB")
    with memory_cap("1KiB"), pytest.raises(zoo.RecipeError, match="max_memory cap"):
        zoo.build_model(TINY)   # the cap reaches models built for you (load_checkpoint, Trainer)
    zoo.build_model(TINY)       # ... and only inside the block
    assert check_memory(zoo.load_recipe("recipes/transformer.yaml", ["model.d_model=1000000"]), "inf") is None


def test_a_model_built_on_the_meta_device_is_not_checked():
    with torch.device("meta"):
        model = zoo.build_model("recipes/transformer.yaml", ["model.d_model=1000000"])
    assert next(model.parameters()).is_meta


@pytest.mark.parametrize("value,bytes_", [("64GiB", 64 * 2**30), ("512MB", 512e6), ("1.5e9", 1.5e9), (4096, 4096),
                                          ("inf", float("inf")), (None, None)])
def test_parse_memory(value, bytes_):
    assert parse_memory(value) == bytes_


@pytest.mark.parametrize("value,match", [("abc", "expected bytes or a size such as 64GiB"), ("12XB", "expected bytes"),
                                         ("0", "must be > 0"), (-1, "must be > 0")])
def test_parse_memory_errors_name_the_field(value, match):
    with pytest.raises(zoo.RecipeError, match=rf"^--max-memory: {match}"):
        parse_memory(value, "--max-memory")


def test_available_memory_on_cpu():
    found = available_memory("cpu")
    assert found is None or (found[0] > 0 and "cpu" in found[1])


def test_kept_for_backward_counts_each_saved_storage_once_without_the_weights():
    linear = torch.nn.Linear(8, 16)
    x = torch.randn(5, 8, requires_grad=True)
    # a linear layer keeps its input for the weight's gradient; the weight it keeps is left out
    assert kept_for_backward(lambda: linear(x), list(linear.parameters())) == x.nbytes
    # x * x keeps x (twice: one storage); exp keeps its output
    assert kept_for_backward(lambda: (x * x).exp()) == x.nbytes + x.nbytes


# the layers that keep the most a token (KDA, RG-LRU, a shared block's use, Gated DeltaNet, MoE) beside the
# plain ones; 640 tokens: 1.25x the probe's length, not a multiple of it
@pytest.mark.parametrize("name,overrides", [
    ("kimi-linear", []), ("recurrent-gemma", []), ("zamba2", ["model.pattern=MHJ"]), ("qwen3-next", []),
    ("jamba-moe", []), ("taipan", []), ("transformer", []), ("mamba2", [])])
def test_activation_estimate_bounds_what_backward_keeps(name, overrides):
    pattern = zoo.load_recipe(f"recipes/{name}.yaml", overrides).model.pattern   # each letter once or more
    recipe = zoo.load_recipe(f"recipes/{name}.yaml",
                             overrides + ["train.seq_len=1024", f"model.n_layers={len(pattern)}"])
    est = estimate_memory(recipe, training=True, batch_size=2, seq_len=640)
    torch.manual_seed(0)
    model, ids = zoo.build_model(recipe), torch.randint(0, recipe.model.vocab_size, (2, 640))
    measured = kept_for_backward(lambda: model(ids, labels=ids), list(model.parameters()))
    # above by at most a fifth: the logits' three copies are a bound (the loss reads them block by block)
    assert measured <= est.activation_bytes <= 1.2 * measured, (measured, est.activation_bytes)


def test_probing_the_layers_leaves_the_random_state_alone():
    recipe = zoo.load_recipe("recipes/zamba2.yaml", ["model.pattern=MH", "model.n_layers=2", "train.seq_len=64"])
    torch.manual_seed(0)
    estimate_memory(recipe, training=True)
    after = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(torch.rand(3), after)


def test_checkpointed_layers_keep_their_inputs_and_one_layer():
    recipe = zoo.load_recipe("recipes/transformer.yaml", ["model.n_layers=4", "train.seq_len=256"])
    checkpointed = zoo.load_recipe("recipes/transformer.yaml", ["model.n_layers=4", "train.seq_len=256",
                                                                "train.activation_checkpointing=true"])
    full = estimate_memory(recipe, training=True, batch_size=1).activation_bytes
    ckpt = estimate_memory(checkpointed, training=True, batch_size=1).activation_bytes
    m, tokens = recipe.model, 256
    model_part = tokens * (2 * m.d_model + 3 * m.vocab_size) * 4
    layer = (full - model_part) / 4                                  # the four layers are alike
    assert ckpt == pytest.approx(model_part + layer + 4 * tokens * m.d_model * 4, rel=1e-6)


def test_the_estimate_is_the_same_under_no_grad_and_in_float64():
    recipe = zoo.load_recipe("recipes/transformer.yaml", ["model.n_layers=2", "train.seq_len=128"])
    plain = estimate_memory(recipe, training=True).activation_bytes
    zoo.memory._PROBED.clear()
    with torch.no_grad():
        assert estimate_memory(recipe, training=True).activation_bytes == plain
    zoo.memory._PROBED.clear()
    with torch.inference_mode():
        assert estimate_memory(recipe, training=True).activation_bytes == plain
    zoo.memory._PROBED.clear()
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:   # the layers keep float64 values (about twice the bytes: some saved tensors are integer or boolean);
        m = recipe.model     # the model-level part stays counted in float32
        model_part = recipe.train.batch_size * 128 * (2 * m.d_model + 3 * m.vocab_size) * 4
        assert estimate_memory(recipe, training=True).activation_bytes - model_part == pytest.approx(
            2 * (plain - model_part), rel=0.05)
    finally:
        torch.set_default_dtype(default)
        zoo.memory._PROBED.clear()


def test_a_layer_too_large_to_probe_is_bounded_not_built():
    # one layer of d_model 20,000 holds ~5e9 parameters (19 GiB): estimated without allocating it
    recipe = zoo.load_recipe("recipes/transformer.yaml", ["model.d_model=20000", "model.n_layers=2",
                                                            "train.seq_len=64"])
    est = estimate_memory(recipe, training=True, batch_size=1)
    m = recipe.model
    per_token = (2 * 128 + 2) * m.d_model + 3 * m.vocab_size     # two layers at the bound, the model's part
    assert est.activation_bytes == 64 * per_token * 4
