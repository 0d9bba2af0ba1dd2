"""The embedded sample dataset: MAD-like subsets built only from what ships with ASE.

Structures are drawn one after another from a single ``numpy`` generator seeded with
``seed``, so a seed always gives the same structures in the same order, whatever the
batch size. Subsets (the ``subset`` info of each structure), in the spirit of the MAD
dataset:

``bulk``           elemental crystals of ``ase.collections.dcdft``, small supercells,
                   isotropic strain of at most 2 %;
``rattled-bulk``   the same, every atom displaced by a normal deviate of ``σ = 0.025 d``
                   per component (``d`` the crystal's nearest-neighbour distance),
                   clipped at ``2σ``;
``vacancies``      supercells of solid elements with one to three atoms removed;
``surfaces``       slabs (100), (110), (111) of solid elements with 6 Å vacuum
                   (``ase.build.surface``, periodic along the surface only);
``clusters``       icosahedra, octahedra and decahedra of fcc metals (``ase.cluster``),
                   spheres cut from crystals of other solids; no periodicity;
``molecules``      ``ase.collections`` g2 molecules and s22 dimers in a 5 Å vacuum box,
                   no periodicity, displaced by at most ``2 × 0.01 d``;
``random-alloys``  fcc or bcc supercells with two to four metals on random sites,
                   Vegard lattice constant, rattled like ``rattled-bulk``.

Each structure's subset is drawn with the probabilities :data:`SUBSET_WEIGHTS`, or with
weights given per subset (``subsets={"bulk": 2, "molecules": 1}``: subsets not named are
never drawn), e.g. to get more structures from the same number of atoms (bulk and
molecules hold 10 and 7 atoms on average, the other subsets 21 to 39).

Clipped displacements keep every interatomic distance above ``1 - 4√3·0.025 ≈ 0.83``
of the template's nearest-neighbour distance. Elements are those both CHGNet
(Z ≤ 94) and SevenNet-0 support: every dcdft element except Po and Rn.

Energies: ``energy`` is the total energy from ASE's EMT calculator for structures made
only of the metals EMT was fitted to (Al, Ni, Cu, Pd, Ag, Pt, Au), and NaN for all
others (EMT's H, C, N, O parameters are not fitted, so they are not used). To give
PCovR a target on a useful share of the data, bulk-like subsets draw an EMT metal
with probability 0.4; fcc random alloys draw only from the EMT metals.
"""

from __future__ import annotations

import functools
import math
import os
import threading
from collections.abc import Iterator, Mapping

import numpy as np
from ase import Atoms
from ase.data import atomic_numbers, reference_states

from dfre.errors import DfreError, did_you_mean
from dfre.lock import writes_store
from dfre.store import DEFAULT_CHUNK_ATOMS, Store, StructureBlock, require_free_space
from dfre.verify import require_intact_structures

SUBSETS = (
    "bulk",
    "rattled-bulk",
    "vacancies",
    "surfaces",
    "clusters",
    "molecules",
    "random-alloys",
)
#: Probability of each subset per structure.
SUBSET_WEIGHTS = np.array([0.15, 0.2, 0.15, 0.15, 0.1, 0.1, 0.15])

EMT_METALS = ("Al", "Ni", "Cu", "Pd", "Ag", "Pt", "Au")
BCC_METALS = ("V", "Cr", "Fe", "Mo", "W")  # lattice constants within 10 %
UNSUPPORTED = {"Po", "Rn"}
MOLECULAR_OR_NOBLE = {"H", "He", "N", "O", "F", "Ne", "Cl", "Ar", "Br", "Kr", "I", "Xe"}
EMT_PROBABILITY = 0.4
RATTLE = 0.025
MOLECULE_RATTLE = 0.01
MAX_ATOMS = 96
#: Atoms per independently seeded segment (fixed, so a seed gives one dataset).
SEGMENT_ATOMS = 1 << 14
SOURCE = "dfre sample"
#: Bytes a sample takes on disk per atom: 26 measured (positions do not compress; 23
#: atoms per structure on average share cell, offsets and info), with some margin.
BYTES_PER_ATOM = 32
_CLUSTER_LOCK = threading.Lock()


