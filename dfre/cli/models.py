"""``dfre models``: the registry of feature extractors, their layers and weights."""

from __future__ import annotations

import json


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "models",
        help="list the models dfre can featurize with, their layers and weights",
        description="The model registry: name, family, layers with dimensions, and whether "
        "the weights are available on this machine ('user file': give --weights PATH).",
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
            "layers": {layer.name: layer.dim for layer in spec.layers.values()},
            "weights": spec.weights_status(),
            "description": spec.description,
        }
        for spec in registry().values()
    ]


def run(args) -> int:
    table = model_table()
    if args.json:
        print(json.dumps(table, indent=2))
        return 0
    print(f"{'model':24} {'family':10} {'layers (dim)':22} {'weights here':26} description")
    for row in table:
        layers = ", ".join(f"{k} ({v if v else '?'})" for k, v in row["layers"].items())
        print(
            f"{row['name']:24} {row['family']:10} {layers:22} {row['weights']:26} "
            f"{row['description']}"
        )
    return 0
