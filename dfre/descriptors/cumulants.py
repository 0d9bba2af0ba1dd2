"""Structure-level cumulant descriptors of atomic features (paper Sec. III F, SI XII).

For a structure :math:`S` with atomic feature rows :math:`\\xi_{S,i}` (:math:`i=1..N_S`),
entry-wise per feature column,

.. math::

    \\bar\\xi_S = \\frac{1}{N_S}\\sum_i \\xi_{S,i}, \\qquad
    \\mu^{(k)}_S = \\frac{1}{N_S}\\sum_i (\\xi_{S,i} - \\bar\\xi_S)^k .

Cumulants follow from moments by the general moment-cumulant recursion

.. math::

    \\kappa_n = m_n - \\sum_{m=1}^{n-1} \\binom{n-1}{m-1}\\, \\kappa_m\\, m_{n-m},

applied to the central moments (:math:`m_1 = \\mu^{(1)} = 0`, :math:`m_n = \\mu^{(n)}`);
cumulants of order >= 2 do not depend on the shift, and :math:`\\kappa_1 = \\bar\\xi_S`.
No order-specific formula is hard-coded, so any order M works (the SI lists the
formulas up to 8; the tests check the recursion against them).

The descriptor is the concatenation of signed-root cumulants (eqs. 18-19)

.. math::

    \\tilde\\kappa^{(k)}_S = \\mathrm{sign}(\\kappa^{(k)}_S)\\,|\\kappa^{(k)}_S|^{1/k}, \\qquad
    \\phi^{(M)}_S = [\\tilde\\kappa^{(1)}_S, \\dots, \\tilde\\kappa^{(M)}_S],

so column block ``k-1`` (columns ``(k-1)*d : k*d``) of :math:`\\phi^{(M)}` holds order k.

Numerics: float64, two-pass centring with one correction pass, and the moments are
computed on the feature standardised per structure (:math:`z = (\\xi-\\bar\\xi)/s`,
:math:`s^2=\\mu^{(2)}`). Cumulants are homogeneous, :math:`\\kappa_k(s z) = s^k\\kappa_k(z)`,
so :math:`\\tilde\\kappa^{(k)} = s\\,\\tilde\\kappa^{(k)}(z)`: powers never over- or underflow
whatever the order and the feature scale. A one-atom structure has all cumulants of
order >= 2 equal to zero (and signed root 0), reported once as a :class:`CumulantNotice`.

Streaming: the per-atom feature array is rechunked so that every chunk edge falls on a
structure boundary; each chunk becomes one task producing the rows of its structures.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from math import comb
from typing import Any

import dask
import dask.array as da
import numpy as np

from dfre.cluster import compute
from dfre.defaults import CHUNK_ATOMS
from dfre.errors import DfreError
from dfre.linalg.backend import array_module, to_numpy
from dfre.lock import writes_store

#: Target number of atom rows per aligned chunk when the input is a numpy array.
DEFAULT_CHUNK_ROWS = 1 << 16
#: Target bytes per chunk of the stored descriptor array.
_STORE_CHUNK_BYTES = 16 << 20


class CumulantNotice(UserWarning):
    """Something the user should know about a cumulant descriptor (not an error)."""


# ---------------------------------------------------------------------- the recursion
def cumulants_from_moments(moments: Sequence[Any]) -> list[Any]:
    """Cumulants :math:`\\kappa_1..\\kappa_M` from raw moments :math:`m_1..m_M`.

    ``moments[n-1]`` is :math:`m_n = E[X^n]` (numbers, ``Fraction``s or arrays, all of the
    same shape). Uses :math:`\\kappa_n = m_n - \\sum_{m=1}^{n-1} \\binom{n-1}{m-1}
    \\kappa_m m_{n-m}`, exact for exact inputs.
    """
    kappas: list[Any] = []
    for n in range(1, len(moments) + 1):
        kappa = moments[n - 1]
        for m in range(1, n):
            kappa = kappa - comb(n - 1, m - 1) * kappas[m - 1] * moments[n - m - 1]
        kappas.append(kappa)
    return kappas


def cumulants_from_central_moments(mean: Any, central_moments: Sequence[Any]) -> list[Any]:
    """Cumulants :math:`\\kappa_1..\\kappa_M` from the mean and central moments.

    ``central_moments[j]`` is :math:`\\mu^{(j+2)}` (orders 2..M). The recursion runs on
    the centred variable (:math:`m_1 = 0`), whose cumulants of order >= 2 are those of
    the variable itself, and :math:`\\kappa_1` is the mean.
    """
    if not central_moments:
        return [mean]
    zero = central_moments[0] * 0
    kappas = cumulants_from_moments([zero, *central_moments])
    kappas[0] = mean
    return kappas


def signed_root(kappa: Any, order: int) -> Any:
    """:math:`\\mathrm{sign}(\\kappa)|\\kappa|^{1/k}` entry-wise (0 stays 0)."""
    xp = array_module(kappa)
    return xp.sign(kappa) * xp.abs(kappa) ** (1.0 / order)


# ---------------------------------------------------------------------- one block
def segment_sum_operator(offsets: np.ndarray, xp: Any = np) -> Any:
    """Sparse (n_structures, n_rows) CSR matrix S with S @ X = per-structure sums of X.

    Row s holds ones in columns ``offsets[s]:offsets[s+1]`` (the CSR ``indptr`` is the
    offsets themselves). SciPy for numpy data, ``cupyx.scipy.sparse`` for CuPy data.
    """
    if xp is np:
        import scipy.sparse as sparse
    else:  # pragma: no cover - needs a GPU
        import cupyx.scipy.sparse as sparse
    n_rows = int(offsets[-1])
    return sparse.csr_matrix(
        (xp.ones(n_rows), xp.arange(n_rows, dtype=xp.int64), xp.asarray(offsets)),
        shape=(len(offsets) - 1, n_rows),
    )


def structure_cumulants(features: Any, offsets: Any, order: int, *, signed: bool = True) -> Any:
    """Per-structure cumulants of ``features`` (n_atoms, d) up to ``order``.

    ``offsets`` (n_structures + 1,) gives the rows of structure s as
    ``offsets[s]:offsets[s+1]`` (``offsets[0] == 0``, ``offsets[-1] == n_atoms``, every
    structure non-empty). Returns float64 (n_structures, order * d): the descriptor
    :math:`\\phi^{(M)}` when ``signed`` (default), else the raw cumulants
    :math:`[\\kappa^{(1)}, ..., \\kappa^{(M)}]`. Numpy or CuPy, following ``features``.
    """
    xp = array_module(features)
    x = xp.asarray(features, dtype=xp.float64)
    offsets = np.asarray(offsets, dtype=np.int64)
    counts = np.diff(offsets)
    n_structures, dim = len(counts), x.shape[1]
    if n_structures == 0:
        return xp.zeros((0, order * dim), dtype=xp.float64)
    rows_of = xp.asarray(np.repeat(np.arange(n_structures), counts))
    n = xp.asarray(counts, dtype=xp.float64)[:, None]
    summer = segment_sum_operator(offsets, xp)

    def segment_mean(values):
        return (summer @ values) / n

    mean = segment_mean(x)
    centred = x - mean[rows_of]
    correction = segment_mean(centred)  # removes the rounding error of the first pass
    mean += correction
    centred -= correction[rows_of]
    blocks = [mean]
    if order >= 2:
        scale = xp.sqrt(segment_mean(centred * centred))
        scale = xp.where(scale > 0, scale, 1.0)  # constant column or one atom: all zeros
        z = centred / scale[rows_of]
        power = z.copy()
        central = []
        for _ in range(2, order + 1):
            power *= z
            central.append(segment_mean(power))
        kappas = cumulants_from_central_moments(mean, central)
        for k in range(2, order + 1):
            if signed:
                blocks.append(scale * signed_root(kappas[k - 1], k))
            else:
                blocks.append(scale**k * kappas[k - 1])
    return xp.concatenate(blocks, axis=1)


# ---------------------------------------------------------------------- whole datasets
def check_order(order: Any) -> int:
    """``order`` as an int >= 1, or a :class:`DfreError`."""
    if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or order < 1:
        raise DfreError(
            f"cumulant order must be an integer >= 1 (got {order!r}): use order 1 or more"
        )
    return int(order)


def check_offsets(offsets: Any, n_rows: int) -> np.ndarray:
    """Validate structure offsets against ``n_rows`` feature rows."""
    offsets = np.asarray(offsets, dtype=np.int64)
    if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != n_rows:
        raise DfreError(
            f"structure offsets must run from 0 to the {n_rows} feature rows "
            f"(got {offsets[:1].tolist()}...{offsets[-1:].tolist()}): pass the store's offsets"
        )
    counts = np.diff(offsets)
    if (counts < 0).any():
        raise DfreError("structure offsets must be non-decreasing")
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        raise DfreError(
            f"structure {int(empty[0])} has no atoms ({len(empty)} empty structures): "
            "cumulants need at least one atom per structure; remove empty structures"
        )
    return offsets


def _notice_single_atoms(offsets: np.ndarray, order: int) -> None:
    single = np.flatnonzero(np.diff(offsets) == 1)
    if order >= 2 and len(single):
        warnings.warn(
            f"{len(single)} structure(s) have a single atom (first: structure {int(single[0])}): "
            "their cumulants of order >= 2 are zero",
            CumulantNotice,
            stacklevel=3,
        )


def aligned_row_chunks(offsets: np.ndarray, target_rows: int) -> tuple[int, ...]:
    """Row chunk sizes of at most ``target_rows`` whose edges fall on structure offsets.

    Each chunk takes as many whole structures as fit in ``target_rows``; a structure
    larger than that gets a chunk of its own.
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    n_rows = int(offsets[-1])
    target_rows = max(int(target_rows), 1)
    edges = [0]
    while edges[-1] < n_rows:
        edge = edges[-1]
        fit = int(offsets[np.searchsorted(offsets, edge + target_rows, side="right") - 1])
        if fit <= edge:  # the next structure alone is larger than the target
            fit = int(offsets[np.searchsorted(offsets, edge, side="right")])
        edges.append(fit)
    return tuple(np.diff(edges).tolist()) if n_rows else (0,)


