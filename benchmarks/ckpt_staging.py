"""Checkpoint staging to the emulated GCS: the Reserve trainer's async Orbax save vs a single-stream upload.

    python benchmarks/ckpt_staging.py [--size-mib 1024] [--arrays 16]

Starts fake-gcs-server (infra/fake_gcs.py), builds a pytree of float32 arrays of about `--size-mib`, and
1. saves it with trainers/reserve/checkpoint.py (Orbax, async, straight to gs://): how long the caller
   (the training loop) is blocked by the save call, and the wall time until the step is committed;
2. saves it to a local directory, then uploads those files one after another with google-cloud-storage
   (`blob.upload_from_filename`): the single-stream baseline.
Prints both wall times, the speedup (target >= 2x) and the blocked time as a share of the upload time
(target < 10%).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=float, default=1024.0)
    parser.add_argument("--arrays", type=int, default=16)
    args = parser.parse_args()

    from infra.fake_gcs import FakeGcs

    with FakeGcs(buckets=("bench",)) as server:
        os.environ.update(server.env())
        import jax
        import numpy as np
        from google.cloud import storage as gcs

        from trainers.reserve.checkpoint import Checkpointer

        per_array = int(args.size_mib * 2**20 / 4 / args.arrays)
        rng = np.random.default_rng(0)
        tree = {
            f"layer_{i:02d}": jax.device_put(rng.standard_normal(per_array, np.float32))
            for i in range(args.arrays)
        }
        total_mib = sum(a.nbytes for a in tree.values()) / 2**20
        run = uuid.uuid4().hex[:8]

        ckpt = Checkpointer(f"gs://bench/{run}/async", keep=1, asynchronous=True)
        started = time.perf_counter()
        ckpt.save(1, tree, {"step": 1})
        blocked = time.perf_counter() - started
        ckpt.wait()
        async_wall = time.perf_counter() - started
        ckpt.close()

        with tempfile.TemporaryDirectory() as tmp:
            local = Checkpointer(str(Path(tmp) / "ckpt"), keep=1, asynchronous=False)
            local.save(1, tree, {"step": 1})
            local.wait()
            local.close()
            files = sorted(p for p in (Path(tmp) / "ckpt").rglob("*") if p.is_file())
            nbytes = sum(p.stat().st_size for p in files)
            bucket = gcs.Client().bucket("bench")
            started = time.perf_counter()
            for p in files:
                bucket.blob(f"{run}/single/{p.relative_to(tmp)}").upload_from_filename(str(p))
            single_wall = time.perf_counter() - started

    print(
        f"checkpoint: {total_mib:.0f} MiB in {args.arrays} arrays ({len(files)} files, {nbytes / 2**20:.0f} MiB on disk)"
    )
    print(f"async Orbax save to gs://   : {async_wall:7.2f} s wall, training loop blocked {blocked:.3f} s")
    print(
        f"single-stream upload (gcs)  : {single_wall:7.2f} s wall ({nbytes / 2**20 / single_wall:.0f} MiB/s)"
    )
    print(f"speedup                     : {single_wall / async_wall:7.2f}x (target >= 2x)")
    print(f"blocked / upload time       : {100 * blocked / single_wall:7.1f}% (target < 10%)")


if __name__ == "__main__":
    main()
