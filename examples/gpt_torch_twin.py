"""The PyTorch twin of ``train_gpt.py``'s TinyGPT: the same weights, the same dropout masks, the same steps.

It starts from the tensor-parallel model's own logical weights (a ``p = 1``
TinyGPT with the same seed), draws its dropout masks with tp_gpu's
``keep_mask`` (so they are the same bits), and trains with ``torch.optim.Adam``
and ``torch.nn.utils.clip_grad_norm_``: in float64 its loss curve coincides
with the tensor-parallel ones, and its steps per second are the baseline.
"""

from __future__ import annotations

import time
from typing import Any, Dict

import numpy as np
import torch
import torch.nn.functional as F
from train_gpt import GPTConfig, TinyGPT, batches

from tp_gpu import TensorParallelConfig
from tp_gpu.layers.dropout import keep_mask

TORCH_DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float32}


class TorchGPT(torch.nn.Module):
    """TinyGPT in PyTorch; parameter names follow tp_gpu's state dict (dots become underscores)."""

    def __init__(self, gpt: GPTConfig, state: Dict[str, np.ndarray], dtype: torch.dtype, seed: int) -> None:
        super().__init__()
        self.gpt, self.seed, self.step = gpt, seed, 0
        self.weights = torch.nn.ParameterDict(
            {
                name.replace(".", "_"): torch.nn.Parameter(torch.tensor(value, dtype=dtype))
                for name, value in state.items()
            }
        )

    def w(self, name: str) -> torch.Tensor:
        return self.weights[name.replace(".", "_")]

    def attention(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        batch, seq, hidden = x.shape
        heads = self.gpt.n_heads
        head_dim = hidden // heads
        qkv = x @ self.w(f"{prefix}.qkv.weight") + self.w(
            f"{prefix}.qkv.bias"
        )  # (B, S, 3H), per head [q|k|v]
        q, k, v = qkv.reshape(batch, seq, heads, 3, head_dim).permute(3, 0, 2, 1, 4)  # 3 x (B, nh, S, hd)
        context = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, S, hd)
        context = context.transpose(1, 2).reshape(batch, seq, hidden)  # (B, S, H)
        return context @ self.w(f"{prefix}.out.weight") + self.w(f"{prefix}.out.bias")

    def norm(self, t: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(t, (t.shape[-1],), self.w(f"{name}.weight"), self.w(f"{name}.bias"), 1e-5)

    def block(self, x: torch.Tensor, i: int) -> torch.Tensor:
        p = f"blocks.{i}"
        h = x + self.attention(self.norm(x, f"{p}.attention_norm"), f"{p}.attention")
        pre = self.norm(h, f"{p}.mlp_norm") @ self.w(f"{p}.mlp.fc1.weight") + self.w(f"{p}.mlp.fc1.bias")
        return (
            h + F.gelu(pre, approximate="tanh") @ self.w(f"{p}.mlp.fc2.weight") + self.w(f"{p}.mlp.fc2.bias")
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        wte = self.w("wte.weight")
        h = wte[ids] + self.w("wpe.weight")[: ids.shape[1]][None]
        if self.training and self.gpt.dropout:
            mask = keep_mask(np, self.gpt.dropout, self.seed + 2, self.step, tuple(h.shape), (Ellipsis,))
            h = h * torch.from_numpy(mask).to(h.dtype) / (1.0 - self.gpt.dropout)
            self.step += 1
        for i in range(self.gpt.n_layers):
            h = self.block(h, i)
        h = self.norm(h, "ln_f")
        return h @ wte.T  # tied head


def train_torch(data: np.ndarray, gpt: GPTConfig, args: Any) -> Dict[str, Any]:
    """Train the twin as ``train_gpt.train`` trains tp_gpu's model; return losses and seconds per step."""
    dtype = TORCH_DTYPES[args.dtype]
    reference = TinyGPT(gpt, TensorParallelConfig(n_workers=1, backend="numpy"), seed=args.seed)
    model = TorchGPT(gpt, reference.state_dict(), dtype, args.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    losses, times = [], []
    for step in range(args.steps):
        inputs, targets = batches(data, gpt.seq_len, args.batch, args.seed, step)
        start = time.perf_counter()
        optimizer.zero_grad()
        logits = model(torch.from_numpy(inputs))
        loss = F.cross_entropy(logits.reshape(-1, gpt.vocab), torch.from_numpy(targets).reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        optimizer.step()
        times.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
    return {"losses": losses, "seconds_per_step": float(np.median(times[1:] or times))}
