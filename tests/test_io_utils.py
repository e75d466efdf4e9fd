"""monai_covid.io_utils.save_fp16: the one writer of the bundles' fp16 weights (train configs, DDP, crossval)."""

from __future__ import annotations

import torch

from monai_covid.io_utils import save_fp16


class _HasModuleAttr(torch.nn.Module):
    """Not a wrapper, but with a child called ``module``: its whole state must be kept."""

    def __init__(self) -> None:
        super().__init__()
        self.module = torch.nn.Linear(2, 2)
        self.head = torch.nn.BatchNorm1d(2)


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_save_fp16_from_module_wrapper_and_file(tmp_path):
    net = _HasModuleAttr()
    torch.nn.init.constant_(net.module.weight, 0.1)
    sd = _load(save_fp16(net, tmp_path / "a.pt"))
    assert set(sd) == set(net.state_dict())  # module.weight, head.*: nothing unwrapped by name
    assert sd["module.weight"].dtype == torch.float16
    assert torch.allclose(sd["module.weight"].float(), torch.full((2, 2), 0.1), atol=1e-4)
    assert sd["head.num_batches_tracked"].dtype == torch.int64  # integer buffers keep their type

    wrapped = torch.nn.DataParallel(net)  # a real wrapper: its "module." prefix is dropped
    assert set(_load(save_fp16(wrapped, tmp_path / "b.pt"))) == set(net.state_dict())

    f32 = tmp_path / "c.pt"
    torch.save(net.state_dict(), f32)
    save_fp16(f32, f32)  # in place, as train.json's finalize does it
    again = _load(f32)
    assert again["module.weight"].dtype == torch.float16
    assert not [p.name for p in tmp_path.iterdir() if ".part" in p.name]  # no staging file left