# ---------------------------------------------------------------------- templates
@functools.cache
def _crystals() -> dict[str, Atoms]:
    from ase.collections import dcdft

    return {a.get_chemical_symbols()[0]: a for a in dcdft if a.symbols[0] not in UNSUPPORTED}


@functools.cache
def _solids() -> tuple[str, ...]:
    return tuple(s for s in _crystals() if s not in MOLECULAR_OR_NOBLE)


@functools.cache
def _molecules() -> tuple[Atoms, ...]:
    from ase.collections import g2, s22

    return tuple(a for a in [*g2, *s22] if len(a) > 1)


@functools.cache
def _nearest_distance(symbol: str) -> float:
    from ase.neighborlist import neighbor_list

    return float(neighbor_list("d", _crystals()[symbol], 6.0).min())


def _molecule_distance(atoms: Atoms) -> float:
    d = np.linalg.norm(atoms.positions[:, None] - atoms.positions[None], axis=-1)
    return float(d[np.triu_indices(len(atoms), 1)].min())


# ---------------------------------------------------------------------- helpers
def _rattle(atoms: Atoms, sigma: float, rng: np.random.Generator) -> None:
    step = np.clip(rng.normal(0.0, sigma, size=(len(atoms), 3)), -2 * sigma, 2 * sigma)
    atoms.positions += step


def _strain(atoms: Atoms, rng: np.random.Generator, limit: float = 0.02) -> None:
    atoms.set_cell(atoms.cell * (1 + rng.uniform(-limit, limit)), scale_atoms=True)


def _repeat_to(atoms: Atoms, rng: np.random.Generator, low: int, high: int) -> Atoms:
    """Repeat ``atoms`` along random axes until it holds at least ``low`` atoms
    (at most ``high`` unless the cell alone is larger)."""
    reps = [1, 1, 1]
    target = rng.integers(low, high + 1)
    while len(atoms) * math.prod(reps) < target:
        axis = int(rng.integers(3))
        if len(atoms) * math.prod(reps) * (reps[axis] + 1) / reps[axis] > high:
            break
        reps[axis] += 1
    return atoms.repeat(reps)


def _element(rng: np.random.Generator, pool: tuple[str, ...]) -> str:
    if rng.random() < EMT_PROBABILITY:
        return EMT_METALS[rng.integers(len(EMT_METALS))]
    return pool[rng.integers(len(pool))]


# ---------------------------------------------------------------------- subsets
def _bulk(rng) -> Atoms:
    symbol = _element(rng, tuple(_crystals()))
    atoms = _repeat_to(_crystals()[symbol].copy(), rng, 1, 16)
    _strain(atoms, rng)
    return atoms


def _rattled_bulk(rng) -> Atoms:
    symbol = _element(rng, tuple(_crystals()))
    atoms = _repeat_to(_crystals()[symbol].copy(), rng, 4, 32)
    _strain(atoms, rng)
    _rattle(atoms, RATTLE * _nearest_distance(symbol), rng)
    return atoms


def _vacancies(rng) -> Atoms:
    symbol = _element(rng, _solids())
    atoms = _repeat_to(_crystals()[symbol].copy(), rng, 8, 48)
    n_remove = int(rng.integers(1, 4))
    del atoms[np.sort(rng.choice(len(atoms), size=n_remove, replace=False))]
    _rattle(atoms, RATTLE * _nearest_distance(symbol) / 2, rng)
    return atoms


def _surfaces(rng) -> Atoms:
    from ase.build import surface

    symbol = _element(rng, _solids())
    crystal = _crystals()[symbol]
    miller = [(1, 0, 0), (1, 1, 0), (1, 1, 1)][rng.integers(3)]
    layers = int(rng.integers(3, 6))
    slab = surface(crystal, miller, layers, vacuum=6.0)
    while len(slab) > MAX_ATOMS // 2 and layers > 1:
        layers -= 1
        slab = surface(crystal, miller, layers, vacuum=6.0)
    if len(slab) * 2 <= MAX_ATOMS:
        slab = slab.repeat((int(rng.integers(1, 3)), 1, 1))
    _rattle(slab, RATTLE * _nearest_distance(symbol) / 2, rng)
    return slab