def cumulant_descriptor(
    features: Any, offsets: Any, order: int, *, chunk_rows: int | None = None
) -> da.Array:
    """Lazy :math:`\\phi^{(M)}` (n_structures, order * d) of per-atom ``features``.

    ``features`` is a numpy, CuPy or dask array (n_atoms, d); ``offsets`` the structure
    offsets (n_structures + 1,). The rows are rechunked to chunks of about
    ``chunk_rows`` atoms (default: the input's first chunk size) with edges on structure
    boundaries; each chunk is one task. Emits a :class:`CumulantNotice` when a
    structure has a single atom and ``order >= 2``.
    """
    order = check_order(order)
    offsets = check_offsets(offsets, features.shape[0])
    _notice_single_atoms(offsets, order)
    x = features
    if not isinstance(x, da.Array):  # name=False: no hash of the data (two host copies on CuPy)
        x = da.from_array(x, chunks=-1, asarray=False, name=False)
    if chunk_rows is None:
        native = isinstance(features, da.Array) and x.shape[0] > 0
        chunk_rows = x.chunks[0][0] if native else DEFAULT_CHUNK_ROWS
    row_chunks = aligned_row_chunks(offsets, chunk_rows)
    x = x.rechunk((row_chunks, -1))
    dim = x.shape[1]
    edges = np.concatenate([[0], np.cumsum(row_chunks)])
    meta = x._meta.astype(np.float64)
    parts = []
    for block, lo, hi in zip(x.to_delayed().ravel(), edges[:-1], edges[1:], strict=True):
        first, last = np.searchsorted(offsets, [lo, hi])
        local = offsets[first : last + 1] - lo
        result = dask.delayed(structure_cumulants, pure=True)(block, local, order)
        parts.append(
            da.from_delayed(
                result, shape=(len(local) - 1, order * dim), dtype=np.float64, meta=meta
            )
        )
    if not parts:
        return da.zeros((0, order * dim), dtype=np.float64)
    return da.concatenate(parts, axis=0)


