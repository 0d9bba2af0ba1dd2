"""Selections of atomic environments: which rows train a reconstruction, which test it.

A selection is a list of folds, each a pair ``(train_rows, test_rows)`` of sorted int64
row indices into the ``n_rows`` atomic environments of a dataset. Every metric of dfre
takes one, and every result saves the one it used, so a run can be repeated exactly.

Specs (``make_selection(spec, n_rows, ...)``), all deterministic for a given ``seed``:

``random:N``
    ``N`` test environments drawn uniformly without replacement; all other rows train.
``stratified:N``
    The paper's protocol (Sec. III, SI VI): ``N`` test environments drawn at random within
    each subset, subset ``c`` receiving ``N_c`` of them in proportion to its size,
    ``N_c ≈ N n_c / n`` (largest-remainder rounding, at least one per subset when
    ``N`` is at least the number of subsets); all other rows train.
``structure:N``
    ``N`` test structures drawn at random; every environment of a test structure is a
    test row, every environment of the other structures a train row (no structure is
    split between train and test).
``kfold:K``
    Full-dataset mode: rows shuffled and split into ``K`` folds of nearly equal size;
    fold ``k`` tests its rows and trains on the other ``K - 1`` folds, so every row is
    tested exactly once.
``explicit``
    Given train and test rows (:meth:`Selection.explicit`).

Rows marked invalid (``valid[i]`` False, e.g. atoms a model could not handle) are never
selected, neither for training nor for testing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import zarr

from dfre.errors import DfreError

if TYPE_CHECKING:
    from dfre.store import Store

SPEC_KINDS = ("random", "stratified", "structure", "kfold", "explicit")
Fold = tuple[np.ndarray, np.ndarray]


def _rows(values) -> np.ndarray:
    return np.unique(np.asarray(values, dtype=np.int64).ravel())


@dataclass(frozen=True, eq=False)
class Selection:
    """Train/test folds over ``n_rows`` environments, made from ``spec`` with ``seed``."""

    spec: str
    n_rows: int
    seed: int
    folds: tuple[Fold, ...]

    def __post_init__(self):
        if not self.folds:
            raise DfreError(f"selection '{self.spec}' has no folds")
        for train, test in self.folds:
            for rows in (train, test):
                if len(rows) and (rows[0] < 0 or rows[-1] >= self.n_rows):
                    raise DfreError(
                        f"selection '{self.spec}' has rows outside 0..{self.n_rows - 1}"
                    )
                if np.any(np.diff(rows) <= 0):
                    raise DfreError(f"selection '{self.spec}' rows must be sorted and unique")
            in_test = np.zeros(self.n_rows, dtype=bool)
            in_test[test] = True
            if in_test[train].any():
                raise DfreError(f"selection '{self.spec}' has rows both in train and test")

    @property
    def train(self) -> np.ndarray:
        """Train rows of the first fold."""
        return self.folds[0][0]

    @property
    def test(self) -> np.ndarray:
        """Test rows of the first fold."""
        return self.folds[0][1]

    @property
    def n_folds(self) -> int:
        return len(self.folds)

    def test_rows(self) -> np.ndarray:
        """Test rows of all folds concatenated in fold order."""
        return np.concatenate([test for _, test in self.folds])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Selection):
            return NotImplemented
        return (self.spec, self.n_rows, self.seed, self.n_folds) == (
            other.spec,
            other.n_rows,
            other.seed,
            other.n_folds,
        ) and all(
            np.array_equal(a, c) and np.array_equal(b, d)
            for (a, b), (c, d) in zip(self.folds, other.folds, strict=True)
        )

    __hash__ = object.__hash__

    def __repr__(self) -> str:
        sizes = ", ".join(f"{len(tr)}/{len(te)}" for tr, te in self.folds[:3])
        more = ", ..." if self.n_folds > 3 else ""
        return (
            f"Selection({self.spec!r}, n_rows={self.n_rows}, seed={self.seed}, "
            f"train/test=[{sizes}{more}])"
        )

    @classmethod
    def explicit(cls, train, test, n_rows: int) -> Selection:
        """A one-fold selection of the given ``train`` and ``test`` rows."""
        return cls("explicit", int(n_rows), 0, ((_rows(train), _rows(test)),))

    # ------------------------------------------------------------------ persistence
    def save(self, group: zarr.Group) -> None:
        """Write into ``group``: attrs spec/n_rows/seed/n_folds, per fold the test rows
        (int64) and the train rows as a boolean mask over all rows (compresses to almost
        nothing even for millions of rows)."""
        group.update_attributes(
            {"spec": self.spec, "n_rows": self.n_rows, "seed": self.seed, "n_folds": self.n_folds}
        )
        chunk = max(1, min(self.n_rows, 1 << 22))
        for k, (train, test) in enumerate(self.folds):
            test_arr = group.create_array(
                f"test_{k}",
                shape=test.shape,
                chunks=(max(1, len(test)),),
                dtype="int64",
                overwrite=True,
            )
            if len(test):
                test_arr[:] = test
            mask = np.zeros(self.n_rows, dtype=bool)
            mask[train] = True
            train_arr = group.create_array(
                f"train_mask_{k}",
                shape=mask.shape,
                chunks=(chunk,),
                dtype="bool",
                overwrite=True,
            )
            if self.n_rows:
                train_arr[:] = mask

    @classmethod
    def load(cls, group: zarr.Group) -> Selection:
        """Read a selection written by :meth:`save`."""
        attrs = group.attrs
        try:
            n_folds = int(attrs["n_folds"])
            folds = tuple(
                (
                    np.flatnonzero(np.asarray(group[f"train_mask_{k}"][...])).astype(np.int64),
                    np.asarray(group[f"test_{k}"][...], dtype=np.int64),
                )
                for k in range(n_folds)
            )
            return cls(str(attrs["spec"]), int(attrs["n_rows"]), int(attrs["seed"]), folds)
        except KeyError as error:
            raise DfreError(
                f"{group.path or group} holds no complete selection (missing {error}): "
                "re-run the analysis that wrote it"
            ) from None


# ---------------------------------------------------------------------- construction
def parse_spec(spec: str) -> tuple[str, int | None]:
    """Split ``"kind:N"`` into ``(kind, N)``; ``"explicit"`` has no ``N``."""
    kind, _, count = str(spec).strip().partition(":")
    kind = kind.strip().lower()
    if kind not in SPEC_KINDS:
        raise DfreError(
            f"unknown selection '{spec}': use random:N, stratified:N, structure:N or kfold:K"
        )
    if kind == "explicit":
        return kind, None
    try:
        number = int(count)
    except ValueError:
        raise DfreError(f"selection '{spec}' needs a whole number after '{kind}:'") from None
    if number < 1:
        raise DfreError(f"selection '{spec}' needs a positive number")
    return kind, number


def make_selection(
    spec: str,
    n_rows: int,
    *,
    labels=None,
    groups=None,
    seed: int = 0,
    valid=None,
) -> Selection:
    """Build the selection ``spec`` over ``n_rows`` rows (see the module docstring).

    ``labels`` (one per row) are the strata of ``stratified``; ``groups`` (one structure
    index per row) the units of ``structure``; ``valid`` (bool per row) excludes rows.
    """
    kind, number = parse_spec(spec)
    if kind == "explicit":
        raise DfreError("an explicit selection is made with Selection.explicit(train, test, n)")
    n_rows = int(n_rows)
    pool = _valid_pool(n_rows, valid)
    rng = np.random.default_rng(seed)
    if kind == "random":
        folds = (_split(pool, _random_test(pool, number, rng, spec), n_rows),)
    elif kind == "stratified":
        if labels is None:
            raise DfreError(f"selection '{spec}' needs a subset label per row")
        labels = _per_row(labels, n_rows, "labels")
        folds = (_split(pool, _stratified_test(pool, labels, number, rng, spec), n_rows),)
    elif kind == "structure":
        if groups is None:
            raise DfreError(f"selection '{spec}' needs a structure index per row")
        groups = _per_row(groups, n_rows, "groups")
        folds = (_split(pool, _structure_test(pool, groups, number, rng, spec), n_rows),)
    else:
        folds = _kfold(pool, number, rng, spec, n_rows)
    return Selection(str(spec).strip(), n_rows, int(seed), folds)


def selection_for_store(spec: str, store: Store | str, *, seed: int = 0, valid=None) -> Selection:
    """The selection ``spec`` over the atom rows of ``store``.

    Strata are the structures' subset labels, groups their structure index; rows where
    ``valid`` is False (e.g. ``store.valid_rows(names)``) are never selected.
    """
    from dfre.store import Store

    if not isinstance(store, Store):
        store = Store.open(store)
    kind, _ = parse_spec(spec)
    labels = groups = None
    if kind == "stratified":
        codes = np.unique(store.subsets().astype(str), return_inverse=True)[1]
        labels = np.repeat(codes.astype(np.int64), store.counts)
    elif kind == "structure":
        groups = store.structure_index()
    return make_selection(spec, store.n_atoms, labels=labels, groups=groups, seed=seed, valid=valid)


# ---------------------------------------------------------------------- helpers
def _valid_pool(n_rows: int, valid) -> np.ndarray:
    if valid is None:
        return np.arange(n_rows, dtype=np.int64)
    valid = np.asarray(valid, dtype=bool)
    if valid.shape != (n_rows,):
        raise DfreError(f"valid mask has shape {valid.shape}, expected ({n_rows},)")
    return np.flatnonzero(valid).astype(np.int64)


def _per_row(values, n_rows: int, what: str) -> np.ndarray:
    values = np.asarray(values)
    if values.shape != (n_rows,):
        raise DfreError(f"selection {what} have shape {values.shape}, expected ({n_rows},)")
    return values


def _too_many(spec: str, number: int, available: int, what: str = "valid rows"):
    return DfreError(
        f"selection '{spec}' asks for {number} test items but only {available} {what} "
        "exist: ask for fewer"
    )


def _split(pool: np.ndarray, test: np.ndarray, n_rows: int) -> Fold:
    """(train, test): train is every pool row not in test; both sorted."""
    test = np.sort(test.astype(np.int64))
    in_test = np.zeros(n_rows, dtype=bool)
    in_test[test] = True
    train = pool[~in_test[pool]]
    return train, test


def _random_test(pool: np.ndarray, number: int, rng, spec: str) -> np.ndarray:
    if number > len(pool):
        raise _too_many(spec, number, len(pool))
    return rng.choice(pool, size=number, replace=False)


def stratified_quotas(sizes: np.ndarray, number: int) -> np.ndarray:
    """Test items per stratum: ``number * sizes / sizes.sum()`` rounded by largest
    remainder (ties to the larger stratum), then every empty quota raised to one (taken
    from the largest quotas) when ``number`` is at least the number of strata."""
    sizes = np.asarray(sizes, dtype=np.int64)
    exact = number * sizes / sizes.sum()
    quotas = np.floor(exact).astype(np.int64)
    remainder = number - quotas.sum()
    order = np.lexsort((-sizes, -(exact - quotas)))
    quotas[order[:remainder]] += 1
    if number >= len(sizes):
        for s in np.flatnonzero((quotas == 0) & (sizes > 0)):
            donor = int(np.argmax(quotas - exact))  # the most over-served stratum
            if quotas[donor] <= 1:
                donor = int(np.argmax(quotas))
            quotas[donor] -= 1
            quotas[s] += 1
    return np.minimum(quotas, sizes)


def _stratified_test(pool, labels, number, rng, spec) -> np.ndarray:
    if number > len(pool):
        raise _too_many(spec, number, len(pool))
    codes = np.unique(labels[pool], return_inverse=True)[1]
    order = np.argsort(codes, kind="stable")
    sizes = np.bincount(codes)
    quotas = stratified_quotas(sizes, number)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    picks = [
        rng.choice(pool[order[starts[c] : starts[c + 1]]], size=int(q), replace=False)
        for c, q in enumerate(quotas)
    ]
    return np.concatenate(picks) if picks else np.zeros(0, np.int64)


def _structure_test(pool, groups, number, rng, spec) -> np.ndarray:
    candidates = np.unique(groups[pool])
    if number > len(candidates):
        raise _too_many(spec, number, len(candidates), "structures with valid rows")
    chosen = rng.choice(candidates, size=number, replace=False)
    return pool[np.isin(groups[pool], chosen)]


def _kfold(pool, k, rng, spec, n_rows) -> tuple[Fold, ...]:
    if k < 2:
        raise DfreError(f"selection '{spec}' needs at least 2 folds")
    if k > len(pool):
        raise DfreError(
            f"selection '{spec}' asks for {k} folds but only {len(pool)} valid rows exist: "
            f"ask for at most {len(pool)} folds (kfold:2 to kfold:{len(pool)})"
        )
    parts = np.array_split(rng.permutation(pool), k)
    return tuple(_split(pool, part, n_rows) for part in parts)


def check_train_rows(
    selection: Selection, minimum: int, needs: str, fix: str = "ask for fewer test rows"
) -> None:
    """A one-line error when a fold of ``selection`` trains on fewer than ``minimum`` rows.

    ``needs`` says what needs them, e.g. ``"GFRE's 2-fold cross-validation"``, and
    ``fix`` what to do. Called by the commands before a cluster starts, so that a
    selection leaving too few train rows (``stratified:N`` with N all the rows) fails at
    once.
    """
    smallest = min(len(train) for train, _ in selection.folds)
    if smallest < minimum:
        raise DfreError(
            f"selection '{selection.spec}' leaves {smallest} train rows but {needs} needs at "
            f"least {minimum}: {fix}"
        )


def skmatter_default_split(
    n_rows: int, train_idx=None, test_idx=None, *, random_state: int = 0x5F3759DF
) -> tuple[np.ndarray, np.ndarray]:
    """The rows scikit-matter's reconstruction measures use for given (or absent) splits.

    With neither ``train_idx`` nor ``test_idx`` it is skmatter's shuffled 50/50
    ``train_test_split`` with its fixed random state; with one of them, the other is
    every remaining row; with both, they are used as given (order kept).
    """
    if train_idx is None and test_idx is None:
        from skmatter.model_selection import train_test_split

        return train_test_split(
            np.arange(n_rows),
            test_size=0.5,
            train_size=0.5,
            random_state=random_state,
            shuffle=True,
            train_test_overlap=False,
        )
    if train_idx is None:
        return np.setdiff1d(np.arange(n_rows), test_idx), np.asarray(test_idx)
    if test_idx is None:
        return np.asarray(train_idx), np.setdiff1d(np.arange(n_rows), train_idx)
    return np.asarray(train_idx), np.asarray(test_idx)
