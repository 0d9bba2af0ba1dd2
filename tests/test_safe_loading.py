"""Safe loading: a user's model file that needs full unpickling is refused without
``--trust-checkpoint`` and no code in it runs; tensors-only files load without it.

The malicious file is a real ``torch.save`` pickle whose unpickling creates a marker
file (``builtins.open(marker, "w")``).
"""

from __future__ import annotations

import shutil

import pytest
import torch

from dfre.cli import main
from dfre.errors import DfreError
from dfre.models.base import check_checkpoint, load_extractor
from dfre.store import Store


class CreatesMarker:
    """Unpickling this object opens (creates) the marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def malicious(tmp_path):
    marker = tmp_path / "unpickled-marker"
    path = tmp_path / "model.pt"
    torch.save({"weights": torch.zeros(2), "payload": CreatesMarker(str(marker))}, path)
    assert not marker.exists()
    return path, marker


REFUSED = (
    r"generic model file {path} is a full Python pickle: opening it can run any code it "
    r"holds; pass --trust-checkpoint \(trust_checkpoint=True\) only if you trust its source"
)


def test_library_refuses_a_pickle_and_runs_none_of_it(malicious):
    path, marker = malicious
    with pytest.raises(DfreError, match=REFUSED.format(path=path)):
        load_extractor("generic", path=str(path), runner="dfre.models.base:registry")
    with pytest.raises(DfreError, match="MACE model file .* full Python pickle"):
        check_checkpoint(str(path), "MACE model", trust=False)
    assert not marker.exists()


def test_tensors_only_files_need_no_trust(tmp_path, malicious):
    path = tmp_path / "state.pt"
    torch.save({"layer.weight": torch.ones(3, 3)}, path)
    check_checkpoint(str(path), "generic model", trust=False)  # no error
    # a safe file that is not a module still fails, with the loader's own message
    with pytest.raises(DfreError, match=r"holds a dict, not a torch.nn.Module"):
        load_extractor("generic", path=str(path), runner="dfre.models.base:registry")
    assert not malicious[1].exists()


def test_cli_refuses_without_trust_checkpoint(sample_store, tmp_path, malicious, capsys):
    path, marker = malicious
    store = tmp_path / "s.zarr"
    shutil.copytree(sample_store, store)
    before = sorted(p.name for p in store.rglob("*"))
    argv = ["featurize", "--store", str(store), "--model", "generic", "--weights", str(path),
            "--option", "runner=dfre.models.base:registry", "--hook", "ll=layers.0"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dfre: error: generic model file ")
    assert "--trust-checkpoint" in err
    assert not marker.exists()
    assert sorted(p.name for p in store.rglob("*")) == before
    assert Store.open(store).feature_names() == []

    # with the flag the file is unpickled (its code runs): only for trusted files
    assert main([*argv, "--trust-checkpoint"]) == 2
    assert "holds a dict, not a torch.nn.Module" in capsys.readouterr().err
    assert marker.exists()


def test_trust_checkpoint_is_refused_by_models_with_shipped_weights():
    with pytest.raises(DfreError, match=r"model chgnet-0.3.0 does not take the option\(s\) "):
        load_extractor("chgnet-0.3.0", trust_checkpoint=True)
