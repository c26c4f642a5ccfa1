"""The tensors of one model on one data set (:class:`Design`), built by :meth:`mixlogit.data.ChoiceData.design`."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class Design:
    """Tensors for one model on one data set (float64 unless stated).

    ``N`` units (persons, or situations without a panel), ``T`` max situations per unit, ``J`` alternatives,
    ``A = J - 1`` non-chosen alternatives, ``Kr``/``Kf`` random/fixed columns.

    x_rand, x_fixed : (N, T, J, Kr), (N, T, J, Kf) attribute levels (zeros for padding).
    avail : (N, T, J) bool availability (False for padding).
    chosen : (N, T) long index of the chosen alternative.
    x_rand_diff, x_fixed_diff : (N, T, A, K) non-chosen minus chosen.
    avail_diff : (N, T, A) bool.
    situation_mask : (N, T) bool, False for padding in unbalanced panels.
    weights : (N,) unit weights.
    row_unit, row_t, row_j : (rows,) long positions of each table row (in the table's original order).
    """

    x_rand: torch.Tensor
    x_fixed: torch.Tensor
    avail: torch.Tensor
    chosen: torch.Tensor
    x_rand_diff: torch.Tensor
    x_fixed_diff: torch.Tensor
    avail_diff: torch.Tensor
    situation_mask: torch.Tensor
    weights: torch.Tensor
    row_unit: torch.Tensor
    row_t: torch.Tensor
    row_j: torch.Tensor

    @property
    def n_units(self) -> int:
        return int(self.x_rand.shape[0])

    @property
    def has_unavailable(self) -> bool:
        """True when some real (not padded) non-chosen alternative is unavailable. Masking costs a pass over
        the largest tensor, so the kernels skip it when this is False (padding is removed by the situation
        mask anyway)."""
        return not bool((self.avail_diff | ~self.situation_mask.unsqueeze(-1)).all())

    @property
    def x_diff(self) -> torch.Tensor:
        """(N, T, A, Kr + Kf): random then fixed attribute differences, for kernels that take every
        coefficient as a draw (see :meth:`mixlogit.spec.Spec.all_coefficients`)."""
        return torch.cat([self.x_rand_diff, self.x_fixed_diff], -1)

    @property
    def x(self) -> torch.Tensor:
        """(N, T, J, Kr + Kf): random then fixed attribute levels."""
        return torch.cat([self.x_rand, self.x_fixed], -1)

    def subset(self, index: slice | torch.Tensor) -> Design:
        """The tensors of a subset of units (row mappings are dropped)."""
        return Design(
            x_rand=self.x_rand[index], x_fixed=self.x_fixed[index], avail=self.avail[index],
            chosen=self.chosen[index], x_rand_diff=self.x_rand_diff[index],
            x_fixed_diff=self.x_fixed_diff[index], avail_diff=self.avail_diff[index],
            situation_mask=self.situation_mask[index], weights=self.weights[index],
            row_unit=self.row_unit[:0], row_t=self.row_t[:0], row_j=self.row_j[:0],
        )

    @property
    def device(self) -> torch.device:
        return self.weights.device

    def to(self, device: torch.device | str) -> Design:
        """Every tensor on ``device``, moved once (the same object when they are there already)."""
        device = torch.device(device)
        if all(getattr(self, f.name).device == device for f in fields(self)):
            return self
        return Design(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})
