"""FalconMambaForCausalLM (TII's Falcon Mamba): Mamba-1 whose dt, B and C pass through RMSNorms without weights
(transformers' FalconMambaWeightlessRMSNorm, eps mixer_rms_eps) before use: zoo's `mamba` with dt_bc_norm, its
norm weights left at their initial ones (the checkpoint has none). The rest is MambaForCausalLM's mapping."""
from __future__ import annotations

from zoo.convert import _conv_and_proj_params, _mamba_common, _silu_only, register_converter


@register_converter("FalconMambaForCausalLM")
def falcon_mamba(hf) -> tuple[dict, dict]:
    c = hf.config
    _silu_only(c)
    if c.intermediate_size != c.expand * c.hidden_size:
        raise ValueError(f"intermediate_size: {c.intermediate_size} != expand * hidden_size; zoo derives it")
    block = {"type": "mamba", "d_state": c.state_size, "d_conv": c.conv_kernel, "expand": c.expand,
             "dt_rank": int(c.time_step_rank), "conv_bias": bool(c.use_conv_bias), "bias": bool(c.use_bias),
             "dt_bc_norm": True, "dt_bc_norm_eps": float(c.mixer_rms_eps)}
    recipe, names = _mamba_common(c, block, _conv_and_proj_params(c) + ["x_proj.weight", "dt_proj.weight",
                                                                          "dt_proj.bias"])
    recipe["name"] = "falcon-mamba-import"
    return recipe, names
