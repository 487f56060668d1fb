"""A dense NumPy float64 twin of examples/train_tiny_lm.py's TinyLM, written independently.

No tp_gpu code is used: the lookup, GELU, linears, cross-entropy, their
gradients and Adam are written out here from their textbook definitions, so
that agreement with the tensor-parallel model checks the library's math and
communication, not a shared helper.
"""

from __future__ import annotations

from typing import Dict, List

import numpy as np


def gelu(x):
    c = np.sqrt(2.0 / np.pi)
    return 0.5 * x * (1.0 + np.tanh(c * (x + 0.044715 * x**3)))


def gelu_grad(x):
    c = np.sqrt(2.0 / np.pi)
    t = np.tanh(c * (x + 0.044715 * x**3))
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t**2) * c * (1.0 + 3 * 0.044715 * x**2)


def cross_entropy(logits, targets):
    """Mean cross-entropy and its gradient, from log-softmax."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    rows = targets.size
    picked = np.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    grad = np.exp(log_probs)
    np.put_along_axis(grad, targets[..., None], np.take_along_axis(grad, targets[..., None], -1) - 1.0, -1)
    return -picked.mean(), grad / rows


class DenseTinyLM:
    def __init__(self, weights: Dict[str, np.ndarray], lr: float, betas=(0.9, 0.999), eps=1e-8) -> None:
        self.w = {k: np.array(v, dtype=np.float64) for k, v in weights.items()}
        self.m = {k: np.zeros_like(v) for k, v in self.w.items()}
        self.v = {k: np.zeros_like(v) for k, v in self.w.items()}
        self.lr, self.betas, self.eps, self.t = lr, betas, eps, 0

    def step(self, inputs: np.ndarray, targets: np.ndarray) -> float:
        w = self.w
        e = w["embed"][inputs]
        pre = e @ w["fc1.weight"] + w["fc1.bias"]
        act = gelu(pre)
        h = e + act @ w["fc2.weight"] + w["fc2.bias"]
        logits = h @ w["head.weight"] + w["head.bias"]
        loss, g_logits = cross_entropy(logits, targets)

        flat = lambda a: a.reshape(-1, a.shape[-1])  # noqa: E731
        g = {}
        g["head.weight"] = flat(h).T @ flat(g_logits)
        g["head.bias"] = flat(g_logits).sum(0)
        g_h = g_logits @ w["head.weight"].T
        g["fc2.weight"] = flat(act).T @ flat(g_h)
        g["fc2.bias"] = flat(g_h).sum(0)
        g_pre = (g_h @ w["fc2.weight"].T) * gelu_grad(pre)
        g["fc1.weight"] = flat(e).T @ flat(g_pre)
        g["fc1.bias"] = flat(g_pre).sum(0)
        g_e = g_h + g_pre @ w["fc1.weight"].T
        g["embed"] = np.zeros_like(w["embed"])
        np.add.at(g["embed"], inputs.reshape(-1), flat(g_e))
        self._adam(g)
        return float(loss)

    def _adam(self, grads: Dict[str, np.ndarray]) -> None:
        b1, b2 = self.betas
        self.t += 1
        for k, g in grads.items():
            self.m[k] = b1 * self.m[k] + (1 - b1) * g
            self.v[k] = b2 * self.v[k] + (1 - b2) * g * g
            m_hat = self.m[k] / (1 - b1**self.t)
            v_hat = self.v[k] / (1 - b2**self.t)
            self.w[k] = self.w[k] - self.lr * m_hat / (np.sqrt(v_hat) + self.eps)


def train_dense(weights, batches, lr: float) -> List[float]:
    model = DenseTinyLM(weights, lr)
    return [model.step(x, t) for x, t in batches]
