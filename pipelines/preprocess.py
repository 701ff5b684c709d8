"""Raw M3D-style data (or a folder of volumes + reports) -> Parquet shards + manifest.json, one Ray task per shard.

    python -m pipelines.preprocess --config m3d --raw /data/M3D --out /data/shards
    python -m pipelines.preprocess --config m3d --raw s3://bucket/M3D --out s3://bucket/shards

The driver builds the manifest (cheap: folder listing, JSON/CSV parsing); each shard is one Ray task that reads,
transforms and writes its volumes. Finished shards are skipped on a re-run.
"""

from __future__ import annotations

import sys

from .common import config_from_args, parser, run_main


def arg_parser():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--raw", required=True, help="raw data root (M3D layout, or volumes + reports.csv/json): a path or a "
                                                "URI (s3://bucket/M3D)")
    p.add_argument("--out", required=True, help="where volumes/part-*.parquet and manifest.json go: a path or a URI "
                                               "(s3://bucket/shards)")
    return p


def main(argv=None):
    from med3dvlm.data.preprocess import preprocess, summary

    args = arg_parser().parse_args(argv)
    manifest = preprocess(config_from_args(args), args.raw, args.out)
    print(summary(manifest))
    return manifest


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
