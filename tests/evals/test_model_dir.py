"""An imported model directory (issue 19 part 4): a tiny transformers Bamba -> `zoo.convert.from_transformers` ->
`ZooForCausalLM.save_pretrained(dir)` is a recipe for `zoo eval` and `zoo compare`, evaluated like a checkpoint
(the README's round trip)."""
import json

import pytest
import torch

import zoo
import zoo.convert
from evals.commands import compare as compare_cmd
from evals.commands import eval as eval_cmd
from tests.helpers import write_prepared
from zoo.hf import ZooForCausalLM
from zoo.train.checkpoint import is_model_dir, resolve_checkpoint

transformers = pytest.importorskip("transformers")


@pytest.fixture
def bamba_dir(tmp_path):
    cfg = transformers.BambaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=256, attn_layer_indices=[1], mamba_n_heads=8,
                                   mamba_d_head=8, mamba_d_state=8, mamba_chunk_size=8, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = zoo.convert.from_transformers(transformers.BambaForCausalLM(cfg))
    ZooForCausalLM.from_zoo(model).save_pretrained(tmp_path / "bamba-tiny")
    return model, tmp_path / "bamba-tiny"


def test_loads_like_a_checkpoint(bamba_dir):
    model, path = bamba_dir
    assert is_model_dir(path) and resolve_checkpoint(path) == path
    ids = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        assert torch.equal(zoo.load_checkpoint(path)(ids).logits, model(ids).logits)
    recipe, ckpt = compare_cmd.resolve(str(path), [])
    assert ckpt == path and recipe.to_dict() == model.recipe.to_dict()


def test_zoo_eval_on_an_imported_directory(bamba_dir, tmp_path, capsys):
    _, path = bamba_dir
    data = write_prepared(tmp_path / "data")
    out = tmp_path / "eval.json"
    rc = eval_cmd.main([str(path), "--data", str(data), "--contexts", "16,32", "--max-tokens", "64",
                        "--batch-size", "2", "--out", str(out)])
    assert rc in (0, None), capsys.readouterr().err
    result = json.loads(out.read_text())
    assert result["recipe"] == "bamba-import" and result["records"]
    assert all(0 < r["bits_per_byte"] < 20 for r in result["records"])
