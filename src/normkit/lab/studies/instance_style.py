"""Claim 8: instance norm helps image generation and style tasks.

Protocol on the bundled 8x8 digits: (a) classifiers trained on clean images, tested on images with random
per-image contrast and brightness (a crude "style" shift) -- IN normalizes each image's feature maps, BN uses
dataset statistics; (b) a denoising autoencoder with BN vs IN scored by PSNR on held-out digits; (c) an
AdaIN-style picture: the IN autoencoder decodes one digit's features with another digit's instance statistics.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import plots
from ..data import digits, image_dataset
from ..models import ConvNet, DenoisingAutoencoder, norm_label
from ..stats import PERCENT, cell, paired_effect, verdict_from_checks
from ..study import Claim, Finding, Profile, Run, Table, group, values
from ..training import evaluate, seed_everything, train_classifier

CLAIM = Claim(
    id="instance_style",
    number=8,
    title="Instance norm helps image generation and style tasks",
    source="IN 作用 · IN 优点",
    zh="对每个样本的每个通道进行归一化,常用于生成对抗网络(GAN)和风格迁移。有助于生成图像处理任务中的图像质量提升。",
    en="IN normalizes each channel of each sample; it is common in GANs and style transfer, and helps image quality in "
    "image-generation tasks.",
)
VERSION = 1
CHOSEN_DATA = "style-shift classifiers"
CLASSIFIER_NORMS = ("none", "bn", "ln", "in", "gn")
DENOISER_NORMS = ("bn", "in")
NOISE = 0.6


def settings(profile: Profile) -> dict:
    return {"epochs": profile.pick(1, 5, 15), "den_epochs": profile.pick(1, 6, 20), "batch_size": 64, "lr": 0.1, "data": profile.data,
            "data_dir": profile.data_dir, "width": profile.pick(8, 8, 16), "n_train": profile.pick(256, None, None)}  # fmt: skip


def jobs(profile: Profile) -> list[dict]:
    s = settings(profile)
    base = profile.base(CLAIM.id, VERSION)
    cls = [{**base, "part": "classify", "norm": n, "seed": seed, **s} for n in CLASSIFIER_NORMS for seed in profile.seeds]
    den = [{**base, "part": "denoise", "norm": n, "seed": seed, **s} for n in DENOISER_NORMS for seed in profile.seeds]
    return cls + den


def style_shift(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Per-image random contrast (x0.25..x4, log-uniform) and brightness (+-1.5 std)."""
    g = torch.Generator().manual_seed(1000 + seed)
    n = x.shape[0]
    gain = torch.exp((torch.rand(n, 1, 1, 1, generator=g) * 2 - 1) * math.log(4))
    offset = (torch.rand(n, 1, 1, 1, generator=g) * 2 - 1) * 1.5
    return x * gain + offset


def psnr(pred: torch.Tensor, target: torch.Tensor, peak: float) -> float:
    return float(10 * torch.log10(peak**2 / F.mse_loss(pred, target)))


def run(config: dict) -> dict:
    generator = seed_everything(config["seed"])
    data = (image_dataset(config["data"], config["data_dir"]) if config["part"] == "classify" else digits()).subset(config["n_train"])
    device = config["device"]
    channels, *size = data.x_train.shape[1:]
    if config["part"] == "classify":
        model = ConvNet(channels, tuple(size), [config["width"], 2 * config["width"]], data.num_classes, config["norm"], config["backend"], strides=[1, 2])
        history = train_classifier(model, data, epochs=config["epochs"], batch_size=config["batch_size"], lr=config["lr"],
                                   seed=config["seed"], device=device)  # fmt: skip
        if history.diverged:  # a model of non-finite weights, maybe before any test: chance, as every study scores it
            chance = 1.0 / data.num_classes
            return {"clean_acc": chance, "shifted_acc": chance, "diverged": True}
        shifted = style_shift(data.x_test, config["seed"]).to(device)
        return {"clean_acc": history.test_acc[-1], "shifted_acc": evaluate(model, shifted, data.y_test.to(device))[1]}
    model = DenoisingAutoencoder(config["norm"], config["backend"], config["width"]).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x_train = data.x_train.to(device)
    for _ in range(config["den_epochs"]):
        order = torch.randperm(len(x_train), generator=generator)
        for i in range(0, len(order) - config["batch_size"] + 1, config["batch_size"]):
            clean = x_train[order[i : i + config["batch_size"]]]
            noisy = clean + NOISE * torch.randn(clean.shape, generator=generator).to(device)
            loss = F.mse_loss(model(noisy), clean)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    clean = data.x_test.to(device)
    noisy = clean + NOISE * torch.randn(clean.shape, generator=torch.Generator().manual_seed(7)).to(device)
    peak = float(data.x_train.max() - data.x_train.min())
    with torch.no_grad():
        result = {"psnr": psnr(model(noisy), clean, peak), "psnr_noisy": psnr(noisy, clean, peak)}
        if config["seed"] == 0:
            result["examples"] = {"clean": clean[:4].squeeze(1).tolist(), "noisy": noisy[:4].squeeze(1).tolist(),
                                  "denoised": model(noisy[:4]).squeeze(1).tolist()}  # fmt: skip
            if config["norm"] == "in":
                result["adain"] = adain_swap(model, clean[:3], clean[3:6])
    return result


