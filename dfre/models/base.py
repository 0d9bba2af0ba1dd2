"""The feature-extractor interface and the model registry.

A :class:`FeatureExtractor` wraps one loaded model and turns a batch of structures
(``ase.Atoms``) into per-atom latent features, one array per *layer*:

* ``bb`` (backbone): the invariant per-atom features the readout head receives,
* ``ll`` (last layer): the input of the last linear map of the readout, so that
  the per-atom energy is :math:`E_i = w^\\top x_i + b` for the last-layer features
  :math:`x_i`.

Rows of the returned arrays follow the atoms of the batch in order (structure by
structure). Models are loaded once per process by :func:`load_extractor` and kept
in a module-level cache keyed by model name, device and options, so Dask tasks
pass only the model *name*; the weights are never pickled into a task.

The registry maps a model name (``chgnet-0.3.0``, ``sevennet-0``, ...) to a
:class:`ModelSpec`: its family, layers with their dimensions, the shipped weights
file (if any) and a loader.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.metadata
import inspect
import io
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dfre.errors import DfreError, did_you_mean

#: Atomic numbers 1..118, the default set of "supported" elements.
ALL_ELEMENTS = frozenset(range(1, 119))


class Unsupported(Exception):
    """A structure a model cannot handle; the message is the reason."""


@dataclass(frozen=True)
class Layer:
    """One feature set a model offers: name, dimension and what it is."""

    name: str
    dim: int | None
    definition: str


class FeatureExtractor(ABC):
    """A loaded model that maps a batch of structures to per-atom features.

    Subclasses set ``name``, ``layers`` (name -> :class:`Layer`), ``cutoff``
    (Å, the radius of the neighbour graph), ``supported_elements`` (atomic
    numbers), ``device`` and ``weights_path``, and implement :meth:`featurize`.
    """

    name: str
    layers: dict[str, Layer]
    cutoff: float
    supported_elements: frozenset[int] = ALL_ELEMENTS
    device: str = "cpu"
    weights_path: str | None = None
    packages: tuple[str, ...] = ("torch",)

    @abstractmethod
    def forward(self, batch: Any, layers: Sequence[str]) -> dict[str, np.ndarray]:
        """Run the model on a collated batch; float32 features per layer, rows in order."""

    def graph(self, atoms: Any) -> Any:
        """CPU-side input of the model for one structure (its neighbour graph).

        Raises :class:`Unsupported` with the reason when the model cannot handle
        ``atoms``. Kept apart from :meth:`forward` so that a pipeline can build the
        graphs of the next batch while the accelerator runs the current one. The
        default checks for atoms without a neighbour within :attr:`cutoff` and
        returns ``atoms`` itself.
        """
        from ase.neighborlist import neighbor_list

        isolated = len(atoms) - len(np.unique(neighbor_list("i", atoms, self.cutoff)))
        if isolated:
            raise Unsupported(self.isolated_reason(isolated))
        return atoms

    def collate(self, graphs: Sequence[Any]) -> Any:
        """One batch input from the graphs of several structures."""
        return list(graphs)

    def check(self, atoms: Any) -> str | None:
        """Cheap checks before building a graph: the reason ``atoms`` cannot be
        featurized (an element outside :attr:`supported_elements`, a single
        isolated atom), or None."""
        numbers = np.asarray(atoms.numbers)
        bad = sorted(set(numbers.tolist()) - set(self.supported_elements))
        if bad:
            from ase.data import chemical_symbols

            return f"unsupported element(s) {', '.join(chemical_symbols[z] for z in bad)}"
        if len(atoms) == 1 and not np.asarray(atoms.pbc).any():
            return "single isolated atom"
        return None

    def isolated_reason(self, n_isolated: int) -> str:
        return f"{n_isolated} atom(s) with no neighbour within the {self.cutoff:g} Å cutoff"

    def unsupported_reason(self, atoms: Any) -> str | None:
        """Why this model cannot featurize ``atoms`` (None when it can)."""
        reason = self.check(atoms)
        if reason is None:
            try:
                self.graph(atoms)
            except Unsupported as error:
                reason = str(error)
        return reason

    def run(self, batch: Any, layers: Sequence[str]) -> dict[str, np.ndarray]:
        """:meth:`forward` under a per-model lock (the hooks are per model, not per call)."""
        lock = self.__dict__.setdefault("_forward_lock", threading.Lock())
        with lock:
            return self.forward(batch, layers)

    def featurize(
        self, frames: Sequence[Any], layers: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Per-atom features of ``frames``: layer -> float32 ``(sum of atoms, dim)``.

        One batched forward pass over all ``frames``; a DfreError names the first
        structure the model cannot handle.
        """
        layers = self.check_layers(layers)
        graphs = []
        for index, atoms in enumerate(frames):
            reason = self.check(atoms)
            if reason is None:
                try:
                    graphs.append(self.graph(atoms))
                    continue
                except Unsupported as error:
                    reason = str(error)
            raise DfreError(f"model {self.name} cannot featurize structure {index}: {reason}")
        if not graphs:
            return {
                layer: np.zeros((0, self.layers[layer].dim or 0), np.float32) for layer in layers
            }
        return self.run(self.collate(graphs), layers)

    def check_layers(self, layers: Sequence[str] | None) -> list[str]:
        """The requested layers (all by default); a DfreError for a layer not offered."""
        if layers is None:
            return list(self.layers)
        unknown = [layer for layer in layers if layer not in self.layers]
        if unknown or not layers:
            raise DfreError(
                f"model {self.name} has no layer {', '.join(unknown) or '(none given)'}; "
                f"it offers: {', '.join(self.layers)}"
            )
        return list(layers)

    def attrs(self, layer: str) -> dict[str, Any]:
        """Provenance attributes of feature set ``layer`` (stored with the array)."""
        return {
            "model": self.name,
            "layer": layer,
            "layer_definition": self.layers[layer].definition,
            "weights_file": os.path.basename(self.weights_path) if self.weights_path else None,
            "weights_sha256": file_sha256(self.weights_path) if self.weights_path else None,
            "versions": package_versions(self.packages),
            "cutoff": self.cutoff,
            "dtype": "float32",
            "device": self.device,
        }


