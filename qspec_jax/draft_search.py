"""Choose the draft's decoder layers without training (issue: cheaper drafts).

Greedy backward elimination: starting from all layers, repeatedly drop the layer whose removal
most improves the predicted QSpec speed, and stop when no removal helps. For a layer subset the
acceptance proxy ``a`` is the teacher-forced top-1 agreement of the draft (draft mode, those
layers, optional window) with verify mode (w4a16) on held-out tokens; the speed model is the
cost model's: a cycle of gamma drafts costs ``gamma * r + 1`` verify steps, with the draft's
relative cost r = ``draft_cost`` (a full draft step over a verify step, e.g. the measured
T_w4a8 / T_w4a16 ratio) scaled by the share of layers it runs (plus the embedding/lm_head
share), and yields E(gamma, a) tokens. The proxy is approximate (in QSpec the draft reads the verifier's
K/V for committed positions), so measure the chosen subset with ``generate`` afterwards.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from . import api
from .cost_model import expected_tokens

HEAD_SHARE = 0.5  # embedding + lm_head cost, in units of one decoder layer


@dataclasses.dataclass
class LayerSearchStep:
    layers: tuple[int, ...]
    agreement: float
    predicted_speedup: float
    gamma: int


def draft_agreement(model, tokens: np.ndarray, draft: str = "w4a8", layers=None, window=None,
                    kernels: str = "auto") -> float:
    """Fraction of positions where the draft's greedy next token equals verify mode's."""
    verify = np.asarray(api.logits(model, tokens, mode="w4a16", kernels=kernels)).argmax(-1)
    drafted = np.asarray(api.logits(model, tokens, mode=draft, kernels=kernels, layers=layers,
                                    window=window)).argmax(-1)
    return float((verify == drafted).mean())


def predicted_speedup(agreement: float, n_layers: int, total_layers: int, max_gamma: int = 7,
                      draft_cost: float = 1.0):
    """(best speedup over verify-mode AR, its gamma) under the layer-proportional cost model."""
    r = draft_cost * (n_layers + HEAD_SHARE) / (total_layers + HEAD_SHARE)
    best = max((expected_tokens(g, agreement) / (g * r + 1.0), g) for g in range(max_gamma + 1))
    return best


def select_draft_layers(model, tokens: np.ndarray, draft: str = "w4a8", *, window=None,
                        min_layers: int = 1, max_gamma: int = 7, draft_cost: float = 1.0,
                        kernels: str = "auto") -> tuple[tuple[int, ...], list[LayerSearchStep]]:
    """Greedy layer subset for the draft; returns (layers, the search history)."""
    total = model.cfg.num_hidden_layers

    def evaluate(layers):
        a = draft_agreement(model, tokens, draft, layers if len(layers) < total else None, window,
                            kernels)
        speed, gamma = predicted_speedup(a, len(layers), total, max_gamma, draft_cost)
        return LayerSearchStep(layers, a, speed, gamma)

    current = evaluate(tuple(range(total)))
    history = [current]
    while len(current.layers) > min_layers:
        candidates = [evaluate(tuple(l for l in current.layers if l != drop))
                      for drop in current.layers]
        best = max(candidates, key=lambda s: s.predicted_speedup)
        if best.predicted_speedup <= current.predicted_speedup:
            break
        current = best
        history.append(current)
    return current.layers, history