def adain_swap(model: DenoisingAutoencoder, content: torch.Tensor, style: torch.Tensor) -> dict:
    """Decode content features re-normalized to the style image's per-channel mean and std (Huang & Belongie 2017)."""
    zc, zs = model.encode(content), model.encode(style)
    mc, sc = zc.mean((2, 3), keepdim=True), zc.std((2, 3), keepdim=True) + 1e-5
    ms, ss = zs.mean((2, 3), keepdim=True), zs.std((2, 3), keepdim=True) + 1e-5
    swapped = model.decode((zc - mc) / sc * ss + ms)
    return {"content": content.squeeze(1).tolist(), "style": style.squeeze(1).tolist(), "content_decoded": model.decode(zc).squeeze(1).tolist(),
            "swapped": swapped.squeeze(1).tolist()}  # fmt: skip


def rule(stats: dict) -> tuple[str, str]:
    """Two checks: IN keeps more accuracy than BN under per-image style shifts (CI of IN - BN above 0), and the IN
    denoiser beats the BN one in PSNR (CI above 0). Both -> holds, one -> holds partly, none -> does not hold here."""
    checks = {
        "IN is more robust to per-image style shifts than BN": stats["shift_gain_low"] > 0,
        "IN denoises better than BN (PSNR)": stats["psnr_gain_low"] > 0,
    }
    verdict = verdict_from_checks(checks)
    return verdict, "; ".join(f"{k}: {'yes' if v else 'no'}" for k, v in checks.items())


def analyze(runs: list[Run], profile: Profile, out_dir: Path) -> Finding:
    s = settings(profile)
    by = group(runs, "part", "norm")
    shift = paired_effect("shifted-test accuracy: IN - BN", values(by[("classify", "in")], "shifted_acc"), values(by[("classify", "bn")], "shifted_acc"), "acc")
    gain = paired_effect("denoising PSNR: IN - BN", values(by[("denoise", "in")], "psnr"), values(by[("denoise", "bn")], "psnr"), "dB")
    stats = {"shift_gain": shift.estimate, "shift_gain_low": shift.low, "psnr_gain": gain.estimate, "psnr_gain_low": gain.low}
    verdict, reason = rule(stats)
    cls_rows = [[norm_label(n), cell(values(by[("classify", n)], "clean_acc"), 1, 100, PERCENT), cell(values(by[("classify", n)], "shifted_acc"), 1, 100, PERCENT)]
                for n in CLASSIFIER_NORMS]  # fmt: skip
    den_rows = [[norm_label(n), cell(values(by[("denoise", n)], "psnr"), 2), cell(values(by[("denoise", n)], "psnr_noisy"), 2)] for n in DENOISER_NORMS]

    fig, (ax_cls, ax_den) = plots.figure(2, width=4.5)
    plots.bars_ci(ax_cls, [norm_label(n) for n in CLASSIFIER_NORMS], [values(by[("classify", n)], "shifted_acc") for n in CLASSIFIER_NORMS],
                  list(CLASSIFIER_NORMS), 100, PERCENT)  # fmt: skip
    ax_cls.set(ylabel="accuracy on style-shifted test (%)", title="(a) Trained clean, tested shifted")
    plots.bars_ci(ax_den, [norm_label(n) for n in DENOISER_NORMS], [values(by[("denoise", n)], "psnr") for n in DENOISER_NORMS], list(DENOISER_NORMS))
    ax_den.set(ylabel="PSNR (dB)", title="(b) Denoising autoencoder")
    figures = [plots.save(fig, out_dir, f"{CLAIM.id}.png")]

    seed0 = {n: next(r.result for r in by[("denoise", n)] if "examples" in r.result) for n in DENOISER_NORMS}
    adain = seed0["in"]["adain"]
    fig, axes = plots.figure(6, 3, width=1.5, height=1.6)
    panels = [("clean", seed0["bn"]["examples"]["clean"]), ("noisy", seed0["bn"]["examples"]["noisy"]),
              ("BN denoised", seed0["bn"]["examples"]["denoised"]), ("IN denoised", seed0["in"]["examples"]["denoised"])]  # fmt: skip
    for col, (title, images) in enumerate(panels):
        for row in range(3):
            axes[row * 6 + col].imshow(images[row], cmap="gray")
            axes[row * 6 + col].set_title(title, fontsize=7)
    for row in range(3):
        axes[row * 6 + 4].imshow(adain["style"][row], cmap="gray")
        axes[row * 6 + 4].set_title("style image", fontsize=7)
        axes[row * 6 + 5].imshow(adain["swapped"][row], cmap="gray")
        axes[row * 6 + 5].set_title("(c) AdaIN swap", fontsize=7)
    for ax in axes:
        ax.set_axis_off()
    figures.append(plots.save(fig, out_dir, f"{CLAIM.id}_examples.png"))
    return Finding(
        verdict=verdict,
        reason=reason,
        effect=gain,
        setting=(
            f"{'sklearn digits 8x8' if s['data'] == 'digits' else s['data']}; (a) 2-D CNN widths [{s['width']}, {2 * s['width']}], {s['epochs']} epochs, SGD lr "
            f"{s['lr']}, batch {s['batch_size']}; test images get per-image contrast x0.25..x4 and brightness +-1.5 std. "
            f"(b) conv autoencoder on digits, Gaussian noise sigma {NOISE} (data std units), Adam 3e-3, {s['den_epochs']} epochs; PSNR with "
            "peak = data range. (c) the IN autoencoder (seed 0) decodes digit A's features with digit B's channel mean/std."
        ),
        stats=stats,
        tables=[
            Table("(a) Accuracy % [95% CI]", ["norm", "clean test", "style-shifted test"], cls_rows),
            Table("(b) Denoising PSNR dB [95% CI]", ["norm", "denoised", "noisy input"], den_rows),
        ],
        figures=figures,
        notes=[f"Shifted-test accuracy IN - BN: {shift.text(3)}. PSNR IN - BN: {gain.text(2)}. The AdaIN row is an illustration, not a test."],
    )
