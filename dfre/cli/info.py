"""``dfre info``: what a store holds."""

from __future__ import annotations

import argparse
import json

from dfre.cli.options import add_positional_store_argument, positional_store


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "info",
        help="structures, atoms, elements, subsets, feature sets, descriptors, results",
        description="Summarise a dfre store: sizes, elements, subsets, structure info keys, "
        "feature sets with shapes and completeness, descriptors, results, provenance.",
    )
    add_positional_store_argument(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from dfre.store import Store

    path = positional_store(args, "give the store: dfre info --store PATH (or dfre info PATH)")
    summary = Store.open(path).summary()
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


def format_summary(s: dict) -> str:
    """The summary of :meth:`dfre.store.Store.summary` as readable text."""
    lines = [
        f"store       {s['path']} (schema {s['schema_version']}, created {s['created']})",
        f"structures  {s['n_structures']}",
        f"atoms       {s['n_atoms']}",
        "elements    " + (", ".join(f"{el} {n}" for el, n in s["elements"].items()) or "none"),
        "subsets",
    ]
    for name, c in s["subsets"].items():
        lines.append(f"  {name:<24} {c['structures']:>10} structures {c['atoms']:>12} atoms")
    lines.append("info keys")
    for key, i in s["info"].items():
        missing = f", missing in {i['missing']}" if i["missing"] else ""
        lines.append(f"  {key} ({i['type']}{missing})")
    lines.append("feature sets" + ("" if s["features"] else "  none"))
    for f in s["features"]:
        shape = " x ".join(map(str, f["shape"]))
        if f.get("problem"):
            lines.append(f"  {f['name']:<32} {shape} {f['dtype']}, UNUSABLE: {f['problem']}")
            continue
        masked = f", {f['masked_rows']} rows masked" if f["masked_rows"] else ""
        lines.append(
            f"  {f['name']:<32} {shape} {f['dtype']}, {100 * f['complete']:.1f}% complete{masked}"
        )
    lines.append("descriptors" + ("" if s["descriptors"] else "   none"))
    for d in s["descriptors"]:
        problem = f", UNUSABLE: {d['problem']}" if d.get("problem") else ""
        lines.append(f"  {d['name']:<32} {' x '.join(map(str, d['shape']))}{problem}")
    lines.append("results" + ("" if s["results"] else "       none"))
    for r in s["results"]:
        state = "" if r.get("complete", True) else ", INCOMPLETE (run it again)"
        lines.append(
            f"  {r['run']:<16} {r['kind'] or '?'} of {len(r['names'])} feature sets, "
            f"selection {r['selection']}{state}"
        )
    lines.append("sources")
    for p in s["provenance"]:
        state = "complete" if p.get("complete") else "INCOMPLETE (re-run to resume)"
        lines.append(f"  {p.get('source')}: {p.get('frames_done', '?')} structures, {state}")
    return "\n".join(lines)
