"""Check every checkpoint of a run (or one checkpoint) against its recorded checksums.

    python -m lima_jax.verify /tmp/lima_toy                  # every checkpoint of a run, set-aside ones too
    python -m lima_jax.verify /tmp/lima_toy/checkpoints/18   # one training checkpoint
    python -m lima_jax.verify /ckpt/llama-7b                 # a parameter checkpoint (lima_jax.convert output)
    python -m lima_jax.verify --adopt /tmp/old_run           # record checksums where none were written

Each checkpoint is re-read in full and compared with its `lima_manifest.json` (size and CRC-32 of every file).
Prints one line per checkpoint: `ok`, `CORRUPT` (with the files and what is wrong), or `UNVERIFIED` (no manifest:
written before lima_jax recorded checksums, or a save that did not finish). Exit status 0 when every checkpoint
is intact, 1 when any is corrupt, unverified or (with --adopt) unreadable, 2 for a path that holds no
checkpoint.

`--adopt` writes a manifest for each UNVERIFIED checkpoint whose metadata orbax can read, recording its files
as they are now: adopt only checkpoints you trust (training still checks the values for NaN when it restores).
"""
from __future__ import annotations

import time

from lima_jax import cli, manifest, rundir
from lima_jax.checkpoint import check_readable, describe_problems, verify_folder
from lima_jax.errors import CheckpointError


def build_parser():
    p = cli.parser("lima_jax.verify", __doc__)
    p.add_argument("paths", nargs="+", metavar="PATH", help="run directory, step folder or parameter checkpoint")
    p.add_argument("--adopt", action="store_true", help="record checksums for checkpoints that have none")
    return p


def main(argv: list[str]) -> int:
    args, _ = cli.parse(build_parser(), argv)
    folders = [folder for path in args.paths for folder in rundir.checkpoint_folders(path)]
    failed = 0
    for folder in folders:
        tic = time.perf_counter()
        if not manifest.has_manifest(folder):
            if args.adopt:
                try:
                    check_readable(folder)
                except CheckpointError as e:  # report it and go on with the others
                    failed += 1
                    print(f"UNREADABLE  {e}")
                    continue
                manifest.write_manifest(folder)
                print(f"adopted     {folder}: checksums recorded ({time.perf_counter() - tic:.2f} s)")
                continue
            failed += 1
            print(f"UNVERIFIED  {folder}: no {manifest.MANIFEST} (pass --adopt to record checksums)")
            continue
        problems = verify_folder(folder)
        size = sum(f["size"] for f in manifest.read_manifest(folder).values()) if not problems else 0
        if problems:
            failed += 1
            print(f"CORRUPT     {folder}: {describe_problems(folder, problems, limit=20)}")
        else:
            print(f"ok          {folder} ({size / 2**20:.1f} MiB, {time.perf_counter() - tic:.2f} s)")
    print(f"{len(folders) - failed} of {len(folders)} checkpoints intact")
    return 1 if failed else 0


if __name__ == "__main__":
    cli.run(main)