def _fcc_cluster(symbol: str, shape: int, size: int, a: float) -> Atoms:
    from ase.cluster import Decahedron, Icosahedron, Octahedron

    if shape == 0:
        return Icosahedron(symbol, 2 + size % 2, latticeconstant=a)  # 13 or 55 atoms
    if shape == 1:
        return Octahedron(symbol, 1 + size, latticeconstant=a)  # 6 to 85 atoms
    return Decahedron(symbol, 2, 1 + size % 2, 0, latticeconstant=a)  # 7 or 13 atoms


def _clusters(rng) -> Atoms:
    symbol = _element(rng, _solids())
    state = reference_states[atomic_numbers[symbol]]
    if state and state["symmetry"] == "fcc":
        a = state["a"]
        shape = rng.integers(3)
        with _CLUSTER_LOCK:  # ase.cluster factories keep state on shared instances
            atoms = _fcc_cluster(symbol, shape, int(rng.integers(1, 5)), a)
    else:
        crystal = _crystals()[symbol].repeat(
            [max(1, math.ceil(14.0 / n)) for n in _crystals()[symbol].cell.lengths()]
        )
        middle = crystal.cell.sum(axis=0) / 2 + rng.uniform(-1.0, 1.0, size=3)
        centre = crystal.positions[np.argmin(np.linalg.norm(crystal.positions - middle, axis=1))]
        distance = np.linalg.norm(crystal.positions - centre, axis=1)
        radius = np.sort(distance)[min(int(rng.integers(8, 40)), len(crystal) - 1)] + 1e-6
        atoms = crystal[distance < radius]
    atoms.pbc = False
    atoms.set_cell(np.zeros((3, 3)))
    atoms.center(vacuum=5.0)
    _rattle(atoms, RATTLE * _nearest_distance(symbol) / 2, rng)
    atoms.pbc = False
    return atoms


def _molecule(rng) -> Atoms:
    molecules = _molecules()
    atoms = molecules[rng.integers(len(molecules))].copy()
    atoms.info = {}
    atoms.pbc = False
    atoms.center(vacuum=5.0)
    _rattle(atoms, MOLECULE_RATTLE * _molecule_distance(atoms), rng)
    return atoms


def _random_alloy(rng) -> Atoms:
    from ase.build import bulk

    fcc = rng.random() < 0.5
    pool = EMT_METALS if fcc else BCC_METALS
    n_elements = int(rng.integers(2, 5))
    elements = [pool[i] for i in rng.choice(len(pool), size=n_elements, replace=False)]
    fractions = rng.dirichlet(np.ones(n_elements))
    lattice = [reference_states[atomic_numbers[e]]["a"] for e in elements]
    a = float(np.dot(fractions, lattice))
    atoms = _repeat_to(bulk(elements[0], "fcc" if fcc else "bcc", a=a, cubic=True), rng, 8, 64)
    atoms.symbols = [elements[i] for i in rng.choice(n_elements, size=len(atoms), p=fractions)]
    _strain(atoms, rng)
    nearest = a / math.sqrt(2) if fcc else a * math.sqrt(3) / 2
    _rattle(atoms, RATTLE * nearest, rng)
    return atoms


_BUILDERS = {
    "bulk": _bulk,
    "rattled-bulk": _rattled_bulk,
    "vacancies": _vacancies,
    "surfaces": _surfaces,
    "clusters": _clusters,
    "molecules": _molecule,
    "random-alloys": _random_alloy,
}


# ---------------------------------------------------------------------- energies
def emt_energy(atoms: Atoms) -> float:
    """EMT total energy (eV) if every element is an EMT metal, else NaN."""
    from ase.calculators.emt import EMT

    if not set(atoms.get_chemical_symbols()) <= set(EMT_METALS):
        return math.nan
    atoms = atoms.copy()
    atoms.calc = EMT()
    return float(atoms.get_potential_energy())


