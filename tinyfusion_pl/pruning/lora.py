"""Low-rank adapters (LoRA) that wrap the Linear layers of a model in place."""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence

import torch
import torch.nn as nn

from tinyfusion_pl.pruning.containers import BlockSequence, find_owner


def lora_argument_problems(rank: int, alpha: float, dropout: float) -> list[str]:
    """One sentence per LoRA argument that is out of range (empty when all are valid)."""
    problems = []
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        problems.append(f"rank={rank!r} must be an integer >= 1 (the paper uses rank=8)")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        problems.append(f"alpha={alpha!r} must be a number > 0 (the paper uses alpha=16, scaling = alpha / rank)")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        problems.append(f"dropout={dropout!r} must be a probability in [0, 1) (0 disables it)")
    return problems


def check_lora_arguments(rank: int, alpha: float, dropout: float) -> None:
    """Raise one ValueError naming every LoRA argument that is out of range."""
    problems = lora_argument_problems(rank, alpha, dropout)
    if problems:
        raise ValueError("Invalid LoRA arguments: " + "; ".join(problems) + ".")


def merges_update(rows: int, weight: torch.Tensor) -> bool:
    """Whether x (W + s B A)^T costs less than x W^T + s (x A^T) B^T for x of `rows` rows.

    The thin update product adds a pass over the output, and another over x's gradient in backward; W + s B A is
    a pass over the weight, formed in forward and again in backward (it is not kept). Only in float32 and
    float64: in half precision the small update would be rounded away against the weight's entries.
    """
    out_features, in_features = weight.shape
    return weight.dtype in (torch.float32, torch.float64) and rows * (in_features + out_features) > 2 * weight.numel()