@dataclass(frozen=True)
class ModelSpec:
    """A registry entry: how to load model ``name`` and what it offers.

    ``env`` names the Python environment that serves the family: ``main`` (the one
    ``make`` builds in ``.venv``) or a family environment ``.envs/<env>`` built by
    ``make env-<env>`` from ``deploy/envs/<env>.txt``, whose Dask workers are started
    with ``--resources <env>=1``.
    """

    name: str
    family: str
    description: str
    layers: dict[str, Layer]
    loader: Callable[..., FeatureExtractor]
    package: str
    install_hint: str
    weights: Callable[[], str | None] = field(default=lambda: None)
    needs_file: bool = False
    env: str = "main"

    def package_available(self) -> bool:
        try:
            importlib.metadata.version(self.package)
        except importlib.metadata.PackageNotFoundError:
            return False
        return True

    def weights_status(self) -> str:
        """'yes' (shipped weights found), 'no', or 'user file' for user-given models."""
        if not self.package_available():
            return f"no ({self.package} not installed)"
        if self.needs_file:
            return "user file"
        try:
            path = self.weights()
        except Exception:  # a package that cannot locate its own weights
            return "no"
        return "yes" if path and os.path.isfile(path) else "no"


_REGISTRY: dict[str, ModelSpec] = {}
_FAMILY_MODULES = (
    "chgnet",
    "sevennet",
    "mace",
    "metatomic",
    "uma",
    "dpa",
    "orb",
    "mattersim",
    "generic",
)
_CACHE: dict[tuple, FeatureExtractor] = {}
_CACHE_LOCK = threading.RLock()


def register(spec: ModelSpec) -> ModelSpec:
    """Add ``spec`` to the registry (replacing an entry of the same name)."""
    _REGISTRY[spec.name] = spec
    return spec


