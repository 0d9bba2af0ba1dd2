"""Reports of a store's results: figures (PNG and SVG), one HTML page, chemiscope export.

:func:`make_report` writes ``index.html`` and the figures of every ``results/<run>``:

- the page opens with a plain-language header: the dataset, the models and layers, the
  selections and test environments, masked atoms, and the main findings (which feature
  set the others reconstruct best and worst, whose features reconstruct the others best);
- ``kind`` ``gfre`` / ``lfre``: the matrix as a heat map (row = source, column =
  target, values in cells); for GFRE also the linear CKA (symmetric, its own colours);
  with ``pointwise`` and ``test_rows``, the errors per subset and (for atom-level
  results) per element of the test rows, one facet per source feature set, each group
  labelled with its number of test environments and groups with fewer than
  ``min_count`` left out (listed). Every number is also in a sortable table.
  Results of the studies of :mod:`dfre.descriptors.cumulants` (``config["study"]``
  ``cumulant-orders``, ``cross-model-cumulants``) are titled as such;
- ``kind`` ``pcovr``: the map coloured by subset and by target (with its units;
  structures without a target marked and counted; the fitting store in grey when the
  map was fitted on another store);
- results whose ``config["checkpoints"]`` is ``{"epochs": [...], "reference": NAME}``
  (one epoch per feature set of ``names``): FRE of each checkpoint against the reference,
  as curves.

Each result's settings are shown on demand as a table, and all of them are written to
``runs.json`` next to the page. Per-result additions (e.g. uncertainties: see the
``errors`` argument of :func:`dfre.report.figures.heatmap`) go into :func:`fre_section`.

Rows of ``test_rows`` are atom rows unless ``config["level"] == "structure"`` or every
feature set of the result is a descriptor of the store (structure rows).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from dfre import progress
from dfre.errors import DfreError

FRE_KINDS = ("gfre", "lfre")
#: Breakdowns leave out groups (subsets, elements) with fewer test environments.
DEFAULT_MIN_COUNT = 10
#: Section title prefixes of known studies (``config["study"]`` of a result).
STUDY_TITLES = {
    "cumulant-orders": "FRE between cumulant orders: ",
    "cross-model-cumulants": "FRE between cumulant descriptors of models: ",
    "checkpoints": "FRE along training checkpoints: ",
}
#: What each metric measures, for the text above its figures.
MEANINGS = {
    "gfre": "GFRE is the test error of the best linear map from the source features to the "
    "target features (both centred and scaled to unit variance): 0 means the source holds "
    "all of the target's information in a linear form, about 1 or more that it holds "
    "almost none of it. The matrix is not symmetric.",
    "lfre": "LFRE is the same error with a separate linear map for each test environment, "
    "fitted on its k nearest neighbours in the source space: it tells whether the target "
    "features are a locally linear function of the source features. The matrix is not "
    "symmetric.",
}
#: Units of PCovR targets by structure info key (dfre stores ASE's units: eV, Å).
TARGET_UNITS = {"cohesive_energy": "eV/atom", "energy": "eV", "free_energy": "eV"}
SETTINGS_FILE = "runs.json"
#: Keys of the figures in a report folder, so that a new report redraws only what changed.
MANIFEST = ".figures.json"


@dataclass
class Report:
    """What :func:`make_report` wrote."""

    html: str
    figures: list[str]
    skipped: list[str]


class _Figures:
    """Draws the figures of a report and attaches them to their sections.

    :meth:`add` records what to draw; :meth:`draw` draws everything at the end: on the
    workers of the active distributed cluster when there is one (each task returns the
    PNG and SVG bytes, written here, so the workers need not see the report folder),
    else here, one after the other. A figure whose key (its result's files and
    settings, the report code, the options) is the one recorded in the folder's
    :data:`MANIFEST` by an earlier report, and whose files are still there, is not
    drawn again.
    """

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.written: list[str] = []
        self.path = os.path.join(out_dir, MANIFEST)
        try:
            with open(self.path, encoding="utf-8") as fh:
                self.previous = json.load(fh)
        except (OSError, ValueError):
            self.previous = {}
        self.current: dict[str, Any] = {}
        self.key = ""
        self.jobs: list[tuple] = []  # (section, place, stem, make, caption, wide)

    def add(self, section, make, stem: str, caption: str, *, wide: bool = False) -> None:
        """Attach the figures ``make()`` returns (one, a list, or None) to ``section`` as
        ``<stem>`` (or ``<stem>-1``, ``<stem>-2``, ... for several)."""
        stem = _safe(stem)
        old = self.previous.get(stem) or {}
        stems = old.get("stems")
        up_to_date = (
            old.get("key") == self.key
            and stems is not None
            and all(os.path.isfile(self._path(s, ext)) for s in stems for ext in ("png", "svg"))
        )
        place: list = []  # filled with the FigureFiles when drawn
        section.figures.append(place)
        self.jobs.append((section, place, stem, None if up_to_date else make, caption, wide))
        self.current[stem] = {"key": self.key, "stems": stems if up_to_date else None}

    def draw(self) -> None:
        """Draw what is not up to date and put every figure in its place."""
        from dfre.report.html import FigureFile

        todo = [job for job in self.jobs if job[3] is not None]
        drawn = _draw_all([(stem, make) for _, _, stem, make, _, _ in todo])
        for (_, _, stem, _, _, _), files in zip(todo, drawn, strict=True):
            for name, png, svg in files:
                for ext, data in (("png", png), ("svg", svg)):
                    with open(self._path(name, ext), "wb") as fh:
                        fh.write(data)
            self.current[stem]["stems"] = [name for name, _, _ in files]
        for section, place, stem, _, caption, wide in self.jobs:
            for name in self.current[stem]["stems"]:
                png, svg = self._path(name, "png"), self._path(name, "svg")
                place.append(FigureFile(caption, png, svg, wide=wide))
                self.written += [png, svg]
            index = next(i for i, item in enumerate(section.figures) if item is place)
            section.figures[index : index + 1] = place
        with open(self.path, "w", encoding="utf-8") as fh:
            json.dump(self.current, fh, indent=1)

    def _path(self, stem: str, ext: str) -> str:
        return os.path.join(self.out_dir, f"{stem}.{ext}")


def draw_figures(stem: str, make) -> list[tuple[str, bytes, bytes]]:
    """``(name, PNG bytes, SVG bytes)`` of the figures ``make()`` returns (a Dask task)."""
    import tempfile

    from dfre.report import figures as fig

    made = make()
    made = [] if made is None else made if isinstance(made, list) else [made]
    names = [stem] if len(made) == 1 else [f"{stem}-{i}" for i in range(1, len(made) + 1)]
    files = []
    with tempfile.TemporaryDirectory(prefix="dfre-figure-") as folder:
        for figure, name in zip(made, names, strict=True):
            paths = fig.save(figure, folder, name)
            with open(paths["png"], "rb") as png, open(paths["svg"], "rb") as svg:
                files.append((name, png.read(), svg.read()))
    return files


def _draw_all(jobs: list[tuple[str, Any]]) -> list[list[tuple[str, bytes, bytes]]]:
    """:func:`draw_figures` of every job, on the cluster's workers when there is one."""
    if not jobs:
        return []
    client = progress._client() if len(jobs) > 1 else None
    with progress.phase(f"drawing {len(jobs)} figures", total=len(jobs), unit="figures") as step:
        if client is None:
            drawn = []
            for stem, make in jobs:
                drawn.append(draw_figures(stem, make))
                step.advance()
            return drawn
        from distributed import as_completed

        futures = client.map(draw_figures, *zip(*jobs, strict=True), pure=False)
        for _ in as_completed(futures):
            step.advance()
        return client.gather(futures)