def descriptor_name(feature_name: str, order: int) -> str:
    """Store name of the cumulant descriptor, e.g. ``cumulants-chgnet-0.3.0-ll-M8``."""
    return f"cumulants-{feature_name.replace('/', '-')}-M{order}"


def structures_with_masked_atoms(store: Any, feature_name: str) -> np.ndarray:
    """Boolean (n_structures,): structures with an atom the model could not handle."""
    mask = store.feature_mask(feature_name)
    if store.n_atoms == 0:
        return np.zeros(store.n_structures, dtype=bool)
    return np.add.reduceat(mask.astype(np.int64), store.offsets[:-1]) > 0


def structures_per_block(offsets: np.ndarray, target_atoms: int, width: int) -> int:
    """Structures per task (and per stored chunk) of :func:`compute_cumulants`.

    About ``target_atoms`` atoms per block on average, and at most
    :data:`_STORE_CHUNK_BYTES` of float64 output rows.
    """
    n_structures = len(offsets) - 1
    mean_atoms = max(float(offsets[-1]) / max(n_structures, 1), 1.0)
    by_atoms = int(target_atoms // mean_atoms)
    by_bytes = _STORE_CHUNK_BYTES // (8 * max(width, 1))
    return max(1, min(by_atoms, by_bytes, n_structures))


def _cumulants_to_zarr(source, target, offsets, first, order, masked, device="cpu") -> int:
    """One task: read the rows of a block of structures, write their descriptor rows."""
    lo, hi = int(offsets[0]), int(offsets[-1])
    rows = source[lo:hi]
    if device == "cuda":  # pragma: no cover - needs a GPU
        import cupy

        rows = cupy.asarray(rows)
    phi = to_numpy(structure_cumulants(rows, offsets - lo, order))
    phi[masked] = np.nan
    target[first : first + len(phi)] = phi
    return len(phi)


@writes_store("dfre cumulants")
def compute_cumulants(
    store: Any,
    feature_name: str,
    order: int,
    *,
    name: str | None = None,
    block_atoms: int | None = None,
    device: str = "cpu",
) -> str:
    """Compute :math:`\\phi^{(M)}` of feature set ``feature_name`` into ``descriptors/``.

    ``store`` is a :class:`dfre.store.Store` opened for writing. The array is
    ``descriptors/<name>`` float64 (n_structures, order * d) (default name from
    :func:`descriptor_name`). Each task of the active Dask scheduler reads the atom rows
    of a block of whole structures (about ``block_atoms`` atoms, default the feature
    chunk size but at least :data:`dfre.defaults.CHUNK_ATOMS`: every descriptor chunk
    costs the FRE studies one D x D statistics matrix per group) straight from Zarr and
    writes exactly one chunk of the descriptor, so no data moves between workers.
    Structures containing atoms masked for that model get NaN rows. ``device="cuda"``
    computes each block with CuPy on the worker's GPU.
    Attributes: ``kind="cumulants"``, ``feature``, ``order``, ``dim`` (d),
    ``layout`` and ``complete`` (written last: without ``complete=True`` it is unfinished).
    Returns the descriptor name.
    """
    order = check_order(order)
    if device not in ("cpu", "cuda"):
        raise DfreError(f"device must be 'cpu' or 'cuda' (got {device!r})")
    source = store.feature_array(feature_name)
    offsets = check_offsets(store.offsets, store.n_atoms)
    _notice_single_atoms(offsets, order)
    name = name or descriptor_name(feature_name, order)
    dim = int(source.shape[1])
    width = order * dim
    n_structures = len(offsets) - 1
    block = structures_per_block(offsets, block_atoms or max(source.chunks[0], CHUNK_ATOMS), width)
    masked = structures_with_masked_atoms(store, feature_name)
    target = store.group["descriptors"].create_array(
        name,
        shape=(n_structures, width),
        chunks=(block, max(width, 1)),
        dtype="float64",
        overwrite=True,
    )
    target.attrs.update({"kind": "cumulants", "complete": False})
    write = dask.delayed(_cumulants_to_zarr, pure=True)
    tasks = [
        write(source, target, offsets[s : s + block + 1], s, order, masked[s : s + block], device)
        for s in range(0, n_structures, block)
    ]
    compute(*tasks, label=f"cumulants of {feature_name} up to order {order}")
    target.attrs.update(
        {
            "kind": "cumulants",
            "feature": feature_name,
            "order": order,
            "dim": dim,
            "masked_structures": int(masked.sum()),
            "layout": "columns (k-1)*dim:k*dim hold sign(kappa_k)|kappa_k|^(1/k), k=1..order",
            "complete": True,
        }
    )
    return name


# ---------------------------------------------------------------------- studies
def cumulant_block(phi: Any, k: int, dim: int) -> Any:
    """The signed-root cumulant of order ``k`` alone, columns ``(k-1)*dim : k*dim``."""
    return phi[:, (k - 1) * dim : k * dim]


def cumulative_feature_sets(phi: Any, dim: int, orders: Sequence[int] | None = None) -> Mapping:
    """Feature sets :math:`\\phi^{(m)}` (m = 1..M) for the FRE-between-orders study (Fig. 8).

    :math:`\\phi^{(m)}` is the first ``m * dim`` columns of :math:`\\phi^{(M)}`; keys are
    ``"phi(m)"``. Pass the result to ``dfre.metrics.gfre_matrix`` / ``lfre_matrix``.
    """
    max_order = phi.shape[1] // dim
    if dim < 1 or phi.shape[1] != max_order * dim:
        raise DfreError(
            f"descriptor width {phi.shape[1]} is not a multiple of the feature dimension {dim}"
        )
    orders = list(orders) if orders is not None else list(range(1, max_order + 1))
    for m in orders:
        if not 1 <= m <= max_order:
            raise DfreError(f"order {m} is not in the descriptor (orders 1..{max_order})")
    return {f"phi({m})": phi[:, : m * dim] for m in orders}


def structure_fre(
    store: Any,
    feature_sets: Mapping[str, Any],
    *,
    metric: str = "gfre",
    selection: Any = "kfold:2",
    seed: int = 0,
    k: int | None = None,
    run: str,
    config: dict | None = None,
) -> Any:
    """GFRE or LFRE between structure-level feature sets (rows = structures of ``store``).

    Rows where any feature set is not finite (structures with masked atoms) are never
    selected. ``selection`` is a spec over structures (strata: subsets) or a ready
    selection; ``metric`` ``"gfre"`` (:func:`dfre.metrics.gfre_matrix`, with pointwise
    errors) or ``"lfre"`` (:func:`dfre.metrics.lfre.lfre_matrix` with ``k`` neighbours,
    default per pair the smaller dimension). Writes ``results/<run>`` with
    ``config["level"] = "structure"`` plus ``config``; returns the result.
    """
    from dfre.data.selection import make_selection

    if metric not in ("gfre", "lfre"):
        raise DfreError(f"metric must be 'gfre' or 'lfre' (got {metric!r})")
    n_structures = store.n_structures
    valid = np.ones(n_structures, dtype=bool)
    for name, values in feature_sets.items():
        if values.shape[0] != n_structures:
            raise DfreError(
                f"feature set {name} has {values.shape[0]} rows, the store has "
                f"{n_structures} structures"
            )
        finite = da.isfinite(da.asarray(values)).all(axis=1)
        # numpy inside the tasks: device (CuPy) rows come back as a host mask
        valid &= finite.map_blocks(to_numpy, meta=np.empty((0,), dtype=bool)).compute()
    if isinstance(selection, str):
        codes = np.unique(np.asarray(store.subsets()).astype(str), return_inverse=True)[1]
        selection = make_selection(selection, n_structures, labels=codes, seed=seed, valid=valid)
    from dfre.metrics.diagnostics import describe_rows

    options = {
        "describe": lambda rows: describe_rows(store, rows, level="structures"),
        "row_name": "structures",
    }
    if metric == "gfre":
        from dfre.metrics.gfre import gfre_matrix, write_result

        result = gfre_matrix(dict(feature_sets), selection, pointwise=True, **options)
    else:
        from dfre.metrics.lfre import lfre_matrix, write_result

        result = lfre_matrix(dict(feature_sets), selection, k, **options)
    result.config.update({"level": "structure", "seed": seed, **(config or {})})
    write_result(store, run, result)
    return result


def _complete_cumulants(store: Any, descriptor: str) -> tuple[da.Array, dict]:
    """A stored cumulant descriptor as a lazy dask array, and its attributes."""
    array = store.descriptor_array(descriptor)  # unknown names, wrong rows raise
    values = da.from_zarr(array)
    attrs = dict(array.attrs)
    if attrs.get("kind") != "cumulants" or not attrs.get("complete"):
        raise DfreError(
            f"descriptor {descriptor} is not a complete cumulant descriptor: "
            "make it with `dfre cumulants`"
        )
    return values, attrs


@writes_store("dfre cumulants --study")
def cumulant_order_study(
    store: Any,
    descriptor: str,
    *,
    metric: str = "gfre",
    selection: Any = "kfold:2",
    seed: int = 0,
    orders: Sequence[int] | None = None,
    k: int | None = None,
    run: str | None = None,
) -> Any:
    """FRE between cumulant orders (Fig. 8): :math:`\\phi^{(m)}` vs :math:`\\phi^{(m')}`.

    The feature sets are the prefixes :func:`cumulative_feature_sets` of the stored
    cumulant descriptor ``descriptor``; see :func:`structure_fre` for the other
    arguments. LFRE neighbours ``k`` default to :math:`\\min(d, d')` per pair: the paper's
    text states :math:`\\max(d, d')` for Fig. 8 while its analysis code uses the minimum
    (``k="max"`` follows the text; :func:`dfre.metrics.lfre.k_matrix`). Writes
    ``results/<run>`` (default ``<metric>-orders-<descriptor>``) with
    ``config["study"] = "cumulant-orders"``; returns the result.
    """
    phi, attrs = _complete_cumulants(store, descriptor)
    return structure_fre(
        store,
        cumulative_feature_sets(phi, int(attrs["dim"]), orders),
        metric=metric,
        selection=selection,
        seed=seed,
        k=k,
        run=run or f"{metric}-orders-{descriptor}",
        config={"study": "cumulant-orders", "descriptor": descriptor},
    )


@writes_store("dfre cumulants --study")
def cross_model_cumulants(
    store: Any,
    descriptors: Sequence[str],
    *,
    metric: str = "gfre",
    selection: Any = "kfold:2",
    seed: int = 0,
    k: int | None = None,
    run: str | None = None,
) -> Any:
    """FRE between the cumulant descriptors of several models (Fig. S10).

    Each stored descriptor (e.g. :math:`\\phi^{(8)}` of every model) is one feature set,
    named after the feature set it was computed from. Writes ``results/<run>`` (default
    ``<metric>-cumulants``) with ``config["study"] = "cross-model-cumulants"``.
    """
    sets = {}
    for descriptor in descriptors:
        values, attrs = _complete_cumulants(store, descriptor)
        sets[f"{attrs['feature']} M{attrs['order']}"] = values
    if len(sets) != len(descriptors):
        raise DfreError(f"descriptors are repeated in {list(descriptors)}: give each once")
    return structure_fre(
        store,
        sets,
        metric=metric,
        selection=selection,
        seed=seed,
        k=k,
        run=run or f"{metric}-cumulants",
        config={"study": "cross-model-cumulants", "descriptors": list(descriptors)},
    )
