"""Two-process (``torchrun``, gloo) bundle training exits every time: three runs in a row, each under a timeout."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.bundle_helpers import ENV, TINY, TORCHRUN, Bundle, cli_args, make_tiny_data, random_teacher

CARDIAC = Bundle("cardiac_mri_groupdistil")
TIMEOUT_S = 240  # a run takes ~20-40 s on two shared cores; a hang at exit would run into this


@pytest.mark.filterwarnings("ignore:builtin type .* has no __module__ attribute:DeprecationWarning")
def test_two_process_training_exits_three_times_in_a_row(tmp_path):
    make_tiny_data(CARDIAC.name, tmp_path / "data")
    ov = CARDIAC.run_overrides(tmp_path, epochs=1, **TINY[CARDIAC.name])
    ckpt = Path(ov["ckpt_dir"])
    ckpt.mkdir()
    random_teacher(CARDIAC, ov, ckpt / "teacher.pt")
    cmd = TORCHRUN + ["run", "--config_file", str(CARDIAC.configs("train", "multi_gpu_train")).replace('"', "'")]
    cmd += ["--meta_file", CARDIAC.meta, *cli_args({**ov, "resume": True, "epochs": 1})]
    for attempt in range(1, 4):  # resume True: each run continues the previous one for one more epoch
        cmd[cmd.index("--epochs") + 1] = str(attempt)
        start = time.monotonic()
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=ENV, cwd=CARDIAC.root)
        except subprocess.TimeoutExpired as err:
            pytest.fail(f"run {attempt} did not exit within {TIMEOUT_S} s:\n{(err.stderr or b'')[-3000:]!r}")
        assert out.returncode == 0, f"run {attempt}:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
        assert (ckpt / f"groupdistil_epoch={attempt}.pt").is_file(), attempt
        assert time.monotonic() - start < TIMEOUT_S
    last = torch.load(ckpt / "groupdistil_epoch=3.pt", weights_only=True)
    assert last["trainer"]["iteration"] == 3 * last["trainer"]["epoch_length"]  # three epochs, in three runs
    assert last["random_states"]["world_size"] == 2 and len(last["random_states"]["ranks"]) == 2
