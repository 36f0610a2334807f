"""Shared by the hybrid importers' tests: logits against transformers, greedy generate against transformers'."""
import torch

from zoo.convert import from_transformers
from zoo.hf import ZooForCausalLM


def randomised(hf, norm_centre: float = 1.0):
    """Every path visible: norms N(norm_centre, 0.3) (0 for the (1 + w) norms), biases N(0, 0.3), weight matrices and
    stacked experts N(0, 0.15), larger than their init, a router's expert bias N(0, 0.1)."""
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(norm_centre, 0.3)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.3)
            elif p.dim() >= 2:
                p.normal_(0.0, 0.15)
        for name, buf in hf.named_buffers():
            if name.endswith("expert_bias"):
                buf.normal_(0.0, 0.1)
    return hf


def compare_logits(hf, vocab, tol=1e-4, length=37):
    hf.eval()
    model = from_transformers(hf).eval()
    ids = torch.randint(0, vocab, (2, length))
    with torch.no_grad():
        want = hf(ids, use_cache=False).logits
        got = model(ids).logits
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err < tol, f"relative logit error {err:.2e}"
    return model


def compare_generate(hf, model, vocab, n=6, hf_generate=True):
    """zoo's greedy generate (through its caches) against transformers' generate, or, with hf_generate False
    (transformers' generate cannot run the config: an all-Mamba Bamba's cache has no attention layer to
    count the length by), against the argmax of transformers' full forward token by token."""
    ids = torch.randint(1, vocab, (1, 9))
    kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        if hf_generate:
            want = hf.generate(ids, **kw)
        else:
            want = ids
            for _ in range(n):
                want = torch.cat([want, hf(want, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], 1)
        got = ZooForCausalLM.from_zoo(model).generate(ids, **kw)
    assert got.tolist() == want.tolist()