def registry() -> dict[str, ModelSpec]:
    """All registered models, by name (importing every adapter module once)."""
    for module in _FAMILY_MODULES:
        importlib.import_module(f"dfre.models.{module}")
    return dict(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    """The registry entry of ``name``; a one-line DfreError for an unknown name."""
    models = registry()
    if name not in models:
        raise DfreError(
            f"unknown model '{name}'{did_you_mean(name, models)}; known models: "
            f"{', '.join(models)} (see `dfre models`)"
        )
    return models[name]


def load_extractor(name: str, device: str = "cpu", **options: Any) -> FeatureExtractor:
    """The extractor of model ``name`` on ``device``, loaded once per process.

    ``options`` are passed to the model's loader (e.g. ``path=`` for a user-given
    weights file, ``modal=`` for a multi-fidelity model) and are part of the cache key.
    """
    key = (name, device, tuple(sorted((k, repr(v)) for k, v in options.items())))
    with _CACHE_LOCK:
        if key not in _CACHE:
            spec = get_spec(name)
            if not spec.package_available():
                raise DfreError(
                    f"model {name} needs the Python package '{spec.package}', which is not "
                    f"installed: {spec.install_hint}"
                )
            _check_options(name, spec.loader, options)
            with contextlib.redirect_stdout(io.StringIO()):  # e.g. "CHGNet ... initialized"
                extractor = spec.loader(device=device, **options)
            extractor.load_args = (name, dict(options))  # to load it again elsewhere
            _CACHE[key] = extractor
        return _CACHE[key]


def _check_options(name: str, loader: Callable, options: dict) -> None:
    """A one-line error naming the options (``--option``, ``--weights``) that the loader
    of model ``name`` does not take, instead of a TypeError from deep inside."""
    parameters = inspect.signature(loader).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    unknown = sorted(set(options) - set(parameters))
    if unknown:
        known = [k for k in parameters if k != "device"]
        raise DfreError(
            f"model {name} does not take the option(s) {', '.join(unknown)}; it takes "
            f"{', '.join(known) or 'no options'} (see `dfre models`)"
        )


def loaded_models() -> list[str]:
    """Names of the models loaded in this process (e.g. ``client.run(loaded_models)``)."""
    return sorted({key[0] for key in _CACHE})


def set_torch_threads(n: int | None) -> None:
    """Set the number of intra-op torch threads of this process (once per value)."""
    if not n:
        return
    import torch

    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def check_checkpoint(path: str, what: str, trust: bool) -> None:
    """Refuse a user's model file that only loads by full unpickling, unless trusted.

    A ``torch.save`` file is a pickle: unpickling it can run any code it holds. Files
    that ``torch.load(weights_only=True)`` reads (tensors, plain containers) are safe,
    and then so is their loading by the model's package. Other files (a pickled
    ``nn.Module``, MACE ``.model``, fairchem checkpoints) are opened only with
    ``trust=True`` (``--trust-checkpoint``). Weights shipped inside an installed model
    package (CHGNet, SevenNet) are package data and do not pass through here.
    """
    if trust:
        return
    import pickle

    import torch

    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        raise DfreError(
            f"{what} file {path} is a full Python pickle: opening it can run any code it "
            "holds; pass --trust-checkpoint (trust_checkpoint=True) only if you trust its source"
        ) from None
    except Exception:  # not a torch.save file at all: the loader reports it
        return


def require_file(path: str | os.PathLike | None, what: str) -> str:
    """``path`` as a string if it is an existing file, else a one-line DfreError."""
    if path is None:
        raise DfreError(f"{what}: give the model file with --weights PATH")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DfreError(f"{what}: weights file {path} does not exist; check the path")
    return path


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file (read in 1 MiB blocks), cached per path and mtime."""
    path = os.fspath(path)
    key = (path, os.path.getmtime(path), os.path.getsize(path))
    if key not in _SHA_CACHE:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _SHA_CACHE[key] = digest.hexdigest()
    return _SHA_CACHE[key]


_SHA_CACHE: dict[tuple, str] = {}


def package_versions(packages: Sequence[str]) -> dict[str, str]:
    """Installed versions of ``packages`` (plus dfre itself)."""
    versions = {}
    for package in ("dfre", *packages):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def torch_device(device: str):
    """A ``torch.device``; a DfreError when CUDA is asked for but not available."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DfreError(
            f"--device {device} asked for, but torch sees no CUDA device here: use --device cpu"
        )
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise DfreError(f"unknown device '{device}': use cpu or cuda")
    return torch.device(device)


def fully_periodic(atoms: Any, cutoff: float) -> Any:
    """A fully periodic copy of ``atoms`` with the same neighbour graph within ``cutoff``,
    for models that only take periodic cells.

    Each non-periodic cell vector is replaced by ``L u``: ``u`` a unit vector
    orthogonal to the periodic vectors (and to the other new ones), and
    ``L = ptp(positions · u) + cutoff + 1``. Any periodic image then differs by at
    least ``L - ptp > cutoff`` along ``u``, so no new neighbour appears.
    """
    pbc = np.asarray(atoms.pbc, dtype=bool)
    if pbc.all():
        return atoms
    boxed = atoms.copy()
    cell = np.asarray(atoms.cell[:], dtype=np.float64)
    basis = [cell[i] / np.linalg.norm(cell[i]) for i in range(3) if pbc[i]]
    basis = [b for b in _orthonormalise(basis)]
    new_cell = cell.copy()
    for axis in np.flatnonzero(~pbc):
        u = _complement_direction(basis, cell[axis])
        basis.append(u)
        projections = boxed.positions @ u
        new_cell[axis] = u * (np.ptp(projections) + cutoff + 1.0)
    if np.linalg.det(new_cell) < 0:
        new_cell[np.flatnonzero(~pbc)[0]] *= -1
    boxed.set_cell(new_cell, scale_atoms=False)
    boxed.pbc = True
    return boxed


def _orthonormalise(vectors: list[np.ndarray]) -> list[np.ndarray]:
    basis: list[np.ndarray] = []
    for v in vectors:
        w = v - sum((v @ b) * b for b in basis) if basis else v.copy()
        basis.append(w / np.linalg.norm(w))
    return basis


def _complement_direction(basis: list[np.ndarray], hint: np.ndarray) -> np.ndarray:
    """A unit vector orthogonal to ``basis``, as close to ``hint`` as possible."""
    for candidate in (hint, *np.eye(3)):
        w = np.asarray(candidate, dtype=np.float64)
        w = w - sum((w @ b) * b for b in basis) if basis else w.copy()
        if np.linalg.norm(w) > 1e-6:
            return w / np.linalg.norm(w)
    raise ValueError("no direction orthogonal to the periodic cell vectors")


def to_numpy(tensor: Any) -> np.ndarray:
    """float32 numpy rows of a torch tensor, always detached from autograd first.

    Models that differentiate their energy for forces run their layers under their own
    ``torch.enable_grad()``, so a captured activation can require grad whatever the
    caller's ``torch.no_grad()``; reading it without ``detach()`` would fail.
    """
    return tensor.detach().float().cpu().numpy()
