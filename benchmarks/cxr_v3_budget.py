"""CPU budget of the CXR infection-map v3 cross-validation (issue 19): seconds per training step, epochs per budget.

    OMP_NUM_THREADS=1 python benchmarks/cxr_v3_budget.py [--sizes 128 256] [--budget_h 2] [--json FILE]
        [--channels_last]

One step = forward, DiceFocalLoss, backward and an Adam update on a random batch of 8 (the v3 recipe,
``monai_covid.cxr_cv.COMMON``) for each row of the v3 table (``monai_covid.cxr_cv.VARIANTS``: the slim
InfectionUNet and the stock MONAI UNet floor), at each image size; plus the forward time per X-ray (batch 16, no
gradients) for scoring. Prints wall and CPU (process) seconds: on a shared machine the wall time depends on the
other jobs, the CPU time much less. Epochs per budget = budget / (steps per epoch x CPU seconds per step), with
2,448 training X-rays a fold (4 of the 5 grouped folds of the 3,060) and no per-epoch validation.
A variant with ``channels_last: True`` (``slim_cl``) keeps its weights in channels-last memory order, as
``train.json`` does with that key; ``--channels_last`` does so for every variant (does the floor gain too?).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

TRAIN_PER_FOLD = 2448
BATCH = 8


def _network(variant: str) -> torch.nn.Module:
    from monai.bundle import ConfigParser

    from monai_covid.cxr_cv import VARIANTS

    cfg = {
        "network_def": VARIANTS[variant].get(
            "network_def",
            {
                "_target_": "monai_covid.networks.infection_unet.InfectionUNet",
                "growth_rate": 12,
                "init_features": 24,
                "decoder_channels": [64, 48, 32, 16, 8],
            },
        )
    }
    return ConfigParser(cfg).get_parsed_content("network_def")


def measure(variant: str, size: int, repeats: int = 3, channels_last: bool = False) -> dict[str, float]:
    from monai.losses import DiceFocalLoss

    from monai_covid.cxr_cv import VARIANTS

    torch.manual_seed(0)
    net = _network(variant)
    if channels_last or VARIANTS[variant].get("channels_last", False):
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    loss = DiceFocalLoss(sigmoid=True, batch=True, gamma=2.0, alpha=0.25)
    x, y = torch.rand(BATCH, 1, size, size), (torch.rand(BATCH, 1, size, size) > 0.8).float()
    wall, cpu = [], []
    for i in range(repeats + 1):  # the first step warms up allocators and kernels
        t0, c0 = time.perf_counter(), time.process_time()
        opt.zero_grad()
        loss(net(x), y).backward()
        opt.step()
        if i:
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    net.eval()
    with torch.no_grad():
        c0 = time.process_time()
        net(torch.rand(16, 1, size, size))
        infer_cpu = (time.process_time() - c0) / 16
    return {"wall_s_per_step": min(wall), "cpu_s_per_step": min(cpu), "cpu_s_per_xray_inference": infer_cpu}


def main(argv: list[str] | None = None) -> dict:
    from monai_covid.cxr_cv import VARIANTS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", type=int, default=[128, 256])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument("--budget_h", type=float, default=2.0, help="CPU hours per (variant, fold) run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    p.add_argument("--channels_last", action="store_true", help="every variant's weights in channels-last order")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    steps = -(-TRAIN_PER_FOLD // BATCH)
    out = {}
    for size in a.sizes:
        for v in a.variants:
            m = measure(v, size, a.repeats, a.channels_last)
            m["cpu_min_per_epoch"] = steps * m["cpu_s_per_step"] / 60
            m["epochs_in_budget"] = a.budget_h * 3600 / (steps * m["cpu_s_per_step"])
            out[f"{v}_{size}"] = m
            print(
                f"{v:7s} {size:4d} px: {m['cpu_s_per_step']:.2f} CPU s/step ({m['wall_s_per_step']:.2f} wall), "
                f"{m['cpu_min_per_epoch']:.1f} CPU min/epoch of {TRAIN_PER_FOLD} X-rays, "
                f"{m['epochs_in_budget']:.1f} epochs in {a.budget_h:g} h, "
                f"{1000 * m['cpu_s_per_xray_inference']:.0f} CPU ms/X-ray inference",
                flush=True,
            )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
