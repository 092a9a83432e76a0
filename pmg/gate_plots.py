"""Pictures of what PMG gates do on a text: per PMG layer, a heatmap of write weights w over the tokens, and a
histogram of the channels' memory horizons 1 / (1 - ā) (see `pmg.gate_statistics`)."""

from pathlib import Path

import torch
from matplotlib.figure import Figure  # the object API: no pyplot state, no display backend needed
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .gate_statistics import GateStatistics


@torch.no_grad()
def plot_gates(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    path: str | Path,
    max_tokens: int = 64,
    horizon: int | None = None,
) -> Path:
    """Draw the gates of `model` (with PMG layers) on the first `max_tokens` tokens of `text` into a PNG at `path`.

    `horizon` marks a span on the histograms (the training block size, say); memory horizons are measured over the
    whole text given, not only the tokens shown.
    """
    if max_tokens < 1 or (horizon is not None and horizon < 1):
        raise ValueError(f"max_tokens and horizon must be at least 1, got max_tokens={max_tokens}, horizon={horizon}.")
    layers = list(getattr(model.config, "pmg_layer_indices", []))
    if not layers:
        raise ValueError("The model has no PMG layers, so there are no gates to plot.")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    if ids.shape[1] == 0:
        raise ValueError("The text is empty: there are no tokens to plot gates over.")
    model.eval()
    gates = model(ids.to(model.device), output_gates=True).gates
    statistics = GateStatistics(layers, model.config.pmg_inner_size, horizon or ids.shape[1])
    statistics.update(gates)
    _, horizons = statistics.per_channel()

    shown = min(max_tokens, ids.shape[1])
    labels = [tokenizer.decode([token]).replace("\n", "\\n") for token in ids[0, :shown].tolist()]
    figure = Figure(figsize=(14, 2.8 * len(layers)))
    axes = figure.subplots(len(layers), 2, squeeze=False, gridspec_kw={"width_ratios": [4, 1]})
    for row, (layer, write) in enumerate(zip(layers, gates, strict=True)):
        heatmap, histogram = axes[row]
        image = heatmap.imshow(
            write[0, :shown].T.float().cpu(), aspect="auto", cmap="magma", vmin=0, vmax=1, interpolation="nearest"
        )
        heatmap.set_title(f"layer {layer}: write weight w (channels x tokens)")
        heatmap.set_ylabel("channel")
        heatmap.set_xticks(range(shown), labels if row == len(layers) - 1 else [""] * shown, rotation=90, fontsize=6)
        figure.colorbar(image, ax=heatmap, fraction=0.02)
        histogram.hist(horizons[row].clamp(max=1e6).log10().numpy(), bins=30, color="tab:blue")
        histogram.set_title(f"layer {layer}: memory horizons")
        histogram.set_xlabel("log10(1 / (1 - ā)) tokens")
        if horizon:
            histogram.axvline(torch.tensor(float(horizon)).log10().item(), color="tab:red", linestyle="--")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=100)
    return path
