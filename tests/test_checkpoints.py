"""Weight files load only through torch.load(weights_only=True): no file can run code when loaded."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from torch import nn

from var.checkpoints import CheckpointError, load_strict, load_weights, safe_load


class _RunsCode:
    """Unpickling this calls os.system: exactly what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _RunsCode(marker)}, path,
               pickle_protocol=pickle.HIGHEST_PROTOCOL)
    with pytest.raises(CheckpointError, match="weights_only"):
        safe_load(path)
    assert not marker.exists()


def test_missing_released_file_says_where_to_get_it(tmp_path):
    with pytest.raises(CheckpointError, match="huggingface.co/FoundationVision/var"):
        safe_load(tmp_path / "var_d16.pth")


def test_truncated_file_is_one_line_error(tmp_path):
    path = tmp_path / "w.pth"
    torch.save({"w": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError) as e:
        safe_load(path)
    assert "\n" not in str(e.value)


def test_strict_load_names_missing_unexpected_and_misshaped_keys(tmp_path):
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    sd = model.state_dict()
    sd.pop("1.bias")
    sd["2.weight"] = torch.zeros(1)
    sd["0.weight"] = torch.zeros(5, 5)
    with pytest.raises(CheckpointError) as e:
        load_strict(model, sd)
    msg = str(e.value)
    assert "1.bias" in msg and "2.weight" in msg and "0.weight" in msg
    torch.save(model.state_dict(), tmp_path / "ok.pth")
    load_weights(nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1)), tmp_path / "ok.pth")


def test_resuming_from_a_checkpoint_that_would_run_code_is_refused(small_token_cache, tmp_path):
    """A training run resumes through torch.load(weights_only=True) too: the planted last.ckpt never runs."""
    import json

    from tests.test_train import run_train

    marker = tmp_path / "pwned"
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"state_dict": {}, "global_step": 3, "payload": _RunsCode(marker)}, ckpt)
    with pytest.raises(CheckpointError, match="weights_only") as e:
        run_train(tmp_path, small_token_cache[1], steps=4)
    assert not marker.exists() and "\n" not in str(e.value) and str(ckpt) in str(e.value)
    record = json.loads((tmp_path / "run" / "record.json").read_text())
    assert record["status"] == "failed" and "CheckpointError" in record["error"]
