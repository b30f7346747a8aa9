"""The numerics check on real data: the seed's SmallResNet trained eagerly and through fusedres, from the same
initial weights on the same batches of scikit-learn's bundled digits (8x8 grey images, upsampled to 32x32 and
repeated to 3 channels), and the gap between the two loss curves. On a CPU the fused run goes through Triton's
interpreter, so the two runs really are computed by different code."""
from __future__ import annotations

import copy
import json
import pathlib

import torch
import torch.nn.functional as F

from .runner import Settings, dtype_name


def digits(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    images = (images - images.mean()) / images.std()
    return images.to(device), torch.tensor(data.target).to(device)


def train(model, images, labels, steps: int, batch_size: int, layout: str, seed: int = 0) -> list[float]:
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    order = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        batch = torch.randint(0, images.shape[0], (batch_size,), generator=order).to(images.device)
        loss = F.cross_entropy(model(images[batch].contiguous(memory_format=fmt)), labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def run_numerics(settings: Settings, steps: int, out: pathlib.Path) -> list[dict]:
    import fusedres
    from fusedres import seed

    images, labels = digits(settings.device)
    layout = settings.layouts[0]
    torch.manual_seed(0)
    eager = seed.SmallResNet(num_classes=10).to(settings.device)
    fused = fusedres.convert(eager)
    # Training amplifies rounding: eager float64 shows how far each float32 run strays on its own.
    curves = {"eager": train(copy.deepcopy(eager), images, labels, steps, settings.batch_size, layout),
              "fusedres": train(fused, images, labels, steps, settings.batch_size, layout),
              "eager float64": train(copy.deepcopy(eager).double(), images.double(), labels, steps,
                                     settings.batch_size, layout)}
    gaps = [abs(a - b) for a, b in zip(curves["eager"], curves["fusedres"])]
    strays = {name: max(abs(a - b) for a, b in zip(curves[name], curves["eager float64"]))
              for name in ("eager", "fusedres")}
    out.mkdir(parents=True, exist_ok=True)
    (out / "numerics.json").write_text(json.dumps({"steps": steps, "batch_size": settings.batch_size,
                                                   "layout": layout, "losses": curves, "gaps": gaps,
                                                   "largest_gap_to_float64": strays}, indent=1))
    try:
        _plot(curves, gaps, out / "numerics.png", settings)
    except ImportError as missing:
        print(f"fusedres-bench: no numerics plot: {missing}")
    base = dict(level="numerics", op="seed.SmallResNet on digits", mode=f"train {steps} steps",
                shape=f"{settings.batch_size}x3x32x32", dtype=dtype_name(torch.float32), layout=layout)
    where = "fusedres in Triton's interpreter" if not settings.on_gpu else "fusedres on the GPU"
    return [dict(base, provider="eager", max_abs_error=strays["eager"],
                 note=f"eager: final loss {curves['eager'][-1]:.4f}; largest gap to eager float64 "
                      f"{strays['eager']:.2e}"),
            dict(base, provider="fusedres", max_abs_error=strays["fusedres"],
                 note=f"fusedres ({where}): final loss {curves['fusedres'][-1]:.4f}; largest gap to eager float64 "
                      f"{strays['fusedres']:.2e}; largest gap to eager {max(gaps):.2e} at step "
                      f"{gaps.index(max(gaps))}")]


def _plot(curves, gaps, path, settings) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (losses, gap) = plt.subplots(2, 1, figsize=(6, 5), sharex=True)
    for (provider, curve), style in zip(curves.items(), ("-", "--", ":")):
        losses.plot(curve, label=provider, linestyle=style)
    losses.set_ylabel("training loss")
    losses.legend()
    losses.set_title(f"SmallResNet on digits, eager vs fusedres ({settings.device.type})", fontsize=9)
    gap.plot(gaps, color="black", label="|fusedres - eager|")
    gap.set_ylabel("loss gap")
    gap.legend(fontsize=7)
    gap.set_xlabel("step")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
