"""Optimizer state between its two layouts: one entry per tensor (the per-tensor update; whole tensors gathered
from every rank under FSDP, `BiLoRAOptimizer.full_state_dict`) and one entry per param group (the flat update's
vector, `FlatGroup`).

`BiLoRAOptimizer.load_state_dict` converts whichever layout was saved into its own, so a run resumes whichever
way it was saved; state saved for other adapters (another rank, other target modules) is refused with a
message naming the param group rather than failing later with a bare shape error.
"""

from __future__ import annotations

import torch

from .flat import FlatGroup

ROLE = "bilora_role"
FLAT_KEY = "bilora_flat"
"""Param-group entry: the flat vector's layout fingerprint, or False (state saved by the per-tensor update)."""


def other_adapters(index: int, group: dict) -> ValueError:
    return ValueError(
        f"optimizer state of param group {index} ({group.get(ROLE)}) was saved for other adapters "
        "(another rank or other target modules)"
    )


def state_from_tensors(fg: FlatGroup, states: list[dict]) -> dict:
    """One flat state from the per-tensor states of the group's parameters (in the group's own order).
    Elementwise entries are concatenated in the vector's order (zeros where a parameter has none yet); the step
    count must be the same for every parameter that has one."""
    present = [states[i] for i in fg.order if states[i]]
    if not present:
        return {}
    if len({float(st["step"]) for st in present if "step" in st}) > 1:
        raise ValueError(
            "per-tensor optimizer state with different step counts per parameter cannot become one flat vector: "
            "build the optimizer with flat=False to resume it"
        )
    out = {}
    for key, value in present[0].items():
        if key == "step":
            out[key] = value
        elif torch.is_tensor(value):
            pieces = [
                (states[i].get(key, torch.zeros(shape))).reshape(-1).to(value)
                for i, shape in zip(fg.order, fg.shapes)
            ]
            out[key] = torch.cat(pieces)
    return out


def state_to_tensors(fg: FlatGroup, state: dict) -> list[dict]:
    """The per-tensor states (in the group's own order) of one flat state."""
    out: list[dict] = [{} for _ in fg.params]
    for key, value in state.items():
        if torch.is_tensor(value) and value.dim() == 1 and value.numel() == fg.total:
            for i, piece, shape in zip(fg.order, value.split(fg.numels), fg.shapes):
                out[i][key] = piece.view(shape).clone()
        else:
            for i in fg.order:
                out[i][key] = value.clone() if torch.is_tensor(value) else value
    return out


def saved_layout(index: int, group: dict, fg: FlatGroup, params: list[torch.Tensor]) -> FlatGroup:
    """The layout a saved flat group was written in: ``fg``'s, or the parameter order (the primary group before
    it was laid out in blocks); anything else is refused."""
    flag = group.get(FLAT_KEY)
    if not isinstance(flag, str) or flag == fg.layout:
        return fg
    older = FlatGroup(list(params))
    if flag == older.layout:
        return older
    raise other_adapters(index, group)


def check_tensor_state(state_dict: dict, group_params: list[list[torch.Tensor]]) -> None:
    """Groups saved by the per-tensor update against this optimizer's parameters (torch compares no shapes)."""
    state = state_dict.get("state", {})
    for index, (group, mine) in enumerate(zip(state_dict["param_groups"], group_params)):
        if group.get(FLAT_KEY, False):
            continue
        if len(group["params"]) != len(mine):
            raise other_adapters(index, group)
        for pid, param in zip(group["params"], mine):
            for value in state.get(pid, {}).values():
                # Tensors shaped like their parameter (Adam's moments, Lion's, Prodigy's exp_avg); others have
                # shapes of their own (Adafactor's row/column factors, Prodigy's flattened s and p0).
                if torch.is_tensor(value) and value.dim() == param.dim() and value.shape != param.shape:
                    raise other_adapters(index, group)


def to_flat(state_dict: dict, flat_groups: list[FlatGroup], group_params: list[list[torch.Tensor]]) -> dict:
    """``state_dict`` (either layout) in the flat layout of ``flat_groups``."""
    state, groups, new_state = state_dict.get("state", {}), [], {}
    for index, (group, fg) in enumerate(zip(state_dict["param_groups"], flat_groups)):
        if group.get(FLAT_KEY, False):
            saved_as = saved_layout(index, group, fg, group_params[index])
            for pid in group["params"]:
                for value in state.get(pid, {}).values():
                    if torch.is_tensor(value) and value.dim() == 1 and value.numel() != fg.total:
                        raise other_adapters(index, group)
                if pid in state:
                    new_state[index] = state[pid]
                    if saved_as is not fg:  # the same tensors in another order
                        new_state[index] = state_from_tensors(fg, state_to_tensors(saved_as, state[pid]))
        else:
            flat_state = state_from_tensors(fg, [state.get(pid, {}) for pid in group["params"]])
            if flat_state:
                new_state[index] = flat_state
        groups.append({**group, "params": [index], FLAT_KEY: fg.layout})
    return {**state_dict, "state": new_state, "param_groups": groups}


def to_tensors(state_dict: dict, layouts: list[FlatGroup], group_params: list[list[torch.Tensor]]) -> dict:
    """A flat ``state_dict`` in the per-tensor layout (``layouts``: the flat layout each group would have)."""
    state, groups, new_state, next_id = state_dict.get("state", {}), [], {}, 0
    for index, (group, fg) in enumerate(zip(state_dict["param_groups"], layouts)):
        if group.get(FLAT_KEY, False):
            fg = saved_layout(index, group, fg, group_params[index])
            ids = list(range(next_id, next_id + len(fg.params)))
            flat_state = state.get(group["params"][0], {}) if group["params"] else {}
            for pid, st in zip(ids, state_to_tensors(fg, flat_state) if flat_state else []):
                new_state[pid] = st
        else:
            ids = list(range(next_id, next_id + len(group["params"])))
            for pid, old in zip(ids, group["params"]):
                if old in state:
                    new_state[pid] = state[old]
        next_id += len(ids)
        groups.append({**group, "params": ids, FLAT_KEY: False})
    return {**state_dict, "state": new_state, "param_groups": groups}


def localize(state_dict: dict, group_params: list[list[torch.Tensor]], cut) -> dict:
    """Per-tensor groups whose state holds whole tensors (shaped like their parameter's global shape) cut to
    this rank's shards by ``cut(whole, param)``; flat groups (already local) and scalars as they are."""
    state = state_dict.get("state", {})
    new_state = dict(state)
    for group, mine in zip(state_dict["param_groups"], group_params):
        if group.get(FLAT_KEY, False):
            continue
        for pid, param in zip(group["params"], mine):
            if pid in state:
                new_state[pid] = {
                    k: cut(v, param) if torch.is_tensor(v) and v.dim() > 0 and v.shape == param.shape else v
                    for k, v in state[pid].items()
                }
    return {**state_dict, "state": new_state}
