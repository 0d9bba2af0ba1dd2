"""Atoms at the same position: the closest pair of a batch of structures, vectorised.

Two atoms closer than ``min_distance`` (default :data:`MIN_DISTANCE` = 0.1 Å, far
below any interatomic distance a potential is trained on; the shortest bond, H2, is
0.74 Å) are a data error: an atom written twice, or a periodic image stored as an
atom. Ingest refuses such a structure, naming the file, frame, atoms and distance.

Distances use the minimum image along periodic directions of a full-rank cell: the
positions are wrapped into the cell, and every atom within ``min_distance`` of a face
of the cell gets an image across that face (edges and corners by repetition). The
structures of a batch are placed side by side far apart, so one k-d tree
(:class:`scipy.spatial.cKDTree`) finds every close pair of the batch at once. A
structure whose cell has rank < 3 is treated as non-periodic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from dfre.defaults import MIN_DISTANCE  # Å


@dataclass(frozen=True)
class Overlap:
    """Atoms ``i`` and ``j`` (indices within structure ``structure``) at ``distance``."""

    structure: int
    i: int
    j: int
    distance: float


def _wrapped(positions, cells, pbc, owner):
    """Positions wrapped into periodic full-rank cells; fractional coordinates; which
    atoms are periodic along each axis."""
    rank3 = np.abs(np.linalg.det(cells)) > 1e-12
    periodic = pbc & rank3[:, None]
    frac = np.zeros_like(positions)
    if rank3.any():
        inverse = np.zeros_like(cells)
        inverse[rank3] = np.linalg.inv(cells[rank3])
        frac = np.einsum("ai,aij->aj", positions, inverse[owner])
        frac = np.where(periodic[owner], frac % 1.0, frac)
        positions = np.where(
            rank3[owner, None], np.einsum("ai,aij->aj", frac, cells[owner]), positions
        )
    return positions, frac, periodic[owner], inverse if rank3.any() else None


def first_overlap(
    positions: np.ndarray,
    counts: np.ndarray,
    cells: np.ndarray,
    pbc: np.ndarray,
    min_distance: float = MIN_DISTANCE,
) -> Overlap | None:
    """The pair of atoms closest together below ``min_distance`` in the first structure
    that has one, or None. ``positions`` (n_atoms, 3) hold the structures' atoms one
    after another, ``counts[s]`` atoms each; ``cells`` (n, 3, 3), ``pbc`` (n, 3)."""
    if min_distance <= 0 or len(positions) < 2:
        return None
    counts = np.asarray(counts, dtype=np.int64)
    owner = np.repeat(np.arange(len(counts)), counts)
    starts = np.concatenate([[0], np.cumsum(counts)])[:-1]
    points, frac, periodic, inverse = _wrapped(
        np.asarray(positions, float), np.asarray(cells, float), np.asarray(pbc, bool), owner
    )
    atom = np.arange(len(points))
    if inverse is not None:
        # fraction of each cell vector that min_distance spans across its face
        reach = min_distance * np.linalg.norm(inverse, axis=1)  # (n_structures, 3)
        for axis in range(3):
            near = periodic[:, axis] & (frac[:, axis] < reach[owner, axis])
            if near.any():
                points = np.concatenate([points, points[near] + cells[owner[near], axis]])
                frac = np.concatenate([frac, frac[near] + np.eye(3)[axis]])
                periodic = np.concatenate([periodic, periodic[near]])
                atom, owner = (
                    np.concatenate([atom, atom[near]]),
                    np.concatenate([owner, owner[near]]),
                )
    # structures side by side along x, far enough apart never to meet
    low = np.full(len(counts), np.inf)
    high = np.full(len(counts), -np.inf)
    np.minimum.at(low, owner, points[:, 0])
    np.maximum.at(high, owner, points[:, 0])
    width = float(np.max(high - low, initial=0.0)) + 10 * min_distance + 1.0
    shifted = points.copy()
    shifted[:, 0] += np.arange(len(counts))[owner] * width - low[owner]
    pairs = cKDTree(shifted).query_pairs(min_distance, output_type="ndarray")
    if not len(pairs):
        return None
    pairs = pairs[atom[pairs[:, 0]] != atom[pairs[:, 1]]]  # not an atom and its own image
    if not len(pairs):
        return None
    distance = np.linalg.norm(shifted[pairs[:, 0]] - shifted[pairs[:, 1]], axis=1)
    structure = owner[pairs[:, 0]]
    first = structure == structure.min()
    k = np.flatnonzero(first)[np.argmin(distance[first])]
    s = int(structure[k])
    i, j = sorted(int(atom[p]) - int(starts[s]) for p in pairs[k])
    return Overlap(s, i, j, float(distance[k]))
