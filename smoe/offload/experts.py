"""``OffloadedExperts``: a MoE layer's routed experts computed from the expert cache (smoe.offload.cache) instead of
tensors of their own, with the tokens of the in-memory model, bit for bit.

How: the cache's slab holds ``S`` slots of every expert tensor, stacked as the model's own experts stack ``E``. A call
reserves a slot for each expert its tokens route to, relabels each assignment's expert as its slot, and runs the
experts' own module (``RoutedExperts`` or ``QuantizedExperts``, pointed at the slab) on that routing: the same
kernels on the same rows of the same weights, in the same order of summation (a kernel computes each expert from its
own rows alone, and combines a token's K outputs in the order of its choices). The backend ``auto`` picks is chosen
for the layer's E experts, not the slab's S slots.

When one call routes to more experts than the slots hold beside the pinned ones (a long prompt under a small budget),
it runs in waves of experts that fit: each wave's rows through the backend's rows-sorted-by-expert seam, then one
combine of every row, in the precision the in-memory call combines in (fp32 where a kernel would combine).

Look-ahead (Eliseev and Mazur 2023, §3.2): before computing, a layer applies the next MoE layer's router to its own
input, the hidden state its router saw, and prefetches the experts that picks (at most as many as this call uses).

Legend: N tokens, A assignments, E experts of the layer, S slots.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from smoe import kernels
from smoe.moe.dispatch import Routed
from smoe.moe.experts import Experts
from smoe.moe.layer import MoELayer
from smoe.moe.router import Router
from smoe.offload.budget import OffloadConfig, format_size
from smoe.offload.cache import ExpertCache
from smoe.offload.store import ExpertFiles
from smoe.quant.modules import QuantizedExperts


class OffloadedExperts(Experts):
    """Layer ``layer``'s routed experts, read from disk into a shared ``ExpertCache`` (``attach``). Holds no tensor
    of its own: its state dict is empty, and saving a model whose experts are offloaded is refused."""

    traceable = False  # a call reads files and waits for threads: no compiled graph captures it

    def __init__(self, experts: Experts, layer: int):
        super().__init__()
        # The experts' own module, on the meta device until ``attach`` points its tensors at the slab: not a child,
        # so that the slab, which every layer's module shares, is never a parameter or buffer of the model.
        self.__dict__["inner"] = experts
        self.layer = layer
        tensors = experts.state_dict(keep_vars=True)
        self.spec = {name: (tuple(t.shape[1:]), t.dtype) for name, t in tensors.items()}
        self.n_experts = next(iter(tensors.values())).shape[0]
        self.quantized = isinstance(experts, QuantizedExperts)
        self.cache: ExpertCache | None = None
        self.next_router: tuple[int, Router] | None = None  # the next MoE layer's index and router: look-ahead
        self.first = False  # the first MoE layer counts the tokens

    @property
    def expert_bytes(self) -> int:
        return sum(torch.Size(shape).numel() * dtype.itemsize for shape, dtype in self.spec.values())

    def rows_independent(self, device: torch.device) -> bool:
        return self.inner.rows_independent(device)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.cache is not None:
            raise ValueError(f"{prefix.rstrip('.')}: the routed experts of this model are read from disk on demand "
                             "(max_expert_memory), so its state dict would lack them; save or convert the checkpoint "
                             "it was loaded from instead")

    def extra_repr(self) -> str:
        return f"layer={self.layer}, experts={self.n_experts}, cache={self.cache!r}"

    def run(self, x_ND: torch.Tensor, routed: Routed, backend: str | kernels.BackendRequest = "auto"
            ) -> torch.Tensor:
        cache = self.cache
        if cache is None:
            raise RuntimeError(f"layer {self.layer}: offloaded experts with no cache attached (load the model with "
                               "max_expert_memory)")
        ids_A = routed.routing.expert_ids_A
        used_A = ids_A if routed.keep_A is None else ids_A[routed.keep_A]
        load_E = torch.bincount(used_A, minlength=self.n_experts)
        needed = load_E.nonzero().flatten()
        experts, tokens = needed.tolist(), load_E[needed].tolist()
        if self.first:
            n = routed.n_tokens if routed.keep_A is None else int(routed.keep_A.view(routed.n_tokens, -1)[:, 0].sum())
            cache.stats.tokens += n
        rows = int(load_E.clamp(max=routed.capacity).sum()) if routed.capacity is not None else int(load_E.sum())
        backend = self._resolved(backend, x_ND, rows)
        if len(experts) <= cache.capacity(self.layer, experts):
            slots = cache.reserve(self.layer, experts, tokens)
            try:
                self._lookahead(x_ND, routed, len(experts))
                cache.wait(slots)
                slot_E = torch.zeros(self.n_experts, dtype=torch.long)
                slot_E[needed] = torch.tensor(slots)
                on_slots = replace(routed, routing=replace(routed.routing, expert_ids_A=slot_E[ids_A]),
                                   n_experts=cache.n_slots)
                return self.inner.run(x_ND, on_slots, backend)
            finally:
                cache.release(slots)
        return self._waves(x_ND, routed, experts, tokens, backend)

    def _resolved(self, backend: str | kernels.BackendRequest, x_ND: torch.Tensor, rows: int
                  ) -> str | kernels.BackendRequest:
        """The backend the in-memory layer would run for ``rows`` rows over its E experts (``auto``'s choice depends
        on E, and the slab has S): a name, or the request as it is where it asks for row independence (whose
        choice does not depend on E)."""
        if backend == "tiled" or (isinstance(backend, kernels.BackendRequest) and backend.row_independent):
            return backend
        return kernels.select(backend, x_ND.device, x_ND.dtype, rows, self.n_experts, quantized=self.quantized).name

    def _lookahead(self, x_ND: torch.Tensor, routed: Routed, limit: int) -> None:
        if self.next_router is None:
            return
        layer, router = self.next_router
        with torch.no_grad():
            guess_A = router.route(router.logits(x_ND)).expert_ids_A
        if routed.keep_A is not None and routed.routing.token_major:
            real_N = routed.keep_A.view(routed.n_tokens, -1)[:, 0]
            guess_A = guess_A.view(routed.n_tokens, -1)[real_N].flatten()
        counts = torch.bincount(guess_A, minlength=self.n_experts)
        ranked = counts.argsort(descending=True, stable=True)[: min(limit, int((counts > 0).sum()))]
        self.cache.prefetch(layer, ranked.tolist())

    def _waves(self, x_ND: torch.Tensor, routed: Routed, experts: list[int], tokens: list[int],
               backend: str | kernels.BackendRequest) -> torch.Tensor:
        """Experts in waves that fit the slots, through the rows-sorted seam; one combine of every row."""
        cache, inner = self.cache, self.inner
        entry = kernels.select(backend, x_ND.device, x_ND.dtype, quantized=self.quantized)
        kernel = entry.quantized if self.quantized else entry.floating
        # A kernel that starts from the tokens combines in fp32; the layer's combine in the activations' dtype.
        dtype = torch.float32 if routed.hands_over(kernel) else x_ND.dtype
        dispatch = routed.dispatch()
        counts_E = dispatch.counts_E.tolist()
        starts_E = [0]
        for c in counts_E[:-1]:
            starts_E.append(starts_E[-1] + c)
        x_RD = routed.gather(x_ND).to(dtype)
        y_RD = x_RD.new_empty(x_RD.shape[0], x_ND.shape[-1])
        for wave, wave_tokens in self._split(experts, tokens):
            slots = cache.reserve(self.layer, wave, wave_tokens)
            try:
                cache.wait(slots)
                by_slot = sorted(zip(slots, wave, strict=True))
                rows = torch.cat([torch.arange(starts_E[e], starts_E[e] + counts_E[e]) for _, e in by_slot])
                counts_S = torch.zeros(cache.n_slots, dtype=torch.long)
                counts_S[[s for s, _ in by_slot]] = torch.tensor([counts_E[e] for _, e in by_slot])
                y_RD[rows] = inner(x_RD[rows], counts_S, backend).to(dtype)
            finally:
                cache.release(slots)
        return routed.combine(y_RD).to(x_ND.dtype)

    def _split(self, experts: list[int], tokens: list[int]):
        """Consecutive runs of ``experts`` whose unpinned members fit the slots beside the pinned ones."""
        cache = self.cache
        room = cache.n_slots - len(cache.pinned)
        wave, wave_tokens, unpinned = [], [], 0
        for e, n in zip(experts, tokens, strict=True):
            pinned = cache.slot_of.get((self.layer, e)) in cache.pinned
            if not pinned and unpinned == room:
                yield wave, wave_tokens
                wave, wave_tokens, unpinned = [], [], 0
            wave.append(e)
            wave_tokens.append(n)
            unpinned += not pinned
        if wave:
            yield wave, wave_tokens


def offload_experts(model: nn.Module) -> list[OffloadedExperts]:
    """Replace, in place, every MoE layer's routed experts of ``model`` (on the meta device, before it is
    allocated) by ``OffloadedExperts``; returns them, in forward order. Their memory is then never allocated."""
    shells = []
    for layer, moe in model.moe_layers_by_index().items():
        moe.experts = OffloadedExperts(moe.experts, layer)
        shells.append(moe.experts)
    return shells


def budget_slots(shells: list[OffloadedExperts], budget: int | None, top_k: int) -> int:
    """The slots ``budget`` bytes hold (at most every expert; None: ``top_k``); raises naming the minimum when they
    cannot hold one layer's ``top_k`` active experts."""
    specs = {tuple(sorted(s.spec.items())) for s in shells}
    if len(specs) != 1:
        raise ValueError("max_expert_memory: the MoE layers' experts differ in shape or dtype, which one cache of "
                         "slots cannot hold")
    one = shells[0].expert_bytes
    budget = top_k * one if budget is None else budget
    slots = min(budget // one, sum(s.n_experts for s in shells))
    if slots < top_k:
        raise ValueError(f"max_expert_memory: {format_size(budget)} holds {slots} expert(s) of {format_size(one)}; "
                         f"one layer's {top_k} active experts need at least {format_size(top_k * one)} "
                         f"({top_k * one} bytes)")
    return slots


def prefixes(model: nn.Module) -> dict[str, int]:
    """Each ``OffloadedExperts``' name prefix in the model's state (``layers.3.ffn.experts.``) -> its layer."""
    return {f"{name}.": m.layer for name, m in model.named_modules() if isinstance(m, OffloadedExperts)}


def check(model: nn.Module, config: OffloadConfig, device: torch.device) -> None:
    """What ``attach`` will need, checked before a loader reads the weights: the device, the budget against one
    layer's active experts, the pinned experts."""
    if device.type != "cpu":
        raise ValueError(f"max_expert_memory: the expert cache lives in CPU memory; load the model on the CPU, not "
                         f"{device}")
    layers = model.moe_layers_by_index()
    if not layers:
        raise ValueError(f"max_expert_memory: {model.config.name} has no routed experts to keep on disk")
    top_k = next(iter(layers.values())).config.top_k
    slots = budget_slots([moe.experts for moe in layers.values()], config.budget, top_k)
    _pinned(config.pin_experts, layers, slots - top_k)


def attach(model: nn.Module, files: ExpertFiles, config: OffloadConfig) -> ExpertCache:
    """Give ``model``'s ``OffloadedExperts`` (``offload_experts``) their cache: ``config``'s budget of slots over
    ``files``, the next layer's router for look-ahead, the pinned experts read. The cache's reading threads stop
    and its files close when the model is garbage collected."""
    layers = model.moe_layers_by_index()
    shells = [moe.experts for moe in layers.values()]
    top_k = next(iter(layers.values())).config.top_k
    slots = budget_slots(shells, config.budget, top_k)
    first = shells[0]
    files.check([(s.layer, e) for s in shells for e in range(s.n_experts)],
                {name: torch.empty(shape, dtype=dtype, device="meta") for name, (shape, dtype) in first.spec.items()})
    pinned = _pinned(config.pin_experts, layers, slots - top_k)
    cache = ExpertCache(files, first.spec, slots, config.expert_cache_policy, config.expert_io_threads,
                        config.drop_page_cache)
    n_main = model.config.n_layers
    for i, shell in enumerate(shells):
        _point_at(shell.inner, cache.slab)
        shell.cache = cache
        shell.first = i == 0
        nxt = shells[i + 1] if i + 1 < len(shells) else None
        router: Router = layers[nxt.layer].router if nxt is not None else None
        if config.expert_prefetch == "lookahead" and nxt is not None and nxt.layer < n_main and \
                router.weight is not None:  # hash routing has no router to apply; MTP layers do not decode
            shell.next_router = (nxt.layer, router)
    cache.pin(pinned)
    weakref.finalize(model, cache.close)
    return cache


def _point_at(inner: Experts, slab: dict[str, torch.Tensor]) -> None:
    """Make ``inner``'s tensors the slab's (a parameter stays a parameter, without gradient)."""
    for name, tensor in slab.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = inner.get_submodule(owner_name) if owner_name else inner
        if isinstance(getattr(owner, leaf), nn.Parameter):
            setattr(owner, leaf, nn.Parameter(tensor, requires_grad=False))
        else:
            setattr(owner, leaf, tensor)


def _pinned(path: str | None, layers: dict[int, MoELayer], room: int) -> list[tuple[int, int]]:
    """The experts ``pin_experts`` names, checked: a JSON object of layer index -> expert ids, within the model,
    leaving one layer's active experts room."""
    if path is None:
        return []
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"pin_experts: {path}: not a readable JSON file ({err})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"pin_experts: {path}: expected an object {{\"LAYER\": [EXPERT, ...]}}")
    keys = []
    for layer, experts in raw.items():
        if not (isinstance(layer, str) and layer.isdigit() and int(layer) in layers):
            raise ValueError(f"pin_experts: {path}: {layer!r} is not a MoE layer of this model (those: "
                             f"{', '.join(map(str, layers))})")
        E = layers[int(layer)].config.n_routed_experts
        if not (isinstance(experts, list) and all(isinstance(e, int) and not isinstance(e, bool) and 0 <= e < E
                                                  for e in experts)):
            raise ValueError(f"pin_experts: {path}: layer {layer}: expected a list of expert ids in [0, {E})")
        keys += [(int(layer), e) for e in dict.fromkeys(experts)]
    if len(keys) > room:
        raise ValueError(f"pin_experts: {path}: pins {len(keys)} experts; the budget holds {room} beside one layer's "
                         "active experts")
    return keys


def stacked(experts: Experts) -> dict[str, torch.Tensor]:
    """A MoE layer's routed experts' tensors, stacked ``(E, ...)`` under their state-dict names (``w_gate_up``, or
    ``w_gate_up.qweight`` and so on): the module's own, or for ``OffloadedExperts`` all of them read from disk now,
    outside the cache (a converter's view of one layer at a time)."""
    if not isinstance(experts, OffloadedExperts):
        return {name: t.detach() for name, t in experts.state_dict(keep_vars=True).items()}
    out = {name: torch.empty((experts.n_experts, *shape), dtype=dtype) for name, (shape, dtype) in experts.spec.items()}
    for e in range(experts.n_experts):
        experts.cache.files.read((experts.layer, e), {name: t[e] for name, t in out.items()})
    return out


def cache_of(model: nn.Module) -> ExpertCache | None:
    """The expert cache of a model loaded with ``max_expert_memory``, else None."""
    for moe in model.moe_layers:
        if isinstance(moe.experts, OffloadedExperts):
            return moe.experts.cache
    return None
