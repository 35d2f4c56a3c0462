"""The one budget plan: how many tokens each layer (and KV head) of each row keeps.

Every compression path builds a :class:`BudgetPlan` and asks it, layer by layer, for the budget to
keep: the whole-prefill path (:class:`~zigzag.pipeline.full.Prefill`), the layer-by-layer path
during the prefill (:mod:`zigzag.pipeline.layerwise`), each of its chunks. The plan is where the
allocator's granularity is read, where LMBA is recorded, where budgets are fixed (at once, or once
every layer's LMBA is known), where a layer's budget is split across its KV heads, where an
allocator's output is checked, and where the budgets are reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from zigzag.budget import BudgetAllocator, layer_mean_budgets


@dataclass(frozen=True)
class LayerBudget:
    """What one layer keeps.

    Attributes:
        device: ``(batch,)`` long tokens per KV head, or ``(batch, kv_heads)`` when heads differ, on the
            scores' device.
        host: the same on the host when known without a sync, else None (split across heads).
        width: the largest entry when known on the host, else None.
    """

    device: torch.Tensor
    host: torch.Tensor | None
    width: int | None

    @property
    def row_budgets(self) -> torch.Tensor | None:
        """``(batch,)`` host budgets when every KV head of a row keeps as many, else None."""
        return self.host if self.host is not None and self.host.dim() == 1 else None


def _name(allocator: BudgetAllocator) -> str:
    return allocator.name or type(allocator).__name__


@dataclass
class BudgetPlan:
    """Budgets for one compression, fixed from the allocator's output and checked.

    Build it with :meth:`start`. For allocators that need LMBA, :meth:`record_lmba` once per layer,
    in layer order, then :meth:`settle`; the others are fixed at once. Then :meth:`layer` gives each
    layer's budget and :meth:`report` what the cache reports.

    Attributes:
        allocator: the budget allocator (its ``granularity`` decides the budgets' shape).
        avg_budget: ``(batch,)`` long, host: average tokens kept per layer (and KV head).
        capacity: ``(batch,)`` long, host: the most a layer (or head) of the row can keep.
        num_layers, kv_heads: of the model.
        device: where the scores live.
        budgets: host ``(batch, L)`` long (``(batch, L, kv_heads)`` for ``"head"``) once fixed, else None.
        lmba: host ``(batch, L)`` float (``(batch, L, kv_heads)`` for ``"head"``) once measured, else None.
    """

    allocator: BudgetAllocator
    avg_budget: torch.Tensor
    capacity: torch.Tensor
    num_layers: int
    kv_heads: int
    device: torch.device
    budgets: torch.Tensor | None = None
    lmba: torch.Tensor | None = None
    _budgets_device: torch.Tensor | None = None
    _measured: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    def start(
        cls,
        allocator: BudgetAllocator,
        avg_budget: torch.Tensor,
        capacity: torch.Tensor,
        *,
        num_layers: int,
        kv_heads: int,
        device: torch.device,
    ) -> BudgetPlan:
        """A plan whose budgets are fixed now unless the allocator needs LMBA."""
        if allocator.needs_lmba and allocator.granularity == "split":
            raise ValueError(
                f"budget {_name(allocator)!r}: a 'split' allocator shares each layer's budget by that layer's "
                "scores, so it cannot also wait for every layer's LMBA (needs_lmba)"
            )
        plan = cls(allocator, avg_budget.cpu().long(), capacity.cpu().long(), num_layers, kv_heads, device)
        if not allocator.needs_lmba:
            plan._fix(allocator.allocate(plan.avg_budget, plan.capacity, num_layers, None))
        return plan

    @property
    def known(self) -> bool:
        """Whether the budgets are fixed."""
        return self.budgets is not None

    @property
    def window(self) -> int:
        """Last queries whose attention mass LMBA is measured on (0 when the allocator needs none)."""
        return self.allocator.window if self.allocator.needs_lmba else 0

    @property
    def avg_width(self) -> int:
        """The largest average budget over rows (what a provisional layer keeps on the device)."""
        return int(self.avg_budget.max()) if self.avg_budget.numel() else 0

    # ------------------------------------------------------------------------------------ LMBA

    def record_lmba(self, mass: torch.Tensor, valid: torch.Tensor, *, folded: bool = False) -> None:
        """Measure and keep the next layer's LMBA (on the device: nothing is read back here).

        Args:
            mass: ``(batch, heads, seq)`` attention mass of the last :attr:`window` queries per query
                head; when ``folded``, ``(batch * kv_heads, heads // kv_heads, slots)``, one row per KV head
                (the slots an earlier chunk left).
            valid: ``(rows, seq)`` bool matching ``mass``.
        """
        measured = self.allocator.measure(mass, valid, 1 if folded else self.kv_heads)
        if self.allocator.granularity == "head":
            measured = measured.reshape(-1, self.kv_heads)  # (batch, kv_heads), also from folded rows
        elif folded:  # the layer's LMBA: the mean over its query heads, grouped by KV head
            measured = measured.reshape(-1, self.kv_heads).mean(dim=1)
        self._measured.append(measured)

    def measured_lmba(self) -> torch.Tensor:
        """Every layer's recorded LMBA on the host, ``(batch, L)`` (``(batch, L, kv_heads)`` for ``"head"``):
        the one read from the device, which waits for the layers' work."""
        if len(self._measured) != self.num_layers:
            raise RuntimeError(f"LMBA recorded for {len(self._measured)} of {self.num_layers} layers")
        return torch.stack(self._measured, dim=1).cpu()

    def settle(self, lmba: torch.Tensor | None = None) -> None:
        """Fix the budgets from every layer's LMBA (:meth:`measured_lmba` unless given)."""
        self.lmba = self.measured_lmba() if lmba is None else lmba
        self._measured = []
        self._fix(self.allocator.allocate(self.avg_budget, self.capacity, self.num_layers, self.lmba))

    # ------------------------------------------------------------------------------------ budgets

    def _fix(self, budgets: torch.Tensor) -> None:
        budgets = self._checked(budgets)
        self.budgets = budgets
        self._budgets_device = budgets.to(self.device)

    def _checked(self, budgets: object) -> torch.Tensor:
        """The allocator's output as host long, after checking shape, bounds and the exact total."""
        who = _name(self.allocator)
        batch, layers = self.avg_budget.shape[0], self.num_layers
        head_wise = self.allocator.granularity == "head"
        shape = (batch, layers, self.kv_heads) if head_wise else (batch, layers)
        if not isinstance(budgets, torch.Tensor) or budgets.dtype == torch.bool or budgets.is_floating_point() or budgets.is_complex():
            raise ValueError(f"budget {who!r} must return an integer tensor of shape {shape}; got {type(budgets).__name__} {getattr(budgets, 'dtype', '')}")
        if tuple(budgets.shape) != shape:
            raise ValueError(f"budget {who!r} must return shape {shape} (granularity {self.allocator.granularity!r}); got {tuple(budgets.shape)}")
        budgets = budgets.detach().cpu().long()
        flat = budgets.reshape(batch, -1)
        if bool((flat < 0).any()):
            raise ValueError(f"budget {who!r} returned a negative budget: {flat.min().item()}")
        over = flat > self.capacity[:, None]
        if bool(over.any()):
            row = int(over.any(dim=1).nonzero()[0, 0])
            raise ValueError(
                f"budget {who!r} gave a layer {int(flat[row].max())} tokens in row {row}, which holds only {int(self.capacity[row])}"
            )
        total = flat.sum(dim=1)
        wanted = self.avg_budget * flat.shape[1]
        if not torch.equal(total, wanted):
            row = int((total != wanted).nonzero()[0, 0])
            raise ValueError(
                f"budget {who!r} must keep exactly {int(wanted[row])} tokens in row {row} "
                f"({flat.shape[1]} x the average {int(self.avg_budget[row])}); got {int(total[row])}"
            )
        return budgets

    def layer(self, index: int, scores: torch.Tensor | None = None, valid: torch.Tensor | None = None) -> LayerBudget:
        """Layer ``index``'s budget.

        Args:
            scores: ``(batch, kv_heads, seq)`` the layer's scores; read only by ``"split"`` allocators,
                which share the layer's budget between its KV heads from them.
            valid: ``(batch, seq)`` bool, for the same.
        """
        if not self.known:
            raise RuntimeError("the budgets are not fixed yet: record every layer's LMBA and settle() first")
        host, device = self.budgets[:, index], self._budgets_device[:, index]
        if self.allocator.granularity != "split":
            return LayerBudget(device, host, int(host.max()) if host.numel() else 0)
        if scores is None or valid is None:
            raise ValueError(f"budget {_name(self.allocator)!r} splits each layer by its scores: pass scores and valid")
        return LayerBudget(self._checked_split(self.allocator.split_heads(scores, valid, device), device, valid), None, None)

    def _checked_split(self, per_head: object, layer_budget: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        who = _name(self.allocator)
        shape = (layer_budget.shape[0], self.kv_heads)
        if not isinstance(per_head, torch.Tensor) or per_head.is_floating_point() or per_head.dtype == torch.bool or tuple(per_head.shape) != shape:
            raise ValueError(f"budget {who!r}: split_heads must return an integer tensor of shape {shape}; got {getattr(per_head, 'shape', type(per_head).__name__)}")
        per_head = per_head.long()
        room = valid.sum(dim=-1).reshape(shape[0], -1)  # (batch, 1) or (batch, kv_heads)
        bad = (per_head < 0) | (per_head > room) | (per_head.sum(dim=1, keepdim=True) != self.kv_heads * layer_budget[:, None])
        if bool(bad.any()):
            raise ValueError(
                f"budget {who!r}: split_heads must give each KV head between 0 and its row's tokens, "
                f"{self.kv_heads} x the layer's budget in all; got {per_head.tolist()} for layer budgets {layer_budget.tolist()}"
            )
        return per_head

    def report(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(batch, L)`` budgets and LMBA for the cache to report (head-wise: the mean over KV heads, the
        budgets rounded so that each row keeps its exact total)."""
        budgets, lmba = self.budgets, self.lmba
        if budgets.dim() == 3:
            budgets = layer_mean_budgets(budgets)
            lmba = None if lmba is None else lmba.mean(dim=-1)
        return budgets, lmba
