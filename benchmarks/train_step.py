"""Training-step time of the shipped (slim) networks against their paper-size variants, measured in one run.

    python benchmarks/train_step.py [--threads 1] [--repeats 3] [--json FILE]

One step = forward, loss, backward and an Adam update on a random batch of the bundle's training shape (CXR
infection U-Net: 8 X-rays at 256x256; A-SegNet: 8 crops at 128x128). Prints seconds per step of each network and
the paper/slim ratio, and the minutes an epoch would take at the bundle's iterations per epoch. This is what decides
whether a paper-size variant can be trained on the machine at hand.
"""

from __future__ import annotations

import argparse
import time

import torch


def _step_seconds(net: torch.nn.Module, shape: tuple[int, ...], classes: int, repeats: int) -> float:
    opt = torch.optim.Adam(net.parameters(), 1e-4)
    x = torch.rand(shape)
    if classes == 1:
        y = (torch.rand(shape) > 0.8).float()
        loss_fn = torch.nn.functional.binary_cross_entropy_with_logits
    else:
        y = (torch.rand(shape[0], *shape[2:]) > 0.8).long()
        loss_fn = torch.nn.functional.cross_entropy
    times = []
    for i in range(repeats + 1):  # the first step warms up allocators and kernels
        t0 = time.perf_counter()
        opt.zero_grad()
        loss_fn(net(x), y).backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - t0)
    return min(times)


def main(argv: list[str] | None = None) -> dict:
    from monai_covid.networks.attention_segnet import AttentionSegNet
    from monai_covid.networks.infection_unet import PAPER_DENSENET121, InfectionUNet

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    cases = {
        # name: (slim network, paper-size network, batch shape, output classes, iterations an epoch)
        "cxr_infection_unet": (
            lambda: InfectionUNet(growth_rate=12, init_features=24, decoder_channels=(64, 48, 32, 16, 8)),
            lambda: InfectionUNet(**PAPER_DENSENET121),
            (8, 1, 256, 256), 1, 70,  # 560 training X-rays, batch 8
        ),
        "asegnet": (
            lambda: AttentionSegNet(channels=(8, 16, 32, 64, 128), convs_per_stage=(2, 2, 2, 2, 2)),
            lambda: AttentionSegNet(channels=(64, 128, 256, 512, 512), convs_per_stage=(2, 2, 3, 3, 3)),
            (8, 1, 128, 128), 2, 20,  # 40 slices drawn 4 times, batch 8
        ),
    }
    out: dict = {"threads": a.threads}
    for name, (slim, paper, shape, classes, iters) in cases.items():
        row = {}
        for size, make in (("slim", slim), ("paper", paper)):
            net = make()
            s = _step_seconds(net, shape, classes, a.repeats)
            row[f"{size}_params_m"] = round(sum(q.numel() for q in net.parameters()) / 1e6, 2)
            row[f"{size}_seconds_per_step"] = round(s, 3)
            row[f"{size}_minutes_per_epoch"] = round(s * iters / 60, 2)
        row["paper_over_slim"] = round(row["paper_seconds_per_step"] / row["slim_seconds_per_step"], 2)
        out[name] = row
        print(f"{name}: slim {row['slim_params_m']} M params {row['slim_seconds_per_step']} s/step, paper "
              f"{row['paper_params_m']} M {row['paper_seconds_per_step']} s/step -> {row['paper_over_slim']}x; "
              f"{row['slim_minutes_per_epoch']} vs {row['paper_minutes_per_epoch']} min/epoch (training steps only)")
    if a.json:
        from monai_covid.io_utils import atomic_write_json

        atomic_write_json(a.json, out)
    return out


if __name__ == "__main__":
    main()
