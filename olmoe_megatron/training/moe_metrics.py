"""OLMoE's load-balancing and z-loss values, and per-layer expert load, reduced over all ranks.

Megatron's routers record, per layer and micro-batch, the unweighted Switch loss and the mean
squared router logsumexp in a tracker; we reduce those ourselves (gloo has no AVG reduce) and
report them in OLMoE's normalisation: LB = w * mean over layers, z = w_z * mean over layers / k.
Expert load is counted by forward hooks on the routers (tokens routed to each expert); with
aux-loss-free balancing (ModelConfig.router_expert_bias) the records also give the range of each
layer's expert bias after the step's update.

Every tensor handed to a collective lives on `context.device`: an NCCL group has no CPU backend.
Counts stay on the model's device during the step; each reduction ends in one copy to the host.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from olmoe_megatron.model.config import ModelConfig
from olmoe_megatron.parallel.context import ParallelContext

_LB = "load_balancing_loss"
_GLOBAL_LB = "global_load_balancing_loss"
_Z = "z_loss"


def _tracker():
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    return get_moe_layer_wise_logging_tracker()


def clear_router_losses() -> None:
    for entry in _tracker().values():
        entry["values"].zero_()


def reduce_router_losses(model: ModelConfig, context: ParallelContext, *, num_microbatches: int) -> dict[str, float]:
    """OLMoE-normalised LB and z losses of the last step (weights applied), same on every rank."""
    out = {"lb_loss": 0.0, "z_loss": 0.0}
    if not model.is_moe:
        return out
    tracker = _tracker()
    groups = context.groups
    values = torch.zeros(2, model.num_layers, dtype=torch.float64, device=context.device)
    global_batch = model.router_load_balancing == "global_batch"
    lb_key = _GLOBAL_LB if global_batch else _LB
    if lb_key in tracker:
        values[0] = tracker[lb_key]["values"].double()
    if _Z in tracker:
        values[1] = tracker[_Z]["values"].double()
    dist.all_reduce(values, group=groups.pp)
    # LB: each TP/CP rank holds its tokens' share of sum(P * f): sum them; average over DP. The
    # global-batch loss divides by the tokens of all DP ranks already: its DP shares are summed.
    lb = values[0].clone()
    dist.all_reduce(lb, group=groups.tp_cp)
    dist.all_reduce(lb, group=groups.dp)
    if not global_batch:
        lb /= dist.get_world_size(groups.dp)
    # z: a per-rank mean over that rank's tokens: average over TP/CP and DP.
    z = values[1].clone()
    dist.all_reduce(z, group=groups.tp_cp)
    dist.all_reduce(z, group=groups.dp)
    z /= dist.get_world_size(groups.tp_cp) * dist.get_world_size(groups.dp)
    layers_microbatches = model.num_layers * num_microbatches
    losses = torch.stack([model.router_aux_loss_coeff * lb.sum() / layers_microbatches,
                          model.router_z_loss_coeff * z.sum() / (layers_microbatches * model.top_k)]).cpu()
    out["lb_loss"], out["z_loss"] = float(losses[0]), float(losses[1])
    clear_router_losses()
    return out


@dataclasses.dataclass
class ExpertLoadCounter:
    """Counts tokens routed to each expert of each layer with forward hooks on the routers.

    The counts live on the routers' device (created on the first hook call) and are added there:
    no host copy per router and micro-batch; `reduce_and_reset` copies them to the host once.
    """

    num_layers: int
    num_experts: int

    def __post_init__(self):
        self.counts_LE: torch.Tensor | None = None
        self._handles = []
        self._biased_routers = []

    def attach(self, model_chunks) -> "ExpertLoadCounter":
        from megatron.core.transformer.moe.router import TopKRouter

        for chunk in model_chunks:
            for module in chunk.modules():
                if isinstance(module, TopKRouter):
                    self._handles.append(module.register_forward_hook(self._hook))
                    if getattr(module, "expert_bias", None) is not None:
                        self._biased_routers.append(module)
        return self

    def _hook(self, router, inputs, output):
        if not router.training:
            return
        _, routing_map_TE = output
        if self.counts_LE is None:
            self.counts_LE = self._zeros(routing_map_TE.device)
        self.counts_LE[router.layer_number - 1] += routing_map_TE.detach().sum(0, dtype=torch.float64)

    def _zeros(self, device: torch.device) -> torch.Tensor:
        return torch.zeros(self.num_layers, self.num_experts, dtype=torch.float64, device=device)

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._biased_routers.clear()

    def _expert_bias_range(self, context: ParallelContext) -> dict[str, list[float]]:
        """Per layer, the min and max of the routers' expert bias (empty without expert bias).

        The bias is the same on every TP/CP/DP rank (its update all-reduces the token counts); each
        pipeline stage holds its own layers, so the stages' ranges are summed into one table.
        """
        if not self._biased_routers:
            return {}
        range_L2 = torch.zeros(self.num_layers, 2, dtype=torch.float64, device=context.device)
        for router in self._biased_routers:
            bias = router.expert_bias.detach()
            range_L2[router.layer_number - 1] = torch.stack([bias.min(), bias.max()]).to(range_L2)
        dist.all_reduce(range_L2, group=context.groups.pp)
        minimum, maximum = range_L2.T.cpu().tolist()
        return {"expert_bias_min": minimum, "expert_bias_max": maximum}

    def reduce_and_reset(self, context: ParallelContext) -> dict[str, list[float]]:
        """Global per-layer stats: busiest-expert share, min and max tokens per expert, and with
        expert bias its min and max after the step (`_expert_bias_range`).

        Collective over the PP, TP/CP and DP groups, on `context.device` (a rank whose routers saw
        no training forward yet contributes zeros).
        """
        if self.counts_LE is None:
            counts = self._zeros(context.device)
        else:
            counts = self.counts_LE.to(context.device, copy=True)
            self.counts_LE.zero_()
        groups = context.groups
        for group in (groups.pp, groups.tp_cp, groups.dp):
            dist.all_reduce(counts, group=group)
        max_L = counts.max(1).values
        share_L = max_L / counts.sum(1).clamp_min(1)
        share, minimum, maximum = torch.stack([share_L, counts.min(1).values, max_L]).cpu().tolist()
        return {"busiest_expert_share": share, "min_tokens_per_expert": minimum, "max_tokens_per_expert": maximum,
                **self._expert_bias_range(context)}
