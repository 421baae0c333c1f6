"""Filter dissimilarity between two networks (seed 004, eq. 1): pure functions of arrays.

A conv layer's filter is its whole kernel (in-channels × height × width), bias left out. For
the reference network's filters F_i and the compared network's G_j:

    E_ij = ‖F_i − G_j‖₂        (Euclidean distance over all kernel weights)
    S_i  = min_j E_ij          (seed 004 eq. 1: small S_i means F_i has a close twin)

Filters are unordered, hence the minimum over j; ``nearest`` is that j (the first on ties).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from store.errors import InputError


@dataclass(frozen=True)
class Dissimilarity:
    """S and its arg-min for one direction.

    Attributes:
        distances: ``[I, J]`` E_ij, float64.
        dissimilarity: ``[I]`` S_i = min_j E_ij.
        nearest: ``[I]`` the j of that minimum (the first on ties).
    """

    distances: np.ndarray
    dissimilarity: np.ndarray
    nearest: np.ndarray


def filter_distances(reference: np.ndarray, compared: np.ndarray) -> np.ndarray:
    """E_ij = ‖F_i − G_j‖₂ over all weights of each kernel, in float64.

    Args:
        reference: ``[I, C, kh, kw]`` the reference filters F_i.
        compared: ``[J, C, kh, kw]`` the compared filters G_j, of the same kernel shape.

    Returns:
        ``[I, J]`` float64. The differences are taken weight by weight (never through
        ‖F‖² + ‖G‖² − 2F·G, which cancels for near twins).
    """
    reference, compared = np.asarray(reference), np.asarray(compared)
    check_same_kernels(reference.shape, compared.shape)
    flat_f = torch.as_tensor(reference.reshape(len(reference), -1), dtype=torch.float64)
    flat_g = torch.as_tensor(compared.reshape(len(compared), -1), dtype=torch.float64)
    return torch.cdist(flat_f, flat_g, compute_mode="donot_use_mm_for_euclid_dist").numpy()


def check_same_kernels(reference: tuple[int, ...], compared: tuple[int, ...],
                       names: tuple[str, str] = ("the reference", "the compared")) -> None:
    """InputError, one line, unless both are ``[N, C, kh, kw]`` with the same ``C, kh, kw``."""
    if len(reference) != 4 or len(compared) != 4:
        raise InputError(f"filters must be [filters, in-channels, height, width]: {names[0]} "
                         f"are {list(reference)}, {names[1]} {list(compared)}")
    if tuple(reference[1:]) != tuple(compared[1:]):
        raise InputError(f"filters of different shapes cannot be compared: {names[0]} are "
                         f"{_kernel(reference)}, {names[1]} {_kernel(compared)}")


def _kernel(shape: tuple[int, ...]) -> str:
    return f"{shape[0]} × {shape[1]}×{shape[2]}×{shape[3]}"


def dissimilarity(reference: np.ndarray, compared: np.ndarray) -> Dissimilarity:
    """S_i = min_j ‖F_i − G_j‖₂ (seed 004 eq. 1) with the distances and the arg-min j."""
    distances = filter_distances(reference, compared)
    nearest = np.argmin(distances, axis=1)
    return Dissimilarity(distances, distances[np.arange(len(distances)), nearest],
                         nearest.astype(np.int64))


def both_directions(a: np.ndarray, b: np.ndarray) -> tuple[Dissimilarity, Dissimilarity]:
    """A as reference against B, and B against A (seed 004 figs. 4–5 draw both)."""
    forward = dissimilarity(a, b)
    backward_distances = forward.distances.T
    nearest = np.argmin(backward_distances, axis=1).astype(np.int64)
    return forward, Dissimilarity(backward_distances,
                                  backward_distances[np.arange(len(nearest)), nearest], nearest)
