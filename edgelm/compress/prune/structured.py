"""Structured pruning: remove whole FFN channels, attention heads and blocks, giving a smaller dense model.

Unlike unstructured/N:M pruning (zeros inside dense matrices), the result has genuinely fewer parameters:
narrower matrices, fewer heads, fewer layers, so it is smaller and faster with any kernel.

Importance, measured on calibration text in one pass:
- FFN channel j of a block: E[a_j²] · ‖W_down[:, j]‖², the expected squared contribution of the channel
  to the block's output (a = the gated activations feeding the down projection; Wanda's score, per column).
- Query head h: E[‖o_h‖²] · ‖W_o[:, h]‖²_F, likewise for the attention output projection; heads are kept
  in equal numbers per KV group so grouped-query attention stays regular.
- A block: 1 − cos(x_in, x_out) averaged over tokens (ShortGPT's "block influence"): blocks that barely
  change the residual stream go first. Sliding-window layout is kept per surviving layer.
Every block keeps the same width (the architectures take one FFN width and one head count).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from torch import nn

from edgelm.compress.calibration import BlockRunner, capture_inputs
from edgelm.compress.recipe import Step, progress
from edgelm.errors import RecipeError


@dataclass(frozen=True)
class StructuredPrune(Step):
    name: ClassVar[str] = "prune_structured"
    needs_calibration: ClassVar[bool] = True

    ffn_keep: float = 1.0  # fraction of FFN channels every block keeps
    heads_keep: float = 1.0  # fraction of query heads every block keeps (rounded per KV group, at least 1)
    drop_layers: int = 0  # blocks removed, least influential first

    def __post_init__(self) -> None:
        if not 0.0 < self.ffn_keep <= 1.0 or not 0.0 < self.heads_keep <= 1.0:
            raise RecipeError("prune_structured: ffn_keep and heads_keep must be in (0, 1]")
        if self.drop_layers < 0:
            raise RecipeError(f"prune_structured: drop_layers must be >= 0, got {self.drop_layers}")

    def apply(self, model: nn.Module, calibration: Any = None) -> nn.Module:
        if calibration is None:
            raise RecipeError("prune_structured needs calibration text (--calib FILE, or data-free samples)")
        for block in model.layers:
            for module in (block.attn.wq, block.attn.wo, block.ffn.w_gate, block.ffn.w_up, block.ffn.w_down):
                if not isinstance(module, nn.Linear):
                    raise RecipeError("prune_structured works on float layers: put it before quantization steps")
        args = model.args
        if self.drop_layers >= args.n_layers:
            raise RecipeError(f"prune_structured: drop_layers {self.drop_layers} leaves no layer of {args.n_layers}")
        scores = importance(model, calibration)
        keep_layers = sorted(torch.argsort(scores.layer, descending=True)[: args.n_layers - self.drop_layers].tolist())
        group = args.n_heads // args.n_kv_heads
        heads_per_group = max(1, round(group * self.heads_keep))
        n_channels = max(1, round(args.hidden_dim * self.ffn_keep))
        return rebuild(model, keep_layers, heads_per_group, n_channels, scores)


@dataclass
class Importance:
    channel: list[torch.Tensor]  # per block: [hidden_dim]
    head: list[torch.Tensor]  # per block: [n_heads]
    layer: torch.Tensor  # [n_layers]


@torch.inference_mode()
def importance(model: nn.Module, calibration: Any) -> Importance:
    args = model.args
    runner = BlockRunner(model, calibration)
    channels, heads, influence = [], [], []
    for i, block in enumerate(progress(model.layers, "importance", "block")):
        power = {"wo": torch.zeros(block.attn.wo.in_features), "w_down": torch.zeros(block.ffn.w_down.in_features)}

        def observe(name: str, x: torch.Tensor) -> None:
            power[name] += x.float().pow(2).sum(0)

        before = runner.hidden
        with capture_inputs({"wo": block.attn.wo, "w_down": block.ffn.w_down}, observe):
            runner.advance(i)
        after = runner.hidden
        cos = torch.nn.functional.cosine_similarity(before.reshape(-1, args.dim), after.reshape(-1, args.dim), dim=-1)
        influence.append(float(1 - cos.mean()))
        channels.append(power["w_down"] * block.ffn.w_down.weight.float().pow(2).sum(0))
        per_input = power["wo"] * block.attn.wo.weight.float().pow(2).sum(0)
        heads.append(per_input.reshape(args.n_heads, args.head_dim).sum(1))
    return Importance(channels, heads, torch.tensor(influence))


def rebuild(model: nn.Module, keep_layers: list[int], heads_per_group: int, n_channels: int,
            scores: Importance) -> nn.Module:
    """A new, smaller model holding the kept layers, heads and channels of `model`."""
    from edgelm.models import architecture_module

    args = model.args
    group = args.n_heads // args.n_kv_heads
    new_args = replace(args, n_layers=len(keep_layers), n_heads=args.n_kv_heads * heads_per_group,
                       hidden_dim=n_channels, local_layers=[args.is_local(i) for i in keep_layers],
                       extra=dict(args.extra))
    state = {}
    for name, tensor in model.state_dict().items():
        if not name.startswith("layers."):
            state[name] = tensor
    for new_index, old_index in enumerate(keep_layers):
        channels = torch.topk(scores.channel[old_index], n_channels).indices.sort().values
        head_scores = scores.head[old_index].reshape(args.n_kv_heads, group)
        kept_heads = (torch.topk(head_scores, heads_per_group, dim=1).indices.sort(dim=1).values
                      + torch.arange(args.n_kv_heads)[:, None] * group).reshape(-1)
        head_rows = (kept_heads[:, None] * args.head_dim + torch.arange(args.head_dim)).reshape(-1)
        prefix = f"layers.{old_index}."
        for name, tensor in model.state_dict().items():
            if not name.startswith(prefix):
                continue
            local = name[len(prefix):]
            if local in ("attn.wq.weight", "attn.wq.bias"):
                tensor = tensor[head_rows]
            elif local == "attn.wo.weight":
                tensor = tensor[:, head_rows]
            elif local in ("ffn.w_gate.weight", "ffn.w_up.weight"):
                tensor = tensor[channels]
            elif local == "ffn.w_down.weight":
                tensor = tensor[:, channels]
            state[f"layers.{new_index}.{local}"] = tensor.clone()
    with torch.device("meta"):
        smaller = architecture_module(args.arch).build(new_args)
    smaller.load_state_dict(state, strict=True, assign=True)
    for attribute in ("source", "compression_reference", "compression_device"):
        if attribute in model.__dict__:
            smaller.__dict__[attribute] = model.__dict__[attribute]
    return smaller.eval()
