"""The Reserve Checkpointer tells the user when a save is stuck (a store that is down is retried for
many minutes, silently until now)."""

from __future__ import annotations

import logging
import time

import jax.numpy as jnp

from trainers.reserve import checkpoint


def test_a_save_that_blocks_says_so_while_it_waits_and_then_commits(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(checkpoint, "NOTICE_EVERY_S", 0.1)
    ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"))
    ckpt.save(3, {"w": jnp.arange(4.0)}, {"step": 3})
    finish = ckpt.manager.wait_until_finished

    def slow_store() -> None:  # the upload of step 3 takes a while, as against an unreachable bucket
        time.sleep(0.45)
        finish()

    monkeypatch.setattr(ckpt.manager, "wait_until_finished", slow_store)
    with caplog.at_level(logging.WARNING, logger="trainers.reserve.checkpoint"):
        ckpt.wait()
    notices = [r.getMessage() for r in caplog.records if "still being written" in r.getMessage()]
    assert len(notices) >= 3, notices
    assert notices[0] == (
        f"checkpoint step 3 is still being written to {tmp_path / 'ckpt'} after 0.1 s: the storage is slow "
        "or unreachable (it is retried)"
    )
    monkeypatch.setattr(ckpt.manager, "wait_until_finished", finish)
    assert ckpt.latest_step() == 3
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trainers.reserve.checkpoint"):
        ckpt.wait()  # nothing in flight: no notice
        time.sleep(0.3)
    assert not caplog.records
    ckpt.close()
