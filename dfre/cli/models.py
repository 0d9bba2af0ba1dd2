"""``dfre models``: the registry of feature extractors, their layers and weights."""

from __future__ import annotations

import json


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "models",
        help="list the models dfre can featurize with, their layers and weights",
        description="The model registry: name, family, the environment that serves it "
        "('main', or .envs/<env> made by `make env-<env>`), layers with dimensions, and "
        "whether the weights are available on this machine ('user file': give --weights "
        "PATH).",
    )
    p.add_argument("--json", action="store_true", help="print the registry as JSON")
    p.set_defaults(handler=run)


def model_table() -> list[dict]:
    """One record per registered model."""
    from dfre.models.base import registry

    return [
        {
            "name": spec.name,
            "family": spec.family,
            "env": spec.env,
            "layers": {layer.name: layer.dim for layer in spec.layers.values()},
            "weights": _weights(spec),
            "description": spec.description,
        }
        for spec in registry().values()
    ]


def run(args) -> int:
    table = model_table()
    if args.json:
        print(json.dumps(table, indent=2))
        return 0
    header = ("model", "family", "env", "layers (dim)", "weights here", "description")
    rows = [
        (r["name"], r["family"], r["env"], _layers_text(r), r["weights"], r["description"])
        for r in table
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    widths[-1] = 0  # the description ends the line
    for row in (header, *rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _weights(spec) -> str:
    """The weights status; for a family of another environment whose package is not
    here, where it is served."""
    if spec.env != "main" and not spec.package_available():
        return f"in .envs/{spec.env} (make env-{spec.env})"
    return spec.weights_status()


def _layers_text(row: dict) -> str:
    """``bb (64), ll (64)``; the layer sizes of user-file models are those of the file."""
    if not row["layers"]:
        return "(--hook LAYER=MODULE)"
    if all(v is None for v in row["layers"].values()):
        return f"{', '.join(row['layers'])} (from file)"
    return ", ".join(f"{k} ({v if v else '?'})" for k, v in row["layers"].items())