# ---------------------------------------------------------------------- public API
def segment_targets(n_atoms: int) -> list[int]:
    """Atoms asked of each segment: ``SEGMENT_ATOMS`` each, the last one the rest."""
    n_segments = max(1, math.ceil(n_atoms / SEGMENT_ATOMS))
    return [min(SEGMENT_ATOMS, n_atoms - k * SEGMENT_ATOMS) for k in range(n_segments)]


def subset_probabilities(
    subsets: Mapping[str, float] | None = None, *, what: str = "subsets"
) -> np.ndarray:
    """Probability of each of :data:`SUBSETS`: :data:`SUBSET_WEIGHTS` for ``None``, else
    the weights given per subset name divided by their sum (0 for subsets not named).

    One-line :class:`DfreError` for an unknown subset or a weight that is negative, not
    finite or not a number, or weights that sum to 0.
    """
    if subsets is None:
        return SUBSET_WEIGHTS
    weights = np.zeros(len(SUBSETS))
    for name, weight in subsets.items():
        if name not in SUBSETS:
            raise DfreError(
                f"{what}: no subset '{name}' in the sample dataset"
                f"{did_you_mean(name, SUBSETS)}; choose from {', '.join(SUBSETS)}"
            )
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise DfreError(f"{what}: the weight of {name} must be a number, not {weight!r}")
        if not math.isfinite(weight) or weight < 0:
            raise DfreError(f"{what}: the weight of {name} must be >= 0 and finite, not {weight}")
        weights[SUBSETS.index(name)] = weight
    if weights.sum() <= 0:
        raise DfreError(f"{what}: give at least one subset a positive weight")
    return weights / weights.sum()


def sample_source(
    seed: int, n_atoms: int, *, energies: bool = True, subsets: Mapping[str, float] | None = None
) -> str:
    """The provenance ``source`` of a sample: the same text for the same dataset."""
    source = f"{SOURCE} seed={seed} atoms={n_atoms}"
    if subsets is not None:
        p = subset_probabilities(subsets)
        drawn = [f"{s}:{w:.6g}" for s, w in zip(SUBSETS, p, strict=True) if w > 0]
        source += " subsets=" + ",".join(drawn)
    return source + ("" if energies else " no-energies")


def sample_segment(
    seed: int,
    index: int,
    n_atoms: int,
    energies: bool = True,
    subsets: Mapping[str, float] | None = None,
) -> list[Atoms]:
    """Segment ``index`` of the sample of seed ``seed``: structures drawn from the generator
    seeded with ``(seed, index)`` until they hold at least ``n_atoms`` atoms.

    Each structure carries ``info["subset"]`` (drawn with :func:`subset_probabilities` of
    ``subsets``) and, with ``energies``, ``info["energy"]`` (EMT energy or NaN, see the
    module docstring). Segments are independent, so they can be built in parallel and
    still give the same dataset.
    """
    probabilities = subset_probabilities(subsets)
    rng = np.random.default_rng([int(seed), int(index)])
    frames = []
    total = 0
    while total < n_atoms:
        subset = SUBSETS[rng.choice(len(SUBSETS), p=probabilities)]
        atoms = _BUILDERS[subset](rng)
        atoms.info = {"subset": subset}
        if energies:
            atoms.info["energy"] = emt_energy(atoms)
        total += len(atoms)
        frames.append(atoms)
    return frames


def sample_structures(
    n_atoms: int,
    seed: int = 0,
    *,
    energies: bool = True,
    subsets: Mapping[str, float] | None = None,
) -> Iterator[Atoms]:
    """Yield the sample structures of seed ``seed``: at least ``n_atoms`` atoms in total,
    one segment (``SEGMENT_ATOMS`` atoms) in memory at a time."""
    for index, target in enumerate(segment_targets(n_atoms)):
        yield from sample_segment(seed, index, target, energies, subsets)