def _figure_key(store: Any, run: str, attrs: dict, min_count: int) -> str:
    """What the figures of ``results/<run>`` depend on (see :class:`_Figures`)."""
    from dfre.reuse import array_identity, code_identity

    identity = array_identity(store, f"results/{run}")
    if identity is None:  # a store behind a URL: always redraw
        return os.urandom(8).hex()
    document = {
        "result": identity,
        "attrs": attrs,
        "min_count": min_count,
        "code": code_identity(),
        "report": _report_code(),
        "store": [store.n_atoms, store.n_structures, array_identity(store, "structures/offsets")],
    }
    return _digest(json.dumps(document, sort_keys=True, default=str))


def _digest(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


def _report_code() -> str:
    """sha256 of the source of this package (the figures' code)."""
    import hashlib

    folder = os.path.dirname(os.path.abspath(__file__))
    digest = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            with open(os.path.join(folder, name), "rb") as fh:
                digest.update(fh.read())
    return digest.hexdigest()


def _safe(stem: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "-", stem)


def make_report(
    store: Any,
    out_dir: str | os.PathLike,
    runs: list[str] | None = None,
    *,
    min_count: int = DEFAULT_MIN_COUNT,
) -> Report:
    """Write figures of the results ``runs`` (default: all) and ``index.html`` to ``out_dir``.

    ``min_count``: breakdowns leave out subsets and elements with fewer test environments.
    """
    available = store.result_names()
    if not available:
        raise DfreError(
            f"store {store.path} has no results: run `dfre gfre`, `dfre lfre` or `dfre pcovr` first"
        )
    runs = list(runs or available)
    groups = {run: store.result(run) for run in runs}  # unknown runs fail before writing
    out_dir = os.fspath(out_dir)
    if os.path.isfile(out_dir):
        raise DfreError(f"report folder {out_dir} is a file: give a directory")
    os.makedirs(out_dir, exist_ok=True)
    context = _StoreContext(store)
    figures = _Figures(out_dir)
    sections, skipped, curves = [], [], []
    with progress.phase(f"report of {len(runs)} results in {out_dir}"):
        with progress.phase(
            f"reading {len(runs)} results", total=len(runs), unit="results"
        ) as step:
            for run, group in groups.items():
                attrs = dict(group.attrs)
                kind = attrs.get("kind")
                figures.key = _figure_key(store, run, attrs, min_count)
                if kind in FRE_KINDS:
                    section, curve = fre_section(context, figures, run, group, min_count)
                    if curve is not None:
                        curves.append(curve)
                    sections.append(section)
                elif kind == "pcovr":
                    sections.append(pcovr_section(context, figures, run, group))
                else:
                    skipped.append(run)
                step.advance()
        page = _assemble(out_dir, context, figures, groups, sections, skipped, curves)
    html_path = os.path.join(out_dir, "index.html")
    with open(html_path, "w", encoding="utf-8") as fh:
        fh.write(page)
    return Report(html_path, figures.written, skipped)


def _assemble(out_dir, context, figures, groups, sections, skipped, curves) -> str:
    """Checkpoint curves, notes, the figures drawn, ``runs.json``: the page as a string."""
    from dfre.report import figures as fig
    from dfre.report.html import Section, render_html

    if curves:
        section = Section("FRE along training checkpoints", anchor="checkpoints")
        figures.key = _digest(json.dumps(curves, sort_keys=True, default=str))
        figures.add(
            section,
            lambda: fig.checkpoint_curves(curves, title="FRE vs checkpoint"),
            "checkpoints",
            "error of each checkpoint's features against the reference checkpoint",
        )
        sections.insert(0, section)
    if skipped:
        sections.append(
            Section(
                "Not shown",
                anchor="not-shown",
                notes=[
                    "results without a known kind (unfinished or other analyses): "
                    + ", ".join(skipped)
                ],
            )
        )
    figures.draw()
    with open(os.path.join(out_dir, SETTINGS_FILE), "w", encoding="utf-8") as fh:
        json.dump({run: dict(g.attrs) for run, g in groups.items()}, fh, indent=2, default=str)
    return render_html(
        "dfre report",
        sections,
        header=report_header(context, groups),
        settings_file=SETTINGS_FILE,
    )


# ---------------------------------------------------------------------- sections
def fre_section(context: _StoreContext, figures: _Figures, run: str, group: Any, min_count: int):
    """The section of a GFRE/LFRE result, and its checkpoint curve (or None)."""
    from dfre.metrics.breakdown import pointwise_breakdown
    from dfre.report import figures as fig
    from dfre.report.html import Section, Table

    attrs = dict(group.attrs)
    kind = attrs["kind"]
    config = attrs.get("config") or {}
    names = list(attrs["names"])
    label = kind.upper()
    arrays = set(group.array_keys())
    matrix = np.asarray(group["matrix"][...])
    study = STUDY_TITLES.get(config.get("study"), "")
    level = context.level(names, config)
    n_test = int(group["test_rows"].shape[0]) if "test_rows" in arrays else None
    section = Section(f"{study}{label} of {len(names)} feature sets — {run}", anchor=run)
    section.config = _settings(attrs)
    section.notes.append(MEANINGS[kind])
    section.notes.append(_selection_sentence(attrs, config, level, n_test, context))
    section.notes += fre_findings(matrix, names, label)
    errors = np.asarray(group["error"][...]) if "error" in arrays else None
    caption = (
        f"{label}: row = source feature set (reconstructs), column = target (is reconstructed)"
    )
    if errors is not None:
        caption += "; ± = bootstrap standard error over the test environments"
    figures.add(
        section,
        lambda: fig.fre_heatmap(matrix, names, title=f"{label} ({run})", kind=kind, errors=errors),
        f"{run}-{kind}",
        caption,
    )
    section.notes += diagnostics_notes(config)
    entries = {key: np.asarray(group[key][...]) for key in ENTRY_COLUMNS if key in arrays}
    numbers = [
        [a, b, float(matrix[i, j]), *[float(v[i, j]) for v in entries.values()]]
        for i, a in enumerate(names)
        for j, b in enumerate(names)
        if np.isfinite(matrix[i, j])
    ]
    columns = ["source", "target", label, *[ENTRY_COLUMNS[key] for key in entries]]
    if "cka" in arrays:
        cka = np.asarray(group["cka"][...])
        figures.add(
            section,
            lambda: fig.cka_heatmap(cka, names, title=f"linear CKA ({run})"),
            f"{run}-cka",
            "linear CKA of the same feature sets: a symmetric similarity, 1 = the same up "
            "to a rotation and a scale, 0 = unrelated",
        )
        index = {name: i for i, name in enumerate(names)}
        numbers = [[*row, float(cka[index[row[0]], index[row[1]]])] for row in numbers]
        columns.append("CKA")
    section.tables.append(Table(f"all {label} values as a sortable table", columns, numbers))
    spectra = (config.get("diagnostics") or {}).get("feature_sets") or {}
    if spectra:
        section.tables.append(spectra_table(spectra))
    if {"pointwise", "test_rows"} <= arrays:
        pointwise = np.asarray(group["pointwise"][...])
        test_rows = np.asarray(group["test_rows"][...])
        for by, labels in context.breakdowns(test_rows, level):
            frame = pointwise_breakdown(pointwise, labels, names)
            _breakdown(section, figures, frame, names, run, kind, by, min_count)
    curve = None
    if isinstance(config.get("checkpoints"), dict):
        curve = _checkpoint_series(run, kind, names, matrix, config["checkpoints"])
    return section, curve


#: Per-entry arrays of a GFRE/LFRE result shown in its table, and their column titles.
ENTRY_COLUMNS = {
    "error": "± (bootstrap)",
    "alpha": "alpha",
    "tail_share": "worst 1% share",
    "median_error": "median error",
    "p95_error": "95th pct error",
}


def diagnostics_notes(config: dict) -> list[str]:
    """Plain-language paragraphs of a result's diagnostics: the solver path, flagged
    entries with the environments behind them, and sanity warnings."""
    diag = config.get("diagnostics") or {}
    notes = []
    if config.get("exact_path_for"):
        notes.append(
            "Exact path: the singular values of "
            + ", ".join(config["exact_path_for"])
            + " reach below what the normal equations resolve, so every map was fitted from "
            "QR factors (skmatter's SVD path to working precision)."
        )
    for flag in diag.get("flags") or []:
        value = f"{flag['value']:.4f}"
        if flag.get("error") is not None:
            value += f" ± {flag['error']:.4f}"
        text = f"Flag: {flag['source']} → {flag['target']} = {value}: {'; '.join(flag['reasons'])}."
        where = [_environment_text(env) for env in (flag.get("environments") or [])[:5]]
        if where:
            text += " Worst test environments: " + "; ".join(where) + "."
        notes.append(text)
    for warning in diag.get("warnings") or []:
        notes.append(f"Warning: {warning}.")
    return notes


def _environment_text(env: dict) -> str:
    if "structure" not in env:
        place = f"row {env['row']}"
    elif "atom" in env:
        place = (
            f"structure {env['structure']} atom {env['atom']} ({env['element']}, {env['subset']})"
        )
    else:
        place = f"structure {env['structure']} ({env['subset']})"
    return f"{place}: error {env['error']:.3g}, {env['share']:.0%} of the squared error"


def spectra_table(spectra: dict):
    """The feature sets' spectra: numerical rank against the storage noise floor."""
    from dfre.report.html import Table

    rows = [
        [
            name,
            info["dim"],
            info["rank"],
            info.get("condition"),
            info.get("noise_floor"),
            info.get("smallest_singular_value"),
            "exact" if info.get("exact_spectrum") else "from the Gram matrix",
        ]
        for name, info in spectra.items()
    ]
    columns = [
        "feature set",
        "features",
        "rank above noise",
        "condition (above noise)",
        "noise floor / s_max",
        "smallest s / s_max",
        "spectrum",
    ]
    return Table(
        "the feature sets' spectra: numerical rank above the storage noise floor "
        "(one unit roundoff per stored value)",
        columns,
        rows,
        digits=3,
    )


def _breakdown(section, figures, frame, names, run, kind, by, min_count) -> None:
    from dfre.report import figures as fig
    from dfre.report.html import Table

    label = kind.upper()
    groups, counts, facets, dropped = fig.breakdown_tables(frame, names, min_count)
    left_out = ", ".join(f"{g} ({n})" for g, n in dropped)
    caption = (
        f"{label} of the test environments of each {by}, one panel per source feature "
        f"set; n = test environments of the {by}"
    )
    if dropped:
        caption += f"; left out with fewer than {min_count}: {left_out}"
    figures.add(
        section,
        lambda: fig.breakdown_facets(
            frame,
            names,
            title=f"{label} per {by} ({run})",
            group_label=by,
            colorbar_label=label,
            min_count=min_count,
        ),
        f"{run}-{kind}-per-{by}",
        caption,
        wide=True,
    )
    if not groups and dropped:
        section.notes.append(
            f"No {by} has {min_count} or more test environments ({left_out}): the breakdown "
            f"per {by} is not drawn (lower --min-count to see it)."
        )
    all_groups, all_counts, all_facets, _ = fig.breakdown_tables(frame, names, 1)
    columns = ["source", "target", *[f"{g} (n={n})" for g, n in zip(all_groups, all_counts,
                                                                    strict=True)]]  # fmt: skip
    rows = []
    for source, (targets, table) in all_facets.items():
        for c, target in enumerate(targets):
            rows.append([source, target, *[float(v) for v in table[:, c]]])
    section.tables.append(
        Table(
            f"{label} per {by} as a sortable table (every {by}, n = test environments)",
            columns,
            rows,
        )  # fmt: skip
    )


def pcovr_section(context: _StoreContext, figures: _Figures, run: str, group: Any):
    """The section of a PCovR map."""
    from dfre.report import figures as fig
    from dfre.report.html import Section

    attrs = dict(group.attrs)
    config = attrs.get("config") or {}
    arrays = set(group.array_keys())
    section = Section(f"PCovR map — {run}", anchor=run, config=_settings(attrs))
    coordinates = np.asarray(group["coordinates"][...])
    target = np.asarray(group["target"][...])
    reference = (
        np.asarray(group["reference_coordinates"][...])
        if "reference_coordinates" in arrays
        else None
    )
    key = str(attrs.get("target", "target"))
    label = target_label(key)
    missing = "no energy" if key == "cohesive_energy" else f"no {key}"
    section.notes.append(
        f"Each point is a structure, placed by principal covariates regression of the "
        f"descriptor {attrs.get('descriptor', run)} ({config.get('n_components', 2)} "
        f"components, mixing {config.get('mixing', 0.5)}) fitted on "
        f"{config.get('n_fit', '?')} structures with a known {label}: points close "
        "together have similar descriptors, and the colours show how the target varies "
        "over the map. "
        f"{int((~np.isfinite(target)).sum())} structures without a target are grey crosses."
    )
    figures.add(
        section,
        lambda: fig.pcovr_maps(
            coordinates,
            context.subsets,
            target,
            title=str(attrs.get("descriptor", run)),
            target_label=label,
            reference=reference,
            missing_label=missing,
        ),
        f"{run}-map",
        f"PCovR map coloured by subset (left) and by {label} (right)",
        wide=True,
    )
    return section


def _settings(attrs: dict) -> dict:
    """A result's attributes with its ``config`` merged in, for its settings table."""
    return {**{k: v for k, v in attrs.items() if k != "config"}, **(attrs.get("config") or {})}


def target_label(key: str) -> str:
    """A PCovR target with its units, e.g. ``cohesive energy (eV/atom)``."""
    units = TARGET_UNITS.get(key)
    name = key.replace("_", " ")
    return f"{name} ({units})" if units else name


# ---------------------------------------------------------------------- words
def fre_findings(matrix: np.ndarray, names: list[str], label: str) -> list[str]:
    """Plain-language findings of an FRE matrix (off-diagonal entries only)."""
    m = len(names)
    off = np.array(matrix, dtype=np.float64)
    off[np.arange(m), np.arange(m)] = np.nan
    if m < 2 or not np.isfinite(off).any():
        return []
    if m == 2:
        ab, ba = off[0, 1], off[1, 0]
        if not (np.isfinite(ab) and np.isfinite(ba)):
            return []
        fuller = names[0] if ab < ba else names[1]
        other = names[1] if ab < ba else names[0]
        return [
            f"{names[0]} → {names[1]}: {ab:.3f}; {names[1]} → {names[0]}: {ba:.3f}. "
            f"{fuller}'s features hold more of {other}'s than the reverse."
        ]
    with warnings.catch_warnings():  # a column without finite values is NaN, not a warning
        warnings.simplefilter("ignore", RuntimeWarning)
        as_target = np.nanmean(off, axis=0)
        as_source = np.nanmean(off, axis=1)
    lines = []
    if np.isfinite(as_target).sum() >= 2:
        best, worst = int(np.nanargmin(as_target)), int(np.nanargmax(as_target))
        lines.append(
            f"The others reconstruct {names[best]} best (mean {label} "
            f"{as_target[best]:.3f}) and {names[worst]} worst ({as_target[worst]:.3f})."
        )
    if np.isfinite(as_source).sum() >= 2:
        best, worst = int(np.nanargmin(as_source)), int(np.nanargmax(as_source))
        lines.append(
            f"{names[best]}'s features reconstruct the others best (mean {label} "
            f"{as_source[best]:.3f}), {names[worst]}'s worst ({as_source[worst]:.3f})."
        )
    return lines


def _selection_sentence(attrs, config, level, n_test, context) -> str:
    spec = attrs.get("selection", "?")
    rows = "structures" if level == "structure" else "atomic environments"
    total = context.store.n_structures if level == "structure" else context.store.n_atoms
    kind = str(spec).partition(":")[0]
    how = {
        "stratified": "drawn at random within each subset, in proportion to its size",
        "random": "drawn at random",
        "structure": "all atoms of randomly drawn structures",
        "kfold": "every one tested once, by k-fold cross-validation",
    }.get(kind, "given explicitly")
    tested = f"{n_test:,} test {rows}" if n_test is not None else f"test {rows}"
    seed = config.get("seed")
    return (
        f"Selection {spec}: {tested} of {total:,} ({how}"
        + (f", seed {seed}" if seed is not None else "")
        + "); the others train the maps."
    )


def report_header(context: _StoreContext, groups: dict[str, Any]):
    """The plain-language top of the page (see :class:`dfre.report.html.Header`)."""
    from ase.data import chemical_symbols

    from dfre.report.html import Header
    from dfre.studies.steps import masked_atoms, masked_text

    store = context.store
    numbers = store.numbers()
    elements = sorted(set(numbers.tolist()))
    subsets, counts = np.unique(context.subsets, return_counts=True)
    listed = ", ".join(f"{s} ({c})" for s, c in zip(subsets[:12], counts[:12], strict=True))
    facts = [
        (
            "Dataset",
            f"{os.path.normpath(str(store.path))}: {store.n_structures:,} structures, "
            f"{store.n_atoms:,} atoms "
            f"(atomic environments), {len(elements)} elements "
            f"({', '.join(chemical_symbols[z] for z in elements[:30])}"
            f"{', ...' if len(elements) > 30 else ''})",
        ),
        ("Subsets (structures)", listed + (", ..." if len(subsets) > 12 else "")),
    ]
    compared = []  # feature sets of the atom-level results, in order of appearance
    for group in groups.values():
        attrs = dict(group.attrs)
        if attrs.get("kind") in FRE_KINDS:
            names = list(attrs["names"])
            if context.level(names, attrs.get("config") or {}) == "atom":
                compared += [n for n in names if n not in compared]
    stored = set(store.feature_names())
    models: dict[str, list[str]] = {}
    for name in sorted(compared or stored):
        model, _, layer = name.partition("/")
        dim = f" ({int(store.feature_array(name).shape[1])})" if name in stored else ""
        models.setdefault(model, []).append(f"{layer}{dim}")
    if models:
        facts.append(
            (
                "Models and layers (dimension)",
                "; ".join(f"{m}: {', '.join(layers)}" for m, layers in models.items())
                + ". bb: features after message passing; ll: input of the last linear "
                "readout layer.",
            )
        )
    descriptors = store.descriptor_names()
    if descriptors:
        facts.append(("Structure descriptors", ", ".join(descriptors)))
    selections: dict[str, list[str]] = {}
    for run, group in groups.items():
        attrs = dict(group.attrs)
        if attrs.get("kind") not in FRE_KINDS:
            continue
        level = context.level(list(attrs["names"]), attrs.get("config") or {})
        n = int(group["test_rows"].shape[0]) if "test_rows" in group.array_keys() else 0
        rows = "structures" if level == "structure" else "atoms"
        selections.setdefault(f"{attrs.get('selection')} ({n:,} test {rows})", []).append(run)
    if selections:
        facts.append(
            (
                "Selections",
                "; ".join(f"{spec} in {', '.join(runs)}" for spec, runs in selections.items()),
            )
        )
    masked = masked_atoms(store)
    if masked:
        facts.append(
            (
                "Masked atoms",
                "; ".join(masked_text(record) for record in masked)
                + " (left out of every comparison with those models)",
            )
        )
    findings = []
    for kind in FRE_KINDS:
        main = _main_result(context, groups, kind)
        if main is not None:
            run, group = main
            names = list(group.attrs["names"])
            lines = fre_findings(np.asarray(group["matrix"][...]), names, kind.upper())
            findings += [f"{kind.upper()} of {len(names)} feature sets ({run}): {line}"
                         for line in lines]  # fmt: skip
    intro = (
        "How much of the information in one set of atomic features can be rebuilt from "
        "another: reconstruction errors between the latent features of machine-learning "
        "interatomic potentials, as in the paper “Comparing the latent features of "
        "universal machine-learning interatomic potentials”."
    )
    return Header(facts=facts, findings=findings, intro=intro)


def _main_result(context: _StoreContext, groups: dict[str, Any], kind: str):
    """The atom-level result of ``kind`` with the most feature sets (not a checkpoint run)."""
    best = None
    for run, group in groups.items():
        attrs = dict(group.attrs)
        config = attrs.get("config") or {}
        if attrs.get("kind") != kind or "checkpoints" in config:
            continue
        names = list(attrs["names"])
        if context.level(names, config) != "atom" or len(names) < 2:
            continue
        if best is None or len(names) > len(best[1].attrs["names"]):
            best = (run, group)
    return best


def _checkpoint_series(run: str, kind: str, names: list[str], matrix: np.ndarray, spec: dict):
    reference = spec.get("reference", names[-1])
    if reference not in names:
        raise DfreError(
            f"results/{run}: checkpoint reference '{reference}' is not one of its names"
        )
    epochs = list(spec.get("epochs") or range(len(names)))
    if len(epochs) != len(names):
        raise DfreError(f"results/{run}: {len(epochs)} checkpoint epochs for {len(names)} names")
    column = names.index(reference)
    return {
        "label": f"{run} ({kind.upper()})",
        "x": epochs,
        "y": matrix[:, column].tolist(),
        "x_label": spec.get("x_label", "epoch"),
    }


class _StoreContext:
    """Per-row labels of the store, read once."""

    def __init__(self, store: Any):
        self.store = store
        self._subsets: np.ndarray | None = None

    @property
    def subsets(self) -> np.ndarray:
        if self._subsets is None:
            self._subsets = np.asarray(self.store.subsets()).astype(str)
        return self._subsets

    def level(self, names: list[str], config: dict) -> str:
        if config.get("level") in ("atom", "structure"):
            return config["level"]
        descriptors = set(self.store.descriptor_names())
        return "structure" if names and set(names) <= descriptors else "atom"

    def breakdowns(self, test_rows: np.ndarray, level: str):
        """``(name, label per test row)`` for the breakdowns of that row level."""
        from ase.data import chemical_symbols

        if level == "structure":
            _check_rows(test_rows, self.store.n_structures, "structure")
            yield "subset", self.subsets[test_rows]
            return
        _check_rows(test_rows, self.store.n_atoms, "atom")
        structure = np.searchsorted(self.store.offsets, test_rows, side="right") - 1
        yield "subset", self.subsets[structure]
        numbers = np.asarray(self.store.structures["numbers"].get_orthogonal_selection(test_rows))
        yield "element", np.asarray(chemical_symbols, dtype=object)[numbers.astype(int)]


def _check_rows(rows: np.ndarray, n: int, what: str) -> None:
    if len(rows) and (rows.min() < 0 or rows.max() >= n):
        raise DfreError(
            f"test_rows of a result point outside the store's {n} {what} rows: "
            "the result belongs to another store"
        )
