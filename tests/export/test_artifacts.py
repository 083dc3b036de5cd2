"""Bad artifacts: every alteration is refused before anything runs, naming the file.

Each test alters a copy of the session's ONNX export. Also: the atomic write (an export that
fails leaves nothing that looks like an export) and no pickle anywhere in a load.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import shutil
import sys

import onnxruntime
import pytest
import torch

import dcfx
from dcfx.export import onnx as onnx_format
from dcfx.export.manifest import FORMAT_VERSION, ArtifactError, seal
from tests.export.conftest import SD_BRANCH, sd_unet
from tests.fixtures import tiny_unet

pytestmark = pytest.mark.slow  # exports of a whole model each; the fast tier has tests/export/test_onnx.py


@pytest.fixture
def copy(onnx_sd, tmp_path):
    target = tmp_path / "export"
    shutil.copytree(onnx_sd, target)
    return target


@pytest.fixture
def no_session(monkeypatch):
    """Fails the test if onnxruntime is asked to open any graph."""
    opened = []
    monkeypatch.setattr(onnxruntime, "InferenceSession", lambda *a, **k: opened.append(a) or pytest.fail("ran"))
    return opened


def edit_manifest(directory, change, reseal=True):
    """Edits manifest.json; ``reseal`` recomputes its seal, as a forger would, to reach the checks behind it."""
    path = directory / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    if reseal:
        data["seal"] = seal(data)
    path.write_text(json.dumps(data))


def flip_byte(path, offset=-100):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_untouched_copy_loads(copy):
    assert isinstance(dcfx.load(copy), dcfx.DeepCacheUNet)


@pytest.mark.parametrize("name", ["weights.bin", "full.onnx", "shallow.onnx", "forecast.onnx", "trtexec.sh"])
def test_altered_file(copy, no_session, name):
    flip_byte(copy / name)
    with pytest.raises(ArtifactError, match=f"{name} does not match its sha256"):
        dcfx.load(copy)


def test_truncated_file(copy, no_session):
    path = copy / "weights.bin"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ArtifactError, match=r"weights.bin has .* bytes, the manifest says"):
        dcfx.load(copy)


@pytest.mark.parametrize("name", ["weights.bin", "shallow.onnx", "forecast.onnx"])
def test_missing_file(copy, no_session, name):
    (copy / name).unlink()
    with pytest.raises(ArtifactError, match=f"{name} is missing"):
        dcfx.load(copy)


def drop_forecast(data):
    """What an export written before the forecast graph holds: no forecast entry, no file."""
    del data["graphs"]["forecast"]
    del data["files"]["forecast.onnx"]


def test_an_export_without_the_forecast_graph(copy):
    (copy / "forecast.onnx").unlink()
    edit_manifest(copy, drop_forecast)
    loaded = dcfx.load(copy)  # it loads, and runs the paper's reuse
    call = {"encoder_hidden_states": torch.randn(2, 7, 8)}
    x = torch.randn(2, 4, 16, 16)
    for t in (900, 800):
        loaded(x, t, **call)
    assert loaded.stats == {"full": 1, "shallow": 1}
    with pytest.raises(ArtifactError, match=r"graphs \['full', 'shallow'\] but no forecast graph .* export it again"):
        dcfx.load(copy, forecast="linear")
    # Turned on later: refused at the next call, which runs nothing.
    loaded.reschedule(forecast="linear")
    with pytest.raises(ArtifactError, match=r"not the forecast graph that forecast='linear' runs"):
        loaded(x, 900, **call)
    assert loaded.stats == {"full": 1, "shallow": 1}


def test_forecast_is_the_recorded_default_and_opened_only_when_used(copy):
    edit_manifest(copy, lambda d: d["deepcache"].update(forecast="linear"))
    loaded = dcfx.load(copy)
    assert loaded.deepcache_config.forecast == "linear"
    assert set(loaded._build.pair.sessions) == {"full", "shallow", "forecast"}
    plain = dcfx.load(copy, forecast="none")
    assert plain.deepcache_config.forecast == "none" and set(plain._build.pair.sessions) == {"full", "shallow"}
    # Another schedule at load keeps the recorded forecast mode.
    assert dcfx.load(copy, schedule="window", start=1, stop=4).deepcache_config.forecast == "linear"


def test_a_forecast_entry_pointing_at_another_graph_is_caught(copy):
    edit_manifest(copy, lambda d: d["graphs"]["forecast"].update(file="shallow.onnx"))
    with pytest.raises(ArtifactError, match=r"shallow.onnx takes inputs .* the manifest says"):
        dcfx.load(copy, forecast="linear")


def test_unknown_or_missing_graphs_are_refused(copy, no_session):
    edit_manifest(copy, lambda d: d["graphs"].update(extra=d["graphs"]["shallow"]))
    with pytest.raises(ArtifactError, match=r"lists the graphs \['extra', 'forecast', 'full', 'shallow'\]"):
        dcfx.load(copy)
    edit_manifest(copy, lambda d: [d["graphs"].pop(g) for g in ("extra", "full")])
    with pytest.raises(ArtifactError, match=r"an export holds full, shallow and optionally forecast"):
        dcfx.load(copy)


def test_missing_manifest(copy, no_session):
    (copy / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match=r"manifest.json is missing: .* not a complete dcfx export"):
        dcfx.load(copy)


def test_not_a_directory(tmp_path):
    with pytest.raises(ArtifactError, match="is not a directory"):
        dcfx.load(tmp_path / "nothing")


def test_newer_format_version(copy, no_session):
    edit_manifest(copy, lambda d: d.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(ArtifactError, match=f"format version {FORMAT_VERSION + 1}; this dcfx reads up to"):
        dcfx.load(copy)


def test_malformed_manifest(copy, no_session):
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="is not a dcfx manifest"):
        dcfx.load(copy)
    sealed = {"format_version": FORMAT_VERSION}
    (copy / "manifest.json").write_text(json.dumps({**sealed, "seal": seal(sealed)}))
    with pytest.raises(ArtifactError, match="is malformed"):
        dcfx.load(copy)


def test_graph_file_not_hashed(copy, no_session):
    edit_manifest(copy, lambda d: d["files"].pop("shallow.onnx"))
    with pytest.raises(ArtifactError, match=r"does not list the sha256 of graph file 'shallow.onnx'"):
        dcfx.load(copy)


def test_file_outside_the_directory(copy, no_session):
    edit_manifest(copy, lambda d: d["files"].update({"../outside": {"sha256": "0" * 64, "bytes": 1}}))
    with pytest.raises(ArtifactError, match="lies outside"):
        dcfx.load(copy)


def test_swapped_graph_is_caught(copy):
    # The manifest itself edited: its full graph entry points at the shallow graph's file.
    edit_manifest(copy, lambda d: d["graphs"]["full"].update(file="shallow.onnx"))
    with pytest.raises(ArtifactError, match=r"shallow.onnx takes inputs .* the manifest says"):
        dcfx.load(copy)


# Every unpickling that reaches a class or function (a tensor, a module, any object with
# code behind it) raises the audit event "pickle.find_class", whichever API or C unpickler
# does it. A process-wide audit hook cannot be removed: it acts inside ``_no_unpickling`` only.
_UNPICKLED: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if event == "pickle.find_class" and _UNPICKLED is not None:
        _UNPICKLED.append(f"{args[0]}.{args[1]}")


sys.addaudithook(_audit)


@contextlib.contextmanager
def _no_unpickling():
    global _UNPICKLED
    _UNPICKLED = []
    try:
        yield _UNPICKLED
    finally:
        _UNPICKLED = None


def test_nothing_is_unpickled(copy):
    with _no_unpickling() as seen:
        pickle.loads(pickle.dumps(torch.ones(2)))  # the detector sees an unpickled tensor
    assert seen and any("torch" in name for name in seen)
    with _no_unpickling() as seen:
        loaded = dcfx.load(copy)
        loaded(torch.randn(2, 4, 16, 16), 900, encoder_hidden_states=torch.randn(2, 7, 8))
    assert seen == [], f"dcfx.load unpickled {seen}"


def test_the_branch_layer_is_the_cut_layer(copy):
    # Branch 1 of the two-block U-Net with two layers per up block: the first layer of the last block.
    assert SD_BRANCH == 1
    model = json.loads((copy / "manifest.json").read_text())["model"]
    assert model["branch_layer"] == "up_blocks.1.resnets.0"
    assert model["branch_layer"] in model["shallow_layers"] and "conv_out" in model["shallow_layers"]


def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
    def fail(self, programs, out, **options):
        (out / "full.onnx").write_bytes(b"half a graph")
        raise KeyboardInterrupt  # an interrupt (Ctrl-C) half way through writing

    monkeypatch.setattr(onnx_format.OnnxFormat, "write", fail)
    target = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        dcfx.export(sd_unet(), target, format="onnx", shapes={"batch": 2, "height": 16, "width": 16}, progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the target nor a partial directory


def test_existing_directory_is_kept_unless_overwrite(tmp_path, copy, monkeypatch):
    before = (copy / "manifest.json").read_text()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        dcfx.export(sd_unet(), copy, format="onnx", progress=False)
    assert (copy / "manifest.json").read_text() == before

    def fail(self, programs, out, **options):
        raise RuntimeError("disk full")

    monkeypatch.setattr(onnx_format.OnnxFormat, "write", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        dcfx.export(
            sd_unet(),
            copy,
            format="onnx",
            shapes={"batch": 2, "height": 16, "width": 16},
            overwrite=True,
            progress=False,
        )
    assert (copy / "manifest.json").read_text() == before  # the old export survives a failed overwrite
    assert sorted(p.name for p in copy.parent.iterdir()) == ["export"]


def test_altered_model_config(copy, no_session):
    edit_manifest(copy, lambda d: d["model"]["config"].update(sample_size=999))
    with pytest.raises(ArtifactError, match="config does not match its config_sha256"):
        dcfx.load(copy)


def test_manifest_cannot_make_load_import_code(copy, tmp_path, monkeypatch):
    # A module next to the export, named as the output class: it must never be imported.
    (tmp_path / "planted.py").write_text("import os\nos.environ['DCFX_PLANTED'] = 'ran'\nclass Out:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("DCFX_PLANTED", raising=False)
    edit_manifest(copy, lambda d: d["model"].update(output="planted:Out"))
    loaded = dcfx.load(copy)
    out = loaded(torch.randn(2, 4, 16, 16), 900, encoder_hidden_states=torch.randn(2, 7, 8))
    assert type(out).__name__ == "ModelOutput" and "DCFX_PLANTED" not in __import__("os").environ


def test_bad_attribute_path_in_manifest(copy, no_session):
    edit_manifest(copy, lambda d: d["model"].update(attributes={"__class__": 1}))
    with pytest.raises(ArtifactError, match="not a dotted attribute path"):
        dcfx.load(copy)


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d["deepcache"].update(branch=0),
        lambda d: d["deepcache"].update(interval=7),
        lambda d: d["dims"]["batch"].update(max=64),
        lambda d: d.update(dtype="float16"),
        lambda d: d["graphs"]["shallow"]["outputs"][0].update(dtype="float16"),
        lambda d: d["files"]["weights.bin"].update(sha256="0" * 64),
        lambda d: d.pop("checks"),
        lambda d: d.pop("seal"),
    ],
    ids=["branch", "interval", "dims", "dtype", "output dtype", "a file's sha256", "a dropped entry", "the seal"],
)
def test_a_manifest_edited_by_hand_is_refused(copy, no_session, change):
    edit_manifest(copy, change, reseal=False)
    with pytest.raises(ArtifactError, match=r"manifest.json was edited after export \(its seal does not match"):
        dcfx.load(copy)


def test_an_older_format_version_is_refused(copy, no_session):
    edit_manifest(copy, lambda d: d.update(format_version=1))
    with pytest.raises(ArtifactError, match=r"format version 1, written by an older dcfx; .* export again"):
        dcfx.load(copy)


@pytest.fixture(scope="module")
def other_export(tmp_path_factory):
    """An export of another model (other weights) with the same layout, names and shapes."""
    out = tmp_path_factory.mktemp("other") / "sd"
    shapes = {"batch": 2, "height": 16, "width": 16}
    return dcfx.export(tiny_unet(seed=1, layers_per_block=1), out, branch=SD_BRANCH, shapes=shapes, progress=False)


@pytest.mark.parametrize("name", ["weights.bin", "shallow.onnx", "full.onnx"])
def test_a_file_swapped_in_from_another_export_is_refused(copy, other_export, no_session, name):
    shutil.copyfile(other_export / name, copy / name)
    with pytest.raises(ArtifactError, match=f"{name} (has .* bytes|does not match its sha256)"):
        dcfx.load(copy)
    # With its hash copied into the manifest too, the manifest's seal gives the edit away.
    info = json.loads((other_export / "manifest.json").read_text())["files"][name]
    edit_manifest(copy, lambda d: d["files"].update({name: info}), reseal=False)
    with pytest.raises(ArtifactError, match="edited after export"):
        dcfx.load(copy)


def test_a_symlink_to_an_identical_file_outside_is_refused(copy, tmp_path, no_session):
    outside = tmp_path / "elsewhere.bin"
    shutil.move(copy / "weights.bin", outside)
    (copy / "weights.bin").symlink_to(outside)  # same bytes, same sha256: only the link gives it away
    with pytest.raises(ArtifactError, match=r"weights.bin is a symbolic link \(to .*elsewhere.bin\)"):
        dcfx.load(copy)


def test_a_symlinked_manifest_is_refused(copy, tmp_path, no_session):
    shutil.move(copy / "manifest.json", tmp_path / "manifest.json")
    (copy / "manifest.json").symlink_to(tmp_path / "manifest.json")
    with pytest.raises(ArtifactError, match=r"manifest\.json is missing"):
        dcfx.load(copy)


def test_an_unlisted_file_is_refused(copy, no_session):
    (copy / "extra_weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ArtifactError, match=r"extra_weights\.bin is not listed in the manifest"):
        dcfx.load(copy)
