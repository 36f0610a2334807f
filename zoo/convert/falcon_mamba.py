"""FalconMambaForCausalLM (TII's Falcon Mamba): Mamba-1 whose dt, B and C pass through RMSNorms without weights
(transformers' FalconMambaWeightlessRMSNorm, eps mixer_rms_eps) before use: zoo's `mamba` with dt_bc_norm, its
norm weights left at their initial ones (the checkpoint has none). The rest is MambaForCausalLM's mapping."""
from __future__ import annotations

from zoo.convert import _mamba_common, mamba1_block, register_converter


@register_converter("FalconMambaForCausalLM")
def falcon_mamba(hf) -> tuple[dict, dict]:
    c = hf.config
    block, params = mamba1_block(c)
    recipe, names = _mamba_common(c, {**block, "dt_bc_norm": True, "dt_bc_norm_eps": float(c.mixer_rms_eps)}, params)
    recipe["name"] = "falcon-mamba-import"
    return recipe, names
