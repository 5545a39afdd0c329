"""The private torch APIs keras_ckpt.torch uses exist as it calls them, and its fallback works."""

from __future__ import annotations

import zipfile

import pytest

torch = pytest.importorskip("torch")

from keras_ckpt import _compat  # noqa: E402
from keras_ckpt.torch import ModelCheckpoint  # noqa: E402


@pytest.mark.parametrize("api", _compat.TORCH, ids=lambda api: f"{api.module}.{api.name}")
def test_each_private_torch_api_exists_with_the_parameters_used(api):
    _compat.check(api)
    assert api.used_by and api.fallback


def test_every_torch_entry_is_one_the_shim_uses():
    assert _compat.TORCH_SAVE in _compat.TORCH


def save_and_restore(tmp_path, name: str) -> tuple[str, torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(300, 200), torch.nn.Linear(200, 3))
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.ones(2, 300)).sum().backward()
    opt.step()
    ckpt = ModelCheckpoint(str(tmp_path / name / "c-{epoch}.pt"), model=model, optimizer=opt)
    ckpt.on_train_begin()
    ckpt.on_epoch_end(0)
    target = torch.nn.Sequential(torch.nn.Linear(300, 200), torch.nn.Linear(200, 3))
    target_opt = torch.optim.Adam(target.parameters(), lr=0.1)
    again = ModelCheckpoint(str(tmp_path / name / "c-{epoch}.pt"), model=target,
                            optimizer=target_opt, resume=True)
    assert again.on_train_begin() == 1
    for key, value in model.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    for a, b in zip(opt.state_dict()["state"].values(), target_opt.state_dict()["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    return ckpt.latest_path, model, target


def test_the_private_path_writes_valid_zip_files(tmp_path):
    assert _compat.available(_compat.TORCH_SAVE)
    path, _, _ = save_and_restore(tmp_path, "private")
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None


def test_without_the_private_api_torch_save_writes_a_file_that_restores_exactly(
    tmp_path, monkeypatch
):
    real = _compat.available
    monkeypatch.setattr(_compat, "available",
                        lambda api: False if api in _compat.TORCH else real(api))
    path, model, _ = save_and_restore(tmp_path, "fallback")
    payload = torch.load(path, weights_only=True)
    assert set(payload["model"]) == set(model.state_dict())


def test_zip64_records_are_written_where_sizes_and_offsets_need_them(tmp_path, monkeypatch):
    """The ZIP64 branches, reached with small files by lowering the limit they switch at."""
    import keras_ckpt.torch as shim

    monkeypatch.setattr(shim, "_ZIP64_LIMIT", 1000)
    path, model, _ = save_and_restore(tmp_path, "zip64")
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None
        sizes = {i.filename: i.file_size for i in z.infolist()}
    assert max(sizes.values()) > 1000
    payload = torch.load(path, weights_only=True, mmap=True)
    for key, value in model.state_dict().items():
        assert torch.equal(payload["model"][key], value), key
