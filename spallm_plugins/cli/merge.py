"""``spallm merge``: a saved adapter merged into its base, as a plain sketched checkpoint."""

from __future__ import annotations

import argparse

from .common import add_output_options, add_revision_option


def cmd_merge(args: argparse.Namespace) -> int:
    from ..merge import merge_adapter

    report = merge_adapter(args.base, args.adapter, args.out, overwrite=args.overwrite, revision=args.revision,
                           adapter_revision=args.adapter_revision)  # fmt: skip
    kind = "tables replaced, codes copied" if report["sketched_base"] else "weights replaced by the adapter's codes"
    print(f"merged {report['merged_layers']} layers ({kind}) -> {args.out}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("merge", help="merge a saved SpaLLM adapter into its base: a plain sketched checkpoint")
    p.add_argument("base", help="the base model folder or Hub id (sketched, or dense for adapters that carry codes)")
    p.add_argument("adapter", help="the adapter folder or Hub id (adapter_config.json + adapter_model.safetensors)")
    add_revision_option(p, what="the base")
    add_revision_option(p, what="the adapter", flag="--adapter-revision")
    add_output_options(p, what="the merged checkpoint (written atomically, validated)")
    p.set_defaults(func=cmd_merge)
