"""Per-layer statistics of PMG write weights: how much each layer writes, and how long its channels remember.

A channel that retains a_t = 1 - w_t of its memory at step t keeps prod(a_t) of it after L steps, which decays like
a constant retention ā = exp(mean log a_t) (the geometric mean). Its memory horizon is 1 / (1 - ā): the number of
steps over which a write stays visible. Channels whose horizon exceeds the training block size carry information
across whole blocks.
"""

from collections.abc import Callable, Sequence

import torch


class GateStatistics:
    """Running sums over the real tokens of many batches, for the PMG layers `layer_indices` of one model, whose
    memories have `channels` channels each (`PMGConfig.pmg_inner_size`: expand x hidden_size)."""

    def __init__(self, layer_indices: Sequence[int], channels: int, horizon: int):
        self.layer_indices = list(layer_indices)
        self.horizon = horizon
        self.write_sums = torch.zeros(len(self.layer_indices), channels, dtype=torch.float64)
        self.log_retention_sums = torch.zeros_like(self.write_sums)
        self.token_count = torch.zeros((), dtype=torch.float64)

    def update(self, gates: Sequence[torch.Tensor], attention_mask: torch.Tensor | None = None) -> None:
        """Add one batch: `gates` as returned by `output_gates=True`, one (B, T, D) tensor per PMG layer."""
        if len(gates) != len(self.layer_indices):
            raise ValueError(f"Expected write weights of {len(self.layer_indices)} PMG layers, got {len(gates)}.")
        if not gates:  # a stack of attention layers alone: no memory to describe
            return
        for position, write in enumerate(gates):
            write = write.detach().double()
            weights = torch.ones(write.shape[:2], dtype=write.dtype, device=write.device)
            if attention_mask is not None:
                weights = attention_mask.to(write)
            retention = (1 - write).clamp_min(torch.finfo(torch.float32).tiny)
            self.write_sums[position] += torch.einsum("btd,bt->d", write, weights).cpu()
            self.log_retention_sums[position] += torch.einsum("btd,bt->d", retention.log(), weights).cpu()
        self.token_count += weights.sum().cpu()

    def per_channel(
        self, reduce: Callable[[torch.Tensor], torch.Tensor] = lambda sums: sums
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean write weight and memory horizon of every channel, each (num PMG layers, D). `reduce` sums the
        running totals across processes (e.g. `accelerator.reduce`) before they are read."""
        totals = reduce(torch.stack([self.write_sums, self.log_retention_sums]))
        count = reduce(self.token_count.clone()).clamp_min(1)
        mean_write, mean_log_retention = totals[0] / count, totals[1] / count
        horizon = 1 / (-torch.expm1(mean_log_retention)).clamp_min(torch.finfo(torch.float64).tiny)
        return mean_write, horizon

    def summary(self, reduce: Callable[[torch.Tensor], torch.Tensor] = lambda sums: sums) -> list[dict]:
        """One row per PMG layer: `layer`, `mean_write` and `long_memory_fraction` (see `per_channel`)."""
        mean_write, horizon = self.per_channel(reduce)
        return [
            {
                "layer": layer,
                "mean_write": mean_write[position].mean().item(),
                "long_memory_fraction": (horizon[position] > self.horizon).double().mean().item(),
            }
            for position, layer in enumerate(self.layer_indices)
        ]
