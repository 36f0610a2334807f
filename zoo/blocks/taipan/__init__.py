"""Taipan's Selective Attention Layer (`taipan`): Nguyen et al., "Taipan: Efficient and Expressive
State Space Language Models with Selective Attention", arXiv 2410.18572, section 3.

What the paper specifies, and how this module reads it:

- Gating (eq. 1). A light network G: R^d -> R^2 scores every token, s_i = G(h_i). The paper does
  not say how deep G is; here it is one linear layer. Its bias starts at [0, log(C / (1 - C))] so
  that, with small weights, a token is drawn into attention with probability C at the first step
  (our choice; the model's re-initialisation leaves it alone).
- Selection (eqs. 2-3). Training draws m_i = argmax(s_i + g) with Gumbel(0, 1) noise g and passes
  gradients through the relaxed sample softmax((s_i + g) / tau) (straight-through Gumbel-softmax,
  Jang et al. 2017). Eq. 3 writes the relaxation as the probability of whichever class was drawn;
  we use the standard estimator on the "selected" component, m_i = hard_i + p_i - stop_grad(p_i)
  with p_i = softmax((s_i + g) / tau)[1], so that raising p_i always means "attend more". At
  evaluation m_i = [s_i1 > s_i0], the noise-free argmax: deterministic and, since it reads only
  token i's own representation, causal, which is what lets streaming be exact.
- Attention (eq. 4). Figure 2 feeds only the selected tokens into softmax attention, so the keys and
  values are those of selected tokens: a query at position i sees position j when j = i or when j is
  selected and i - window < j < i. The window counts sequence positions, not selected tokens
  (section 3.2 and figure 3c, which draws C = 0.3 with w = 5 over ten tokens: the sparser map is
  what "affords a longer window"); it includes the query itself, as `window` does everywhere in zoo.
- Refinement and augmentation (eq. 5). [1 - alpha_i, alpha_i] = softmax(s_i) (noise-free, no
  temperature), and a selected token becomes (1 - alpha_i) h_i + alpha_i o_i: the alpha_i share of
  h_i is removed and replaced by the attention output. Unselected tokens keep h_i. In zoo's pre-norm
  stack the block sees h = norm(x) and returns the update m_i alpha_i (o_i - h_i), so the layer
  computes x_i + m_i alpha_i (o_i - h_i): exactly x_i for unselected tokens.
- Feed-forward (eq. 6). All tokens then go through a residual SwiGLU: the layer's `ffn`, not this
  block (in recipes/taipan.yaml the SAL keeps the model's SwiGLU and the Mamba-2 layers have none).
- Positions (sections 3.2 and 5.2). The paper's attention has no positional embedding, which
  extrapolated better than RoPE in its ablation; `rope_base: null` (the default) follows it, a
  number turns on RoPE at absolute sequence positions (the ablation's other arm).
- Budget (eq. 7). L_constraint = sum over SALs of (C - sum_i m_i / L)^2 with m_i the straight-
  through mask; in training each block returns `aux_loss = aux_loss_weight * mean over the batch of
  (C - mean_i m_i)^2` beside its output (the model sums the blocks'), at evaluation its output alone. The paper names the
  weight lambda without a value; 1.0 is our default.

The straight-through gradient of an unselected token needs o_i, the attention output it would have
had if selected. Training therefore attends from every token (its own key plus the selected keys in
its window); forward values of unselected tokens are still exactly h_i. At evaluation only selected
tokens are projected and attended.

Packed documents (seq_idx): each document's attention runs alone (`zoo.ops.documents.per_document`), so
no window reaches across a boundary and RoPE positions restart; selection, gate and alpha are per token
already. Exact, at one op call per document (packed rows hold few). The capacity loss stays a mean over
the whole row (eq. 7 budgets a training sequence), the one quantity not computed per document.

Inference state: K, V and the selection flag of the last window - 1 positions (zeros for unselected
ones), so `state_bytes` stops growing at the window.

The attention op, `selective_window_attention`, and its dense twin live in zoo.ops.taipan.

    config.py  TaipanConfig
    cache.py   TaipanCache and its left-padding merge (unselected padding slots)
    block.py   TaipanBlock (`taipan`)
    cp.py      context parallel: a halo exchange of the window's K, V and selection flags
"""
from zoo.blocks.taipan.block import TaipanBlock
from zoo.blocks.taipan.cache import TaipanCache
from zoo.blocks.taipan.config import TaipanConfig

__all__ = ["TaipanBlock", "TaipanCache", "TaipanConfig"]
