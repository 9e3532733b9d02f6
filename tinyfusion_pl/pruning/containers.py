"""Find the container of blocks that depth pruning works on."""

from __future__ import annotations

import torch.nn as nn

BlockContainer = nn.ModuleList | nn.Sequential


def find_block_containers(root: nn.Module) -> dict[str, int]:
    """Every ModuleList/Sequential under `root` whose children all share one class, with its length."""
    found = {}
    for name, module in root.named_modules():
        if not name or not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) < 2:
            continue
        if len({type(child) for child in module}) == 1:
            found[name] = len(module)
    return found


def resolve_block_container(root: nn.Module, path: str) -> BlockContainer:
    """Return the container at dotted `path` under `root`, or raise naming the containers that exist."""
    module: nn.Module | None = root
    for part in path.split(".") if path else []:
        module = getattr(module, part, None) if isinstance(module, nn.Module) else None
        if module is None:
            break
    if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) > 0:
        return module
    candidates = find_block_containers(root)
    listing = ", ".join(f"'{name}' ({depth} blocks)" for name, depth in candidates.items()) or "none"
    what = "does not resolve" if module is None else f"is a {type(module).__name__}, not a non-empty container of blocks"
    raise ValueError(
        f"blocks='{path}' {what} on {type(root).__name__}. "
        f"Containers of same-class blocks found: {listing}. Pass one of them as `blocks`."
    )