def updated_weight(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """W + scaling * B A, a new tensor shaped like the weight."""
    return torch.addmm(weight, lora_b, lora_a, alpha=scaling)


def linear_output(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """inputs W^T + b for 2-d inputs, as a new tensor."""
    return inputs @ weight.t() if bias is None else torch.addmm(bias, inputs, weight.t())


def adapted_output(
    inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
    lora_b: torch.Tensor, scaling: float, bottleneck: torch.Tensor, merged: bool,
) -> torch.Tensor:
    """inputs (W + s B A)^T + b: by the merged weight, or adding the thin product of `bottleneck` (s inputs A^T)."""
    if merged:
        return linear_output(inputs, updated_weight(weight, lora_a, lora_b, scaling), bias)
    return linear_output(inputs, weight, bias).addmm_(bottleneck, lora_b.t())


class LoRALinearFunction(torch.autograd.Function):
    """x W^T + b + scaling * x' A^T B^T (x' = dropout(x)), with forward and backward written out.

    Autograd composing nn.Linear calls does the same maths with more passes over full-width tensors
    and, for the thin rank side, in GEMM orientations that BLAS runs slowly: on CPU, B's gradient as
    G^T h takes ~20x longer than the same numbers as (h^T G)^T at rank 8. Here scaling is applied to
    the (M, rank) bottleneck, the update is added inside addmm, both input gradients go into one
    tensor, and the base weight gets a gradient only if it requires one. When the update reads x itself (no
    dropout) and there are more rows than the weight has (see `merges_update`), x is multiplied by W + s B A,
    formed for the step, instead of adding the thin update product to the output and to x's gradient.
    """

    @staticmethod
    def forward(ctx, x, lora_input, weight, bias, lora_a, lora_b, scaling):
        inputs = x.reshape(-1, x.shape[-1])  # (M, in)
        lora_inputs = inputs if lora_input is x else lora_input.reshape(-1, x.shape[-1])  # (M, in)
        bottleneck = (lora_a @ lora_inputs.t()).t() * scaling  # (M, rank)
        merged = lora_input is x and merges_update(inputs.shape[0], weight)
        out = adapted_output(inputs, weight, bias, lora_a, lora_b, scaling, bottleneck, merged)  # (M, out)
        ctx.save_for_backward(inputs, lora_inputs, bottleneck, weight, lora_a, lora_b)
        ctx.merged = merged
        ctx.shared_input = lora_input is x
        ctx.scaling = scaling
        ctx.input_shape = x.shape
        return out.view(*x.shape[:-1], out.shape[-1])  # (..., out)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        inputs, lora_inputs, bottleneck, weight, lora_a, lora_b = ctx.saved_tensors
        needs_x, needs_lora_input, needs_weight, needs_bias, needs_a, needs_b, _ = ctx.needs_input_grad
        grad = grad_output.reshape(-1, grad_output.shape[-1])  # (M, out)
        grad_bottleneck = (lora_b.t() @ grad.t()).t() * ctx.scaling  # (M, rank): d loss / d (x' A^T)
        grad_x = grad_lora_input = None
        if ctx.merged and needs_x:
            grad_x = (grad @ updated_weight(weight, lora_a, lora_b, ctx.scaling)).view(ctx.input_shape)  # (..., in)
        elif ctx.shared_input and needs_x:
            grad_x = (grad @ weight).addmm_(grad_bottleneck, lora_a).view(ctx.input_shape)  # (..., in)
        else:
            grad_x = (grad @ weight).view(ctx.input_shape) if needs_x else None
            grad_lora_input = (grad_bottleneck @ lora_a).view(ctx.input_shape) if needs_lora_input else None
        grad_weight = grad.t() @ inputs if needs_weight else None  # (out, in)
        grad_bias = grad.sum(dim=0) if needs_bias else None  # (out,)
        grad_a = grad_bottleneck.t() @ lora_inputs if needs_a else None  # (rank, in)
        grad_b = (bottleneck.t() @ grad).t() if needs_b else None  # (out, rank)
        return grad_x, grad_lora_input, grad_weight, grad_bias, grad_a, grad_b, None


class LoRALinear(nn.Module):
    """A Linear plus a trainable low-rank update scaling * B A; starts as an exact identity of the Linear.

    The wrapped Linear is held as `base_layer` (not copied) and frozen; its requires_grad flags are
    restored by `unwrap`. `merged` tells whether the update currently lives inside `base_layer.weight`.
    While not merged, the base layer's weights are used directly (hooks on `base_layer` do not run).
    """

    def __init__(self, base_layer: nn.Linear, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(
                f"LoRALinear wraps an nn.Linear, got base_layer of type {type(base_layer).__name__}. "
                "Pass the Linear layer itself, or use inject_lora(root) to wrap every Linear under a module."
            )
        if type(base_layer).forward is not nn.Linear.forward:
            raise TypeError(
                f"LoRALinear computes the wrapped layer as F.linear, but {type(base_layer).__name__} overrides "
                "nn.Linear.forward. Wrap plain nn.Linear layers only (pass `target` to inject_lora to skip it)."
            )
        check_lora_arguments(rank, alpha, dropout)
        self.base_layer = base_layer
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        weight = base_layer.weight
        self.lora_a = nn.Linear(base_layer.in_features, rank, bias=False, device=weight.device, dtype=weight.dtype)
        self.lora_b = nn.Linear(rank, base_layer.out_features, bias=False, device=weight.device, dtype=weight.dtype)
        # nn.Dropout(p=0) would still copy x in training mode; Identity costs nothing.
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.shared_input: SharedInputLoRA | None = None  # set by share_lora_inputs
        self.base_requires_grad = {name: p.requires_grad for name, p in base_layer.named_parameters()}
        base_layer.requires_grad_(False)
        self.reset_adapters()

    def reset_adapters(self) -> None:
        """A Kaiming-uniform like nn.Linear's default, B zero: the update B A starts at exactly zero."""
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)

    def adapters(self) -> list[nn.Parameter]:
        """The trainable parameters of the update: A and B."""
        return [self.lora_a.weight, self.lora_b.weight]

    @property
    def weight(self) -> nn.Parameter:
        """The base weight, for code that inspects `layer.weight` (e.g. nn.TransformerEncoderLayer's checks)."""
        return self.base_layer.weight

    @property
    def bias(self) -> nn.Parameter | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def delta_weight(self) -> torch.Tensor:
        """The update scaling * B A, shaped like the base weight, computed in float32 at least."""
        compute_dtype = torch.promote_types(self.lora_a.weight.dtype, torch.float32)
        delta = self.lora_b.weight.to(compute_dtype) @ self.lora_a.weight.to(compute_dtype)  # (out, in)
        return self.scaling * delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shared_input is not None:
            return self.shared_input(self, x)
        return self.separate_forward(x)

    def separate_forward(self, x: torch.Tensor) -> torch.Tensor:
        """This layer's output computed on its own (what forward does outside a SharedInputLoRA)."""
        if self.merged:
            return self.base_layer(x)
        # base_layer(x) + scaling * lora_b(lora_a(dropout(x))), computed by LoRALinearFunction.
        tensors = [x, self.base_layer.weight, self.base_layer.bias, self.lora_a.weight, self.lora_b.weight]
        device_type = x.device.type
        if device_type in ("cpu", "cuda", "xpu", "mps") and torch.is_autocast_enabled(device_type):
            # What F.linear does under autocast: compute in the autocast precision.
            dtype = torch.get_autocast_dtype(device_type)
            tensors = [None if tensor is None else tensor.to(dtype) for tensor in tensors]
        x, weight, bias, lora_a, lora_b = tensors
        return LoRALinearFunction.apply(x, self.dropout(x), weight, bias, lora_a, lora_b, self.scaling)  # (..., out)

    @torch.no_grad()
    def merge(self) -> None:
        """Add the update into `base_layer.weight`; forward then runs the base layer alone."""
        if self.merged:
            raise RuntimeError("This LoRALinear is already merged; call unmerge() before merging again.")
        weight, delta = self.base_layer.weight, self.delta_weight()
        weight.copy_((weight.to(delta.dtype) + delta).to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update from `base_layer.weight` again (exact up to floating-point rounding)."""
        if not self.merged:
            raise RuntimeError("This LoRALinear is not merged; there is no update to unmerge. Call merge() first.")
        weight, delta = self.base_layer.weight, self.delta_weight()
        weight.copy_((weight.to(delta.dtype) - delta).to(weight.dtype))
        self.merged = False

    def unwrap(self, merge: bool = False) -> nn.Linear:
        """Return the base Linear with the update merged in (merge=True) or left out, flags restored."""
        if merge and not self.merged:
            self.merge()
        elif not merge and self.merged:
            self.unmerge()
        for name, parameter in self.base_layer.named_parameters():
            parameter.requires_grad_(self.base_requires_grad[name])
        self.shared_input = None
        return self.base_layer

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"


#################################################################################
#                  LoRA layers that read one input, computed as one              #
#################################################################################


class SharedInputLoRAFunction(torch.autograd.Function):
    """n LoRA layers on one input x: y_i = x W_i^T + b_i + s_i (x A_i^T) B_i^T, with the A products shared.

    `scalings` holds each layer's alpha / rank s_i. Every layer keeps its own A and B and its own contiguous output;
    what is shared is one GEMM for the stacked A's in forward, and in backward one GEMM for the A gradients and
    one input gradient accumulated in place (x's gradient from n separate layers costs n - 1 more passes to sum,
    and n thin products with A). Layers with more rows than weight entries multiply by W_i + s_i B_i A_i instead
    (`merges_update`). The base weights are frozen (SharedInputLoRA falls back to separate layers otherwise).
    """

    @staticmethod
    def forward(ctx, x, scalings, *tensors):
        count = len(tensors) // 4
        weights, biases, lora_as, lora_bs = (tensors[index * count:(index + 1) * count] for index in range(4))
        inputs = x.reshape(-1, x.shape[-1])  # (M, in)
        lora_a = torch.cat(lora_as)  # (sum rank, in)
        ranks = [a.shape[0] for a in lora_as]
        scaling = scalings[0] if len(set(scalings)) == 1 else torch.tensor(  # one factor per bottleneck column
            [value for value, rank in zip(scalings, ranks, strict=True) for _ in range(rank)],
            dtype=x.dtype, device=x.device)
        bottleneck = (lora_a @ inputs.t()).t() * scaling  # (M, sum rank)
        bottlenecks = bottleneck.split(ranks, dim=1)  # n x (M, rank)
        merged = [merges_update(inputs.shape[0], weight) for weight in weights]
        outputs = []
        for weight, bias, layer_a, lora_b, layer_scaling, layer_bottleneck, layer_merged in zip(
                weights, biases, lora_as, lora_bs, scalings, bottlenecks, merged, strict=True):
            out = adapted_output(inputs, weight, bias, layer_a, lora_b, layer_scaling, layer_bottleneck,
                                 layer_merged)  # (M, out)
            outputs.append(out.view(*x.shape[:-1], out.shape[-1]))  # (..., out)
        ctx.save_for_backward(inputs, bottleneck, *lora_as, *weights, *lora_bs)
        ctx.scaling = scaling
        ctx.scalings = scalings
        ctx.merged = merged
        ctx.ranks = ranks
        ctx.input_shape = x.shape
        return tuple(outputs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grad_outputs):
        inputs, bottleneck, *rest = ctx.saved_tensors
        count = len(rest) // 3
        lora_as, weights, lora_bs = rest[:count], rest[count:2 * count], rest[2 * count:]
        grads = [g.reshape(-1, g.shape[-1]) for g in grad_outputs]  # n x (M, out)
        grad_bottleneck = torch.cat([(lora_b.t() @ grad.t()).t() for lora_b, grad in zip(lora_bs, grads, strict=True)],
                                    dim=1) * ctx.scaling  # (M, sum rank): d loss / d (x A^T)
        grad_x = None
        if ctx.needs_input_grad[0]:
            # Merged layers multiply by W + s B A; the others by W, their updates joined in one thin product.
            layer_weights = [updated_weight(weight, layer_a, lora_b, layer_scaling) if layer_merged else weight
                             for weight, layer_a, lora_b, layer_scaling, layer_merged
                             in zip(weights, lora_as, lora_bs, ctx.scalings, ctx.merged, strict=True)]
            grad_x = grads[0] @ layer_weights[0]  # (M, in)
            for grad, weight in zip(grads[1:], layer_weights[1:], strict=True):
                grad_x.addmm_(grad, weight)
            starts = [sum(ctx.ranks[:index]) for index in range(count)]
            columns = [column for start, rank, layer_merged in zip(starts, ctx.ranks, ctx.merged, strict=True)
                       if not layer_merged for column in range(start, start + rank)]
            if columns:
                grad_x.addmm_(grad_bottleneck[:, columns], torch.cat(lora_as)[columns])
            grad_x = grad_x.view(ctx.input_shape)  # (..., in)
        grad_as = (grad_bottleneck.t() @ inputs).split(ctx.ranks)  # n x (rank, in)
        grad_bs = [(layer_bottleneck.t() @ grad).t()  # (out, rank)
                   for layer_bottleneck, grad in zip(bottleneck.split(ctx.ranks, dim=1), grads, strict=True)]
        return grad_x, None, *([None] * 2 * count), *grad_as, *grad_bs


class SharedInputLoRA:
    """LoRALinear layers that their block always calls on the same input (e.g. attention's q, k and v projections).

    Each layer's forward comes here: the first call computes every layer's output on its input in one
    SharedInputLoRAFunction and keeps the others' outputs; a later call of another layer on that same tensor
    (same object, unmodified) takes its output. Any other call, a merged layer, adapter dropout (one draw per
    layer) or trainable base weights compute the layer on its own, so outputs and gradients are those of the
    separate layers in every case.
    """

    def __init__(self, layers: Sequence[LoRALinear]):
        if len(layers) < 2 or len({id(layer) for layer in layers}) != len(layers):
            raise ValueError(f"a SharedInputLoRA joins at least two different LoRALinear layers, got {len(layers)}.")
        widths = {layer.in_features for layer in layers}
        if len(widths) != 1:
            raise ValueError(f"layers that read one input have one input width; these have {sorted(widths)}.")
        self.layers = list(layers)
        self._input: weakref.ref | None = None
        self._input_version = -1
        self._pending: dict[LoRALinear, torch.Tensor] = {}
        for layer in self.layers:
            layer.shared_input = self

    def __getstate__(self) -> dict:
        # Copies and pickles of a model take the grouping, not outputs pending in the middle of a forward.
        return {"layers": self.layers}

    def __setstate__(self, state: dict) -> None:
        self.layers = state["layers"]
        self._input, self._input_version, self._pending = None, -1, {}

    def fusable(self) -> bool:
        """Whether the shared products compute exactly what the separate layers do now."""
        first = self.layers[0]
        return all(
            not layer.merged and isinstance(layer.dropout, nn.Identity) and (layer.bias is None) == (first.bias is None)
            and not any(p.requires_grad for p in layer.base_layer.parameters())
            for layer in self.layers
        )

    def __call__(self, layer: LoRALinear, x: torch.Tensor) -> torch.Tensor:
        pending = self._pending.pop(layer, None)
        same_input = self._input is not None and self._input() is x and x._version == self._input_version
        if pending is not None and same_input:
            if not self._pending:
                self._input = None
            return pending
        if x.is_inference() or not self.fusable():  # inference tensors keep no version to check reuse by
            return layer.separate_forward(x)
        weights = [member.base_layer.weight for member in self.layers]
        biases = [member.base_layer.bias for member in self.layers]
        lora_as = [member.lora_a.weight for member in self.layers]
        lora_bs = [member.lora_b.weight for member in self.layers]
        tensors = [x, *weights, *biases, *lora_as, *lora_bs]
        device_type = x.device.type
        if device_type in ("cpu", "cuda", "xpu", "mps") and torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)  # what F.linear does under autocast
            tensors = [None if tensor is None else tensor.to(dtype) for tensor in tensors]
        scalings = tuple(member.scaling for member in self.layers)
        outputs = SharedInputLoRAFunction.apply(tensors[0], scalings, *tensors[1:])
        self._input, self._input_version = weakref.ref(x), x._version
        self._pending = {member: output for member, output in zip(self.layers, outputs, strict=True)
                         if member is not layer}
        return outputs[self.layers.index(layer)]


def share_lora_inputs(root: nn.Module, groups: Sequence[Sequence[str]]) -> list[SharedInputLoRA]:
    """Join the LoRALinear layers named in each group (names under `root`) into a SharedInputLoRA; return them.

    A group says its layers are always called on the same tensor, e.g. ("attn.to_q", "attn.to_k", "attn.to_v")
    in a self-attention block. Names that are not LoRA layers (left out by a `target`) drop out of their group;
    a group left with fewer than two layers is skipped.
    """
    shared = []
    for group in groups:
        layers = [module for name in group if isinstance(module := _find_module(root, name), LoRALinear)]
        layers = list({id(layer): layer for layer in layers}.values())
        if len(layers) >= 2 and not any(layer.shared_input is not None for layer in layers):
            shared.append(SharedInputLoRA(layers))
    return shared


def _find_module(root: nn.Module, name: str) -> nn.Module | None:
    try:
        return root.get_submodule(name)
    except AttributeError:
        return None


def _replace_child(root: nn.Module, qualified_name: str, new_module: nn.Module) -> None:
    parent_name, _, child_name = qualified_name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child_name, new_module)


def inject_lora(
    root: nn.Module,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    target: Sequence[str] | None = None,
) -> list[str]:
    """Replace Linear layers under `root` in place by LoRALinear wrappers; return their names.

    `target=None` wraps every nn.Linear; otherwise a Linear is wrapped when its name, or the end of its
    dotted name, is in `target` (e.g. ["qkv", "mlp.fc1"]). The base layers are frozen, nothing is copied.
    Linears owned by an nn.MultiheadAttention are left alone: it reads their `.weight` directly, past any
    wrapper, so an adapter there would never take part in the forward.
    """
    check_lora_arguments(rank, alpha, dropout)
    if isinstance(root, (nn.Linear, LoRALinear)):
        raise TypeError(
            f"inject_lora replaces Linear layers inside `root`, but root is itself a {type(root).__name__}. "
            "Wrap a single layer directly with LoRALinear(layer, rank, alpha)."
        )
    wrapped_names = [name for name, module in root.named_modules() if isinstance(module, LoRALinear)]
    if wrapped_names:
        raise ValueError(
            f"root already holds LoRA adapters at {wrapped_names}. Call remove_lora(root) before injecting again."
        )
    # remove_duplicate=False: a Linear reachable under two names gets one wrapper, installed at both.
    owned_by_attention = {id(child) for module in root.modules() if isinstance(module, nn.MultiheadAttention)
                          for child in module.children()}
    linears = [
        (name, module) for name, module in root.named_modules(remove_duplicate=False)
        if isinstance(module, nn.Linear) and id(module) not in owned_by_attention
    ]
    if target is not None:
        targets = [target] if isinstance(target, str) else list(target)
        linears = [(name, module) for name, module in linears if _matches(name, targets)]
        matched = {suffix for suffix in targets for name, _ in linears if _matches(name, [suffix])}
        unmatched = [suffix for suffix in targets if suffix not in matched]
        if unmatched:
            all_linears = [name for name, module in root.named_modules() if isinstance(module, nn.Linear)]
            raise ValueError(
                f"target={targets} names no Linear layer for {unmatched}. "
                f"Linear layers under {type(root).__name__}: {all_linears}. "
                "Pass names or dotted name endings from this list, or target=None for every Linear."
            )
    wrappers: dict[int, LoRALinear] = {}
    for name, linear in linears:
        if id(linear) not in wrappers:
            wrappers[id(linear)] = LoRALinear(linear, rank=rank, alpha=alpha, dropout=dropout)
        _replace_child(root, name, wrappers[id(linear)])
    return [name for name, _ in linears]


def _matches(name: str, targets: Sequence[str]) -> bool:
    return any(name == suffix or name.endswith("." + suffix) for suffix in targets)


def block_lora_target(root: nn.Module, sequence: BlockSequence) -> list[str] | None:
    """The LoRA target of the model family that owns the containers of `sequence`; None (every Linear) without one."""
    targets = []
    for path in sequence.paths:
        found = find_owner(root, path)
        targets.append(None if found is None else found[1].lora_target)
    if any(target is None for target in targets):
        return None
    return list(dict.fromkeys(name for target in targets for name in target))


def inject_block_lora(
    root: nn.Module,
    sequence: BlockSequence,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    target: Sequence[str] | None = None,
) -> list[str]:
    """LoRA on the blocks of `sequence` (containers under `root`), as the co-optimized weight update puts it.

    target=None takes the target of the model family that owns the containers (e.g. diffusers' DiT: the Linears
    of facebookresearch/DiT's block, not the embedder copy in every block), or every Linear of the blocks
    without one; a given target wins and must name a Linear in some container. Linears the family says a block
    calls on one tensor share their products (share_lora_inputs). Returns the wrapped layers' names: relative to
    the container for one container, prefixed with its path for several.
    """
    if target is None:
        target = block_lora_target(root, sequence)
    # Several containers go under one temporary root, so that each `target` must match in one of them, not in
    # each (Flux's single-stream blocks lack the double-stream blocks' feed-forwards).
    single = len(sequence.paths) == 1
    lora_root = sequence.containers[0] if single else nn.ModuleDict(
        {str(index): container for index, container in enumerate(sequence.containers)}
    )
    names = inject_lora(lora_root, rank=rank, alpha=alpha, dropout=dropout, target=target)
    groups = []
    for index, (path, container) in enumerate(zip(sequence.paths, sequence.containers, strict=True)):
        found = find_owner(root, path)
        if found is None:
            continue
        prefix = "" if single else f"{index}."
        groups += [tuple(f"{prefix}{block_index}.{name}" for name in group)
                   for block_index, block in enumerate(container) for group in found[1].shared_input_linears(block)]
    share_lora_inputs(lora_root, groups)
    if single:
        return names
    return [f"{sequence.paths[int(index)]}.{name}" for index, _, name in (name.partition(".") for name in names)]


def remove_lora(root: nn.Module, merge: bool = False) -> list[str]:
    """Put plain Linear layers back in place of every LoRALinear under `root`; return their names.

    merge=False discards the update (the original weights come back), merge=True keeps it merged in.
    """
    if isinstance(root, LoRALinear):
        raise TypeError("remove_lora works on the module that holds LoRALinear layers; call root.unwrap() instead.")
    wrapped = [
        (name, module) for name, module in root.named_modules(remove_duplicate=False) if isinstance(module, LoRALinear)
    ]
    unwrapped: dict[int, nn.Linear] = {}
    for name, wrapper in wrapped:
        if id(wrapper) not in unwrapped:
            unwrapped[id(wrapper)] = wrapper.unwrap(merge=merge)
        _replace_child(root, name, unwrapped[id(wrapper)])
    return [name for name, _ in wrapped]
