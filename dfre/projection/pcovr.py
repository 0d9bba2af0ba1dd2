"""PCovR maps of structure-level descriptors (paper Sec. II B, Fig. 9, Fig. S8).

Principal covariates regression (scikit-matter's :class:`skmatter.decomposition.PCovR`)
finds latent coordinates :math:`T = X P_{XT}` minimising

.. math::

    \\mathcal{L} = \\alpha \\lVert X - T P_{TX} \\rVert_F^2
                 + (1 - \\alpha) \\lVert Y - T P_{TY} \\rVert_F^2 ,

with mixing :math:`\\alpha = 0.5` and two components by default, as in the paper.
Before fitting, :math:`X` is centred and scaled to unit total variance
(``StandardFlexibleScaler(column_wise=False)``) and :math:`Y` is centred and scaled per
column, so that both terms of the loss are of comparable size whatever the units.

Target: the cohesive energy per atom when the structures have energies,

.. math::

    \\varepsilon_S = \\frac{E_S - \\sum_Z n_{S,Z}\\, e_Z}{N_S}, \\qquad
    e = \\arg\\min_e \\sum_S \\Big(E_S - \\sum_Z n_{S,Z} e_Z\\Big)^2 ,

(per-element reference energies :math:`e_Z` fitted by least squares over the composition
counts :math:`n_{S,Z}`), else any numeric structure info key.

A map fitted on one store projects another store's descriptors into the same plane
(Fig. S8): the scalers and the PCovR weights of the fit are reused.

Storage: ``results/<run>/`` (default run ``pcovr-<descriptor>``) of the projected store,
attrs ``kind="pcovr"``, ``descriptor``, ``target``, ``config`` (mixing, n_components,
energy_key, reference energies), ``fitted_on`` (the store the map was fitted on),
``dfre_version``; arrays ``coordinates`` float64 (n_structures, n_components) (NaN for
structures without a finite descriptor), ``target`` float64 (n_structures,) (NaN where
unknown), ``fit_rows`` bool (n_structures,) (rows the map was fitted on; all False in a
projected store) and, in a projected store, ``reference_coordinates`` and
``reference_target`` of the fitting store (grey background of Fig. S8).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import dask.array as da
import numpy as np
from skmatter.decomposition import PCovR
from skmatter.preprocessing import StandardFlexibleScaler

from dfre import __version__
from dfre.errors import DfreError, did_you_mean
from dfre.lock import writes_store

#: Target name that selects the cohesive energy per atom.
COHESIVE_ENERGY = "cohesive_energy"
#: Most structures a map is fitted on by default (a random subset of larger datasets).
DEFAULT_MAX_FIT = 20_000


@dataclass
class PCovRMap:
    """A fitted PCovR map: the scalers of X and Y and the skmatter model."""

    x_scaler: StandardFlexibleScaler
    y_scaler: StandardFlexibleScaler
    model: PCovR
    n_features: int
    config: dict = field(default_factory=dict)

    def transform(self, descriptor: Any) -> np.ndarray:
        """Map coordinates (n, n_components) of ``descriptor`` rows; NaN rows stay NaN."""
        x = np.asarray(descriptor, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise DfreError(
                f"descriptor has shape {x.shape}, the PCovR map was fitted on "
                f"{self.n_features} columns: project the same kind of descriptor"
            )
        out = np.full((len(x), self.model.n_components_), np.nan)
        finite = np.isfinite(x).all(axis=1)
        if finite.any():
            out[finite] = self.model.transform(self.x_scaler.transform(x[finite]))
        return out


def fit_pcovr(
    descriptor: Any, target: Any, *, mixing: float = 0.5, n_components: int = 2
) -> PCovRMap:
    """Fit a PCovR map on the rows where descriptor and target are finite."""
    x = np.asarray(descriptor, dtype=np.float64)
    y = np.asarray(target, dtype=np.float64)
    y = y[:, None] if y.ndim == 1 else y
    if len(x) != len(y):
        raise DfreError(f"descriptor has {len(x)} rows but the target has {len(y)}")
    rows = np.isfinite(x).all(axis=1) & np.isfinite(y).all(axis=1)
    if rows.sum() <= n_components:
        raise DfreError(
            f"only {int(rows.sum())} structures have both a finite descriptor and target: "
            f"PCovR with {n_components} components needs more"
        )
    x_scaler = StandardFlexibleScaler(column_wise=False).fit(x[rows])
    y_scaler = StandardFlexibleScaler(column_wise=True).fit(y[rows])
    model = PCovR(mixing=mixing, n_components=n_components)
    model.fit(x_scaler.transform(x[rows]), y_scaler.transform(y[rows]))
    config = {"mixing": mixing, "n_components": n_components, "n_fit": int(rows.sum())}
    return PCovRMap(x_scaler, y_scaler, model, x.shape[1], config)


def composition_counts(numbers: Any, offsets: Any) -> tuple[np.ndarray, np.ndarray]:
    """Counts (n_structures, n_elements) of each element per structure, and the elements."""
    numbers = np.asarray(numbers)
    offsets = np.asarray(offsets, dtype=np.int64)
    elements, column = np.unique(numbers, return_inverse=True)
    structure = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    counts = np.zeros((len(offsets) - 1, len(elements)))
    np.add.at(counts, (structure, column), 1.0)
    return counts, elements


def cohesive_energy_per_atom(
    energies: Any, numbers: Any, offsets: Any
) -> tuple[np.ndarray, dict[int, float]]:
    """Cohesive energy per atom and the fitted per-element reference energies.

    Reference energies are the least-squares solution over the structures with a finite
    energy; structures without one get NaN.
    """
    energies = np.asarray(energies, dtype=np.float64)
    counts, elements = composition_counts(numbers, offsets)
    known = np.isfinite(energies)
    if not known.any():
        raise DfreError("no structure has a finite energy: cannot fit reference energies")
    references, *_ = np.linalg.lstsq(counts[known], energies[known], rcond=None)
    n_atoms = counts.sum(axis=1)
    cohesive = (energies - counts @ references) / n_atoms
    return cohesive, {int(z): float(e) for z, e in zip(elements, references, strict=True)}


def store_target(
    store: Any, target: str = COHESIVE_ENERGY, *, energy_key: str = "energy"
) -> tuple[np.ndarray, dict]:
    """Per-structure PCovR target of ``store`` and a description of it.

    ``target`` is :data:`COHESIVE_ENERGY` (from structure info ``energy_key``) or the name
    of a numeric structure info key.
    """
    keys = store.info_keys()
    if target == COHESIVE_ENERGY:
        if energy_key not in keys or not np.isfinite(_numeric_info(store, energy_key)).any():
            raise DfreError(
                f"store {store.path} has no energies (structure info '{energy_key}') for the "
                f"cohesive-energy target: give --energy-key KEY or --target with one of: "
                f"{', '.join(keys) or 'no info keys'}"
            )
        values, references = cohesive_energy_per_atom(
            _numeric_info(store, energy_key), store.numbers(), store.offsets
        )
        return values, {
            "target": COHESIVE_ENERGY,
            "energy_key": energy_key,
            "reference_energies": {str(z): e for z, e in references.items()},
        }
    if target not in keys:
        raise DfreError(
            f"store {store.path} has no structure info '{target}' to use as PCovR target; "
            f"available: {', '.join(keys) or 'none'}, or {COHESIVE_ENERGY}"
        )
    return _numeric_info(store, target), {"target": target}


def _numeric_info(store: Any, key: str) -> np.ndarray:
    values = store.info(key)
    if values.dtype.kind not in "fiu":
        raise DfreError(f"structure info '{key}' of store {store.path} is not numeric")
    return values.astype(np.float64)


def _lazy_descriptor(store: Any, name: str) -> da.Array:
    """Descriptor ``name`` of ``store`` as a dask array (never loaded whole)."""
    names = store.descriptor_names()
    if name not in names:
        raise DfreError(
            f"store {store.path} has no descriptor '{name}'{did_you_mean(name, names)}; "
            f"available: {', '.join(names) or 'none'}"
        )
    return da.from_zarr(store.group["descriptors"][name])


def project(fitted: PCovRMap, descriptor: da.Array) -> np.ndarray:
    """Map coordinates of every row of a (lazy) descriptor, block by block."""
    n_components = fitted.model.n_components_
    descriptor = descriptor.rechunk({1: -1})
    lazy = descriptor.map_blocks(
        fitted.transform, chunks=(descriptor.chunks[0], (n_components,)), dtype=np.float64
    )
    return np.asarray(lazy.compute())


@writes_store("dfre pcovr")
def pcovr_map(
    store: Any,
    descriptor: str,
    *,
    target: str = COHESIVE_ENERGY,
    energy_key: str = "energy",
    mixing: float = 0.5,
    n_components: int = 2,
    run: str | None = None,
    project_into: Sequence[Any] = (),
    max_fit: int | None = DEFAULT_MAX_FIT,
    seed: int = 0,
) -> PCovRMap:
    """Fit a map on ``descriptor`` of ``store`` and write ``results/<run>`` (module doc).

    The map is fitted on the structures with a finite descriptor and target, at most
    ``max_fit`` of them drawn at random with ``seed`` (PCovR holds its fitting rows in
    memory); every structure is then projected, block by block. Each store in
    ``project_into`` (opened for writing, holding a descriptor of the same name) gets
    the projection of its structures into this map, with the fitting store's
    coordinates as reference. Targets of projected stores are computed the same way
    when available (NaN otherwise).
    """
    x = _lazy_descriptor(store, descriptor)
    others = [_lazy_descriptor(other, descriptor) for other in project_into]
    y, target_config = store_target(store, target, energy_key=energy_key)
    candidates = np.flatnonzero(np.asarray(da.isfinite(x).all(axis=1).compute()) & np.isfinite(y))
    if max_fit is not None and len(candidates) > max_fit:
        rng = np.random.default_rng(seed)
        candidates = np.sort(rng.choice(candidates, max_fit, replace=False))
    fitted = fit_pcovr(
        np.asarray(x[candidates].compute()), y[candidates], mixing=mixing, n_components=n_components
    )
    fitted.config.update(
        target_config, energy_key=energy_key, descriptor=descriptor, max_fit=max_fit, seed=seed
    )
    run = run or f"pcovr-{descriptor}"
    coordinates = project(fitted, x)
    fit_rows = np.zeros(len(y), dtype=bool)
    fit_rows[candidates] = True
    _write(store, run, fitted, descriptor, store.path, coordinates, y, fit_rows)
    for other, other_x in zip(project_into, others, strict=True):
        try:
            other_y, _ = store_target(other, target, energy_key=energy_key)
        except DfreError:
            other_y = np.full(other_x.shape[0], np.nan)
        _write(
            other,
            run,
            fitted,
            descriptor,
            store.path,
            project(fitted, other_x),
            other_y,
            np.zeros(other_x.shape[0], bool),
            reference=(coordinates, y),
        )
    return fitted


def _write(
    store, run, fitted, descriptor, fitted_on, coordinates, target, fit_rows, reference=None
):
    """Arrays first, attributes last: a group without ``kind`` is an unfinished write."""
    group = store.create_result(run)
    arrays = {"coordinates": coordinates, "target": target, "fit_rows": fit_rows}
    if reference is not None:
        arrays["reference_coordinates"], arrays["reference_target"] = reference
    for name, values in arrays.items():
        values = np.asarray(values)
        group.create_array(name, shape=values.shape, dtype=values.dtype)[...] = values
    group.attrs.update(
        {
            "kind": "pcovr",
            "descriptor": descriptor,
            "target": fitted.config["target"],
            "fitted_on": str(fitted_on),
            "config": fitted.config,
            "dfre_version": __version__,
        }
    )
