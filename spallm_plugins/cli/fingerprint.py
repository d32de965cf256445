"""``spallm fingerprint``: record which base's codes an old adapter (saved without one) belongs to."""

from __future__ import annotations

import argparse

from .common import add_revision_option


def cmd_fingerprint(args: argparse.Namespace) -> int:
    from ..merge import record_codes_fingerprint

    fingerprint = record_codes_fingerprint(args.adapter, args.base, revision=args.revision)
    print(f"{args.adapter}: base_codes_fingerprint = {fingerprint[:19]}... (codes of {args.base})")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("fingerprint", help="record which base's codes an old adapter (saved without one) belongs to")
    p.add_argument("adapter", help="the adapter folder whose adapter_config.json lacks base_codes_fingerprint")
    p.add_argument("--base", required=True, help="the sketched base it was trained on (folder or Hub id)")
    add_revision_option(p, what="the base")
    p.set_defaults(func=cmd_fingerprint)
