"""Optimizer parameter groups for PMG models."""

from torch import nn

from .modeling_pmg import PMGLayer

GATE_SHAPE_PARAMETERS = ("sharpness_raw", "shift", "asymmetry_raw", "floor_logit")


def optimizer_param_groups(
    model: nn.Module,
    learning_rate: float,
    weight_decay: float = 0.1,
    gate_lr_ratio: float | None = None,
) -> list[dict]:
    """AdamW-ready parameter groups for a PMG model (or any model containing `PMGLayer`s).

    - The gating networks and gate-shape/floor parameters train at `learning_rate * gate_lr_ratio`
      (default: `model.config.gate_lr_ratio`): the gates decide what memory keeps, and move slowly.
    - Norm weights, biases, gate-shape parameters and other 1-D parameters get no weight decay.
    Parameters that do not require gradients are left out; empty groups are dropped.
    """
    if gate_lr_ratio is None:
        gate_lr_ratio = getattr(getattr(model, "config", None), "gate_lr_ratio", 1.0)
    gate_parameters = set()
    for module in model.modules():
        if isinstance(module, PMGLayer):
            gate_parameters.update(id(p) for p in module.gate_net.parameters())
            gate_parameters.update(id(getattr(module, name)) for name in GATE_SHAPE_PARAMETERS)

    groups = {
        (is_gate, decays): {
            "params": [],
            "lr": learning_rate * (gate_lr_ratio if is_gate else 1.0),
            "weight_decay": weight_decay if decays else 0.0,
        }
        for is_gate in (False, True)
        for decays in (True, False)
    }
    seen = set()
    for parameter in model.parameters():
        if not parameter.requires_grad or id(parameter) in seen:
            continue
        seen.add(id(parameter))
        groups[(id(parameter) in gate_parameters, parameter.dim() >= 2)]["params"].append(parameter)
    return [group for group in groups.values() if group["params"]]