def _segment_block(
    seed: int, index: int, n_atoms: int, energies: bool, subsets: Mapping[str, float] | None
) -> StructureBlock:
    frames = sample_segment(seed, index, n_atoms, energies, subsets)
    info = {"subset": [a.info["subset"] for a in frames], "source": [SOURCE] * len(frames)}
    if energies:
        info["energy"] = [a.info["energy"] for a in frames]
    return StructureBlock.from_atoms(frames, info)


@writes_store("dfre sample", create=True)
def check_sample_size(store: str | os.PathLike | Store, n_atoms: int) -> None:
    """One-line errors before any work: ``n_atoms`` must be positive, and the sample
    (about :data:`BYTES_PER_ATOM` bytes per atom) must fit on the store's file system."""
    if n_atoms < 1:
        raise DfreError(f"--atoms must be a positive number of atoms, not {n_atoms}")
    path = store.path if isinstance(store, Store) else os.fspath(store)
    require_free_space(path, n_atoms * BYTES_PER_ATOM, f"a sample of {n_atoms} atoms")


def write_sample(
    store: str | os.PathLike | Store,
    n_atoms: int,
    seed: int = 0,
    *,
    chunk_atoms: int = DEFAULT_CHUNK_ATOMS,
    energies: bool = True,
    subsets: Mapping[str, float] | None = None,
    progress=None,
    log=None,
) -> Store:
    """Append the sample dataset of at least ``n_atoms`` atoms (seed ``seed``; subset
    weights ``subsets``, see :func:`subset_probabilities`) to ``store``.

    A path that holds nothing yet becomes a new store with ``chunk_atoms`` rows per chunk.
    Segments are built as dask tasks on the active scheduler (a ``distributed.Client``
    if one is running), a few at a time, and appended in order, in batches of about one
    chunk; so memory stays bounded and the result does not depend on the scheduler.
    Per-structure info: ``subset``, ``energy``, ``source`` and ``frame`` (index in the
    sample). The run is recorded in the provenance, batch by batch: the same call on a
    store that already holds this sample does nothing, and after an interruption it
    resumes at the first segment not committed. ``progress(n_atoms_written)`` is called
    after each committed batch, ``log(line)`` with a line when there is nothing to do.
    """
    import dask

    check_sample_size(store, n_atoms)
    source = sample_source(seed, n_atoms, energies=energies, subsets=subsets)
    if not isinstance(store, Store):
        store = Store.open_or_create(store, chunk_atoms=chunk_atoms)
    if store.n_structures:  # appending builds on the last chunks: they must decode
        require_intact_structures(store)
    record = {"source": source, "format": "dfre-sample", "seed": int(seed), "complete": False}
    previous = next((r for r in store.provenance if r.get("source") == source), None)
    if previous is not None and previous.get("complete"):
        if log is not None:
            log(f"{store.path} already holds the sample '{source}': nothing to do")
        return store
    targets = segment_targets(n_atoms)
    window = max(2, 2 * _n_workers())
    pending: list[StructureBlock] = []
    frames = done = segments = 0
    if previous is not None:  # resume after an interrupted run
        frames, done = int(previous["frames_done"]), int(previous["atoms_done"])
        segments = int(previous["segments_done"])

    def flush(last: bool) -> None:
        nonlocal frames, done, pending
        block = StructureBlock.concatenate(pending)
        block.info["frame"] = list(range(frames, frames + block.n_structures))
        frames += block.n_structures
        done += block.n_atoms
        counts = {"frames_done": frames, "atoms_done": done, "segments_done": segments}
        store.append(block, provenance={**record, **counts, "complete": last})
        pending = []
        if progress is not None:
            progress(done)

    make = dask.delayed(_segment_block, pure=True)
    for first in range(segments, len(targets), window):
        ks = range(first, min(first + window, len(targets)))
        for block in dask.compute(*[make(seed, k, targets[k], energies, subsets) for k in ks]):
            pending.append(block)
            segments += 1
            if sum(b.n_atoms for b in pending) >= store.chunk_atoms and segments < len(targets):
                flush(last=False)
    if pending:
        flush(last=True)
    return store


def _n_workers() -> int:
    try:
        from distributed import get_client

        return len(get_client().scheduler_info()["workers"])
    except (ImportError, ValueError):
        return 1
