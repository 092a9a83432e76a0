"""PMG, its ablations and the usual baselines behind one interface, at matched parameter counts.

Every model is `encoder -> backbone -> head`: a token embedding (or a linear projection of continuous features), a
stack of sequence layers of some width, and a linear head giving per-position outputs. Backbones:

    pmg            PMGModel, 4 PMG blocks
    pmg-sigmoid    same, gate shape frozen at its initial k = n = 1, m = 0: a plain sigmoid gate
    pmg-no-floor   same, memory floor f fixed at ~0 (floor_logit = -30, frozen)
    pmg-hybrid     PMGModel, 4 blocks of which the third is full attention
    llama          transformers LlamaModel, 2 blocks (SDPA attention)
    lstm, gru      torch nn.LSTM / nn.GRU, 4 layers

The depths follow Zoology's MQAR setup (2 layers for attention, 4 for the others). `matched_width` picks each
model's width so that its backbone has about as many parameters as PMG's at a nominal width: multiples of 4, since
steps of 8 leave the LSTM 15-20% off at width 32.
"""

import torch
from torch import nn
from transformers import LlamaConfig, LlamaModel, PreTrainedModel

from .configuration_pmg import PMG_LAYER_TYPE, PMGConfig
from .memory_tasks import MemoryTask
from .modeling_pmg import PMGLayer, PMGModel
from .optimization import GATE_SHAPE_PARAMETERS

MODEL_NAMES = ("pmg", "pmg-sigmoid", "pmg-no-floor", "pmg-hybrid", "llama", "lstm", "gru")
PMG_MODELS = MODEL_NAMES[:4]
BASELINES = MODEL_NAMES[4:]
ABLATIONS = MODEL_NAMES[1:3]
NUM_LAYERS = {"llama": 2}  # every other model: DEFAULT_NUM_LAYERS
DEFAULT_NUM_LAYERS = 4
NUM_ATTENTION_HEADS = 2
GATE_SHAPE = tuple(name for name in GATE_SHAPE_PARAMETERS if name != "floor_logit")  # k, m, n: not the floor
NO_FLOOR_LOGIT = -30.0  # sigmoid(-30) ~ 1e-13: no lower bound on retention


class TransformersBackbone(nn.Module):
    """A transformers base model (PMGModel, LlamaModel) fed embeddings; its own 1-token embedding goes unused."""

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.model(inputs_embeds=hidden_states, use_cache=False).last_hidden_state


class RecurrentBackbone(nn.Module):
    """A stack of torch recurrent layers (nn.LSTM or nn.GRU, batch first)."""

    def __init__(self, rnn: nn.LSTM | nn.GRU):
        super().__init__()
        self.rnn = rnn

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.rnn(hidden_states)[0]


class SequenceModel(nn.Module):
    """encoder -> backbone -> head: (B, T) token ids or (B, T, F) features to (B, T, output_size) outputs."""

    def __init__(self, backbone: nn.Module, width: int, input_size: int, output_size: int, token_inputs: bool):
        super().__init__()
        self.encoder = nn.Embedding(input_size, width) if token_inputs else nn.Linear(input_size, width)
        self.backbone = backbone
        self.head = nn.Linear(width, output_size)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(self.encoder(inputs)))


def matched_llama_config(reference: PMGConfig, **overrides) -> LlamaConfig:
    """A Llama of the PMG config's vocabulary, width, depth, MLP size and heads, with tied embeddings: the
    Transformer baseline on equal terms (pretraining's --model_type llama, scripts/benchmark.py, the llama backbone)."""
    return LlamaConfig(
        vocab_size=reference.vocab_size,
        hidden_size=reference.hidden_size,
        intermediate_size=reference.intermediate_size,
        num_hidden_layers=reference.num_hidden_layers,
        num_attention_heads=reference.num_attention_heads,
        tie_word_embeddings=True,
        **overrides,
    )


def build_backbone(name: str, width: int, max_length: int = 4096) -> nn.Module:
    """The backbone `name` (one of MODEL_NAMES) at `width`, with its ablation applied."""
    num_layers = NUM_LAYERS.get(name, DEFAULT_NUM_LAYERS)
    layer_types = [PMG_LAYER_TYPE] * num_layers
    if name == "pmg-hybrid":
        layer_types[num_layers // 2] = "full_attention"
    config = PMGConfig(
        vocab_size=1,
        hidden_size=width,
        num_hidden_layers=num_layers,
        layer_types=layer_types,
        gate_rank=width // 4,  # the default 64 at width 256
        num_attention_heads=NUM_ATTENTION_HEADS,
        max_position_embeddings=max_length,
    )
    if name in PMG_MODELS:
        backbone = TransformersBackbone(PMGModel(config))
        if name == "pmg-sigmoid":
            freeze_gate_shape(backbone)
        elif name == "pmg-no-floor":
            remove_memory_floor(backbone)
        return backbone
    if name == "llama":
        llama = matched_llama_config(
            config, max_position_embeddings=max_length, bos_token_id=None, eos_token_id=None, attn_implementation="sdpa"
        )
        return TransformersBackbone(LlamaModel(llama))
    if name in ("lstm", "gru"):
        rnn_class = nn.LSTM if name == "lstm" else nn.GRU
        return RecurrentBackbone(rnn_class(width, width, num_layers, batch_first=True))
    raise ValueError(f"Unknown model {name!r}; choose from {MODEL_NAMES}.")


def freeze_gate_shape(model: nn.Module) -> None:
    """Freeze every PMG layer's sharpness, shift and asymmetry at their current values (k = n = 1, m = 0 fresh)."""
    for layer in pmg_layers(model):
        for name in GATE_SHAPE:
            getattr(layer, name).requires_grad_(False)


def remove_memory_floor(model: nn.Module) -> None:
    """Set every PMG layer's memory floor to ~0 and freeze it."""
    for layer in pmg_layers(model):
        with torch.no_grad():
            layer.floor_logit.fill_(NO_FLOOR_LOGIT)
        layer.floor_logit.requires_grad_(False)


def pmg_layers(model: nn.Module) -> list[PMGLayer]:
    """Every PMG layer inside `model`."""
    return [module for module in model.modules() if isinstance(module, PMGLayer)]


def num_parameters(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def matched_width(name: str, target_parameters: int, max_width: int) -> int:
    """The multiple of 4 up to `max_width` whose backbone `name` has the parameter count closest to the target."""
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        counts = {width: num_parameters(build_backbone(name, width)) for width in range(8, max_width + 1, 4)}
    return min(counts, key=lambda width: (abs(counts[width] - target_parameters), width))


def build_model(name: str, width: int, task: MemoryTask) -> SequenceModel:
    """Model `name` with a backbone of `width`, an encoder for the task's inputs and a head for its outputs."""
    backbone = build_backbone(name, width, max_length=task.length)
    return SequenceModel(backbone, width, task.input_size, task.output_size, task.token_inputs)


__all__ = [
    "ABLATIONS",
    "BASELINES",
    "MODEL_NAMES",
    "PMG_MODELS",
    "SequenceModel",
    "build_backbone",
    "build_model",
    "freeze_gate_shape",
    "matched_llama_config",
    "matched_width",
    "num_parameters",
    "pmg_layers",
    "remove_memory_floor",
]
