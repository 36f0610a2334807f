"""Recipe features: pattern tiling, extends, per-block FFN override, dotlist overrides, round trip."""
import textwrap

import zoo


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_pattern_tiles_over_layers(tmp_path):
    path = _write(tmp_path, "r.yaml", """
        model:
          d_model: 32
          n_layers: 6
          pattern: "AAS"
          blocks: {A: {type: attn, n_heads: 2}, S: {type: swa, n_heads: 2, window: 4}}
        train: {seq_len: 16}
    """)
    recipe = zoo.load_recipe(path)
    assert [layer.letter for layer in recipe.layers] == list("AASAAS")
    assert recipe.name == "r"  # defaults to the file's stem


def test_extends_merges_underneath_and_overrides_win(tmp_path):
    _write(tmp_path, "_base.yaml", """
        model:
          d_model: 32
          n_layers: 2
          pattern: "A"
          blocks: {A: {type: attn, n_heads: 2}}
          ffn: {type: mlp, mult: 2}
        train: {seq_len: 16, lr: 1.0e-3}
    """)
    child = _write(tmp_path, "child.yaml", """
        extends: _base.yaml
        name: child
        model:
          blocks: {A: {n_kv_heads: 1}}
        train: {lr: 5.0e-3}
    """)
    recipe = zoo.load_recipe(child, ["model.d_model=64"])
    assert recipe.name == "child" and recipe.model.d_model == 64 and recipe.train.lr == 5e-3
    cfg = recipe.layers[0].cfg
    assert (cfg.n_heads, cfg.n_kv_heads) == (2, 1)
    assert recipe.layers[0].ffn.type == "mlp" and recipe.layers[0].ffn.mult == 2


def test_per_block_ffn_override(tmp_path):
    path = _write(tmp_path, "r.yaml", """
        model:
          d_model: 32
          n_layers: 3
          pattern: "ABN"
          blocks:
            A: {type: attn, n_heads: 2}
            B: {type: blockwise, n_heads: 2, block_size: 8, ffn: {chunk: 8}}
            N: {type: attn, n_heads: 2, ffn: none}
          ffn: {type: swiglu, mult: 2}
        train: {seq_len: 16}
    """)
    model = zoo.build_model(path)
    a, b, n = model.layers
    assert a.ffn.cfg.type == "swiglu" and a.ffn.cfg.chunk is None
    assert b.ffn.cfg.type == "swiglu" and b.ffn.cfg.chunk == 8 and b.ffn.cfg.mult == 2
    assert n.ffn is None and n.ffn_norm is None


def test_resolved_yaml_round_trips(recipes_dir, tmp_path):
    recipe = zoo.load_recipe(recipes_dir / "masformer.yaml", ["model.d_model=128"])
    again = zoo.load_recipe(_write(tmp_path, "again.yaml", recipe.to_yaml()))
    assert again.to_dict() == recipe.to_dict()
    assert [(layer.type, layer.cfg) for layer in again.layers] == [(layer.type, layer.cfg) for layer in recipe.layers]


def test_a_recipe_extending_another_without_a_name_is_named_after_its_file(tmp_path):
    _write(tmp_path, "base.yaml", """
        name: base
        model: {d_model: 32, n_layers: 1, pattern: "A", blocks: {A: {type: attn, n_heads: 2}}}
        train: {seq_len: 16}
    """)
    _write(tmp_path, "wide.yaml", "extends: base.yaml\nmodel: {d_model: 64}\n")
    _write(tmp_path, "deep.yaml", "extends: base.yaml\nmodel: {n_layers: 2}\n")
    _write(tmp_path, "deeper.yaml", "extends: deep.yaml\nmodel: {n_layers: 4}\n")
    names = {stem: zoo.load_recipe(tmp_path / f"{stem}.yaml").name for stem in ("base", "wide", "deep", "deeper")}
    assert names == {"base": "base", "wide": "wide", "deep": "deep", "deeper": "deeper"}
