"""Beyond the article: AdaIN puts back the statistics InstanceNorm removes — a style swap (IN con).

Protocol on the bundled 8x8 digits: a conv autoencoder (BatchNorm) learns to reconstruct digits under random
per-image contrast and brightness (the instance-style study's "style" shift). At test time each clean digit's
bottleneck features are re-normalized by ``normkit.nn.AdaptiveInstanceNorm`` (Huang & Belongie 2017) to the
per-channel statistics of another, style-shifted digit, and decoded. Two measures per seed: how much closer the
output's brightness and contrast (pixel mean and std) come to the style image's than the plain reconstruction's,
and whether an InstanceNorm classifier trained on clean digits still reads the content digit (the instance-style
study's metric: accuracy under a style shift).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ...nn import AdaptiveInstanceNorm
from .. import plots
from ..data import digits
from ..models import ConvNet, DenoisingAutoencoder
from ..stats import HOLDS, NOT, PARTLY, PERCENT, Effect, cell, mean_ci, paired_effect
from ..study import Claim, Finding, Profile, Run, Table, values
from ..training import evaluate, seed_everything, train_classifier
from .instance_style import style_shift

CLAIM = Claim(
    id="adain_style",
    number=15,
    title="AdaIN swaps the style statistics InstanceNorm removes",
    source="IN 缺点 · IN 作用 · normkit.nn.variants",
    zh="对每个样本的每个通道进行归一化,常用于生成对抗网络(GAN)和风格迁移。",
    en="IN normalizes each channel of each sample; it is common in GANs and style transfer. Here: IN discards each "
    "image's channel statistics; AdaIN re-injects another image's, which is the style-transfer use.",
)
VERSION = 1


def settings(profile: Profile) -> dict:
    return {"ae_epochs": profile.pick(1, 10, 20), "cls_epochs": profile.pick(1, 4, 10), "n_train": profile.pick(128, None, None),
            "n_test": profile.pick(64, 200, None), "width": profile.pick(8, 16, 16), "batch_size": 64, "lr": 0.1}  # fmt: skip


def jobs(profile: Profile) -> list[dict]:
    s = settings(profile)
    base = profile.base(CLAIM.id, VERSION)
    return [{**base, "seed": seed, **s} for seed in profile.seeds]


def _autoencoder(x_train: torch.Tensor, config: dict, generator: torch.Generator) -> DenoisingAutoencoder:
    """BN autoencoder trained to reconstruct style-shifted digits, so it can render any brightness and contrast."""
    model = DenoisingAutoencoder("bn", config["backend"], config["width"]).to(config["device"])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    b = config["batch_size"]
    for epoch in range(config["ae_epochs"]):
        order = torch.randperm(len(x_train), generator=generator)
        for i in range(0, len(order) - b + 1, b):
            batch = style_shift(x_train[order[i : i + b]], config["seed"] * 1000 + epoch * 100 + i).to(config["device"])
            loss = F.mse_loss(model(batch), batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


def _style_distance(images: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    """Per image: |pixel mean difference| + |pixel std difference| (brightness and contrast)."""
    dims = (1, 2, 3)
    return (images.mean(dims) - style.mean(dims)).abs() + (images.std(dims) - style.std(dims)).abs()


def run(config: dict) -> dict:
    generator = seed_everything(config["seed"])
    data = digits().subset(config["n_train"], config["n_test"])
    channels, *size = data.x_train.shape[1:]
    autoencoder = _autoencoder(data.x_train, config, generator)
    judge = ConvNet(channels, tuple(size), [16, 32], data.num_classes, "in", config["backend"], strides=[1, 2])
    train_classifier(judge, data, epochs=config["cls_epochs"], batch_size=config["batch_size"], lr=config["lr"], seed=config["seed"],
                     device=config["device"])  # fmt: skip
    order = torch.randperm(len(data.x_test), generator=torch.Generator().manual_seed(500 + config["seed"]))
    style = style_shift(data.x_test[order], 2000 + config["seed"]).to(config["device"])
    content, labels, order = (t.to(config["device"]) for t in (data.x_test, data.y_test, order))
    with torch.no_grad():
        zc, zs = autoencoder.encode(content), autoencoder.encode(style)
        plain = autoencoder.decode(zc)
        swapped = autoencoder.decode(AdaptiveInstanceNorm()(zc, zs))
    result = {
        "style_dist_plain": float(_style_distance(plain, style).mean()),
        "style_dist_adain": float(_style_distance(swapped, style).mean()),
        "content_acc_plain": evaluate(judge, plain, labels)[1],
        "content_acc_adain": evaluate(judge, swapped, labels)[1],
        "style_label_acc_adain": evaluate(judge, swapped, labels[order])[1],
    }
    if config["seed"] == 0:
        result["examples"] = {k: t[:4].squeeze(1).tolist() for k, t in (("content", content), ("style", style), ("swapped", swapped))}
    return result


def rule(stats: dict) -> tuple[str, str]:
    """Two checks: AdaIN brings the output's brightness and contrast closer to the style image's than the plain
    reconstruction (CI of the distance reduction above 0), and the swapped image still shows the content digit, not
    the style image's (the IN classifier's accuracy w.r.t. the content digit minus w.r.t. the style digit, CI above
    0). Both -> holds, one -> holds partly."""
    checks = {"closer to the style's statistics": stats["style_gain_low"] > 0,
              "content digit, not style digit, is read": stats["content_margin_low"] > 0}  # fmt: skip
    verdict = HOLDS if all(checks.values()) else PARTLY if any(checks.values()) else NOT
    return verdict, "; ".join(f"{k}: {'yes' if v else 'no'}" for k, v in checks.items())


def analyze(runs: list[Run], profile: Profile, out_dir: Path) -> Finding:
    s = settings(profile)
    gain_values = [a - b for a, b in zip(values(runs, "style_dist_plain"), values(runs, "style_dist_adain"))]
    gain = Effect("style distance: plain reconstruction - AdaIN output", *mean_ci(gain_values), "std units")
    content = mean_ci(values(runs, "content_acc_adain"))
    change = paired_effect("content accuracy: AdaIN - plain", values(runs, "content_acc_adain"), values(runs, "content_acc_plain"), "acc")
    margin = paired_effect("AdaIN output read as content - as style digit", values(runs, "content_acc_adain"),
                           values(runs, "style_label_acc_adain"), "acc")  # fmt: skip
    stats = {"style_gain": gain.estimate, "style_gain_low": gain.low, "content": content[0], "content_change": change.estimate,
             "content_margin": margin.estimate, "content_margin_low": margin.low}  # fmt: skip
    verdict, reason = rule(stats)
    rows = [
        ["plain reconstruction", cell(values(runs, "style_dist_plain"), 3), cell(values(runs, "content_acc_plain"), 1, 100, PERCENT), "-"],
        ["AdaIN swap", cell(values(runs, "style_dist_adain"), 3), cell(values(runs, "content_acc_adain"), 1, 100, PERCENT),
         cell(values(runs, "style_label_acc_adain"), 1, 100, PERCENT)],
    ]  # fmt: skip
    examples = next(r.result["examples"] for r in runs if "examples" in r.result)
    fig, axes = plots.figure(4, 3, width=1.5, height=1.6)
    for col in range(4):
        for row, key in enumerate(("content", "style", "swapped")):
            axes[row * 4 + col].imshow(examples[key][col], cmap="gray")
            axes[row * 4 + col].set_title(key, fontsize=7)
            axes[row * 4 + col].set_axis_off()
    figures = [plots.save(fig, out_dir, f"{CLAIM.id}.png")]
    return Finding(
        verdict=verdict,
        reason=reason,
        effect=gain,
        setting=(
            f"sklearn digits 8x8, {s['n_train'] or 'all'} training / {s['n_test'] or 'all'} test images; BN conv autoencoder (width "
            f"{s['width']}) trained {s['ae_epochs']} epochs (Adam 3e-3) on per-image contrast x0.25..x4 and brightness +-1.5 std; "
            f"AdaIN at the bottleneck with a style-shifted other test digit; judge: CNN with InstanceNorm, {s['cls_epochs']} epochs "
            f"on clean digits. Seeds {list(profile.seeds)}."
        ),
        stats=stats,
        tables=[Table("Style distance (pixel |mean| + |std| gap to the style image) and judge accuracy % [95% CI]",
                      ["output", "style distance", "reads content digit", "reads style digit"], rows)],  # fmt: skip
        figures=figures,
        notes=[f"{gain.name}: {gain.text(3)}; content accuracy {100 * content[0]:.1f}% [{100 * content[1]:.1f}, {100 * content[2]:.1f}]; "
               f"{change.name}: {change.text(3)}; {margin.name}: {margin.text(3)}"],
    )
