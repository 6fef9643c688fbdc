"""Claim 5: normalization smooths the loss surface.

Protocol (Santurkar et al. 2018): along the training trajectory of an MLP on MNIST-1D, at fixed intervals,
step from the current weights along the gradient by several step sizes and record (i) the variation of the
loss, (ii) gradient predictiveness -- the largest change of the gradient -- and (iii) effective beta-smoothness
-- that change divided by the step length. Lower means smoother. Plus 1-D and 2-D filter-normalized loss
landscapes (Li et al. 2018) around the final weights of seed 0.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as tnn
import torch.nn.functional as F

from .. import plots
from ..data import mnist1d
from ..models import MLP, norm_label
from ..stats import cell, ratio_effect, verdict_from_checks
from ..study import Claim, Finding, Profile, Run, Table, group, values
from ..training import seed_everything, train_classifier

CLAIM = Claim(
    id="loss_surface",
    number=5,
    title="Normalization smooths the loss surface",
    source="作用 4",
    zh="归一化有助于平滑损失曲面,使得优化过程更加稳定和高效。",
    en="Normalization smooths the loss surface, making optimization more stable and efficient.",
)
VERSION = 1
MEASURES = ("loss_variation", "grad_predictiveness", "beta_smoothness")
STEP_MULTIPLIERS = (0.5, 1.0, 2.0, 4.0)


def settings(profile: Profile) -> dict:
    return {
        "norms": profile.pick(["none", "bn"], ["none", "bn", "ln"], ["none", "bn", "ln", "gn"]),
        "epochs": profile.pick(1, 4, 10),
        "n_train": profile.pick(256, 2000, 4000),
        "width": profile.pick(32, 64, 128),
        "lr": 0.1,
        "batch_size": 64,
        "every": profile.pick(2, 25, 50),
        "grid": profile.pick(5, 11, 21),
    }


def jobs(profile: Profile) -> list[dict]:
    s = settings(profile)
    base = profile.base(CLAIM.id, VERSION)
    return [{**base, "norm": n, "seed": seed, **{k: v for k, v in s.items() if k != "norms"}} for n in s["norms"] for seed in profile.seeds]


def _params(model: tnn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def loss_and_grad(model: tnn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, list[torch.Tensor]]:
    """Loss and gradient on a fixed batch, batch statistics in use but running statistics left untouched."""
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    params = _params(model)
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, params)
    with torch.no_grad():
        for k, v in model.named_buffers():
            v.copy_(buffers[k])
    return float(loss.detach()), [g.detach() for g in grads]


def smoothness_probe(model: tnn.Module, x: torch.Tensor, y: torch.Tensor, lr: float) -> dict[str, float]:
    """The three measures of Santurkar et al. at the current weights, stepping along -gradient."""
    loss0, g0 = loss_and_grad(model, x, y)
    params = _params(model)
    origin = [p.detach().clone() for p in params]
    g_norm = math.sqrt(sum(float((g * g).sum()) for g in g0))
    losses, changes, betas = [loss0], [], []
    for mult in STEP_MULTIPLIERS:
        eta = lr * mult
        with torch.no_grad():
            for p, o, g in zip(params, origin, g0):
                p.copy_(o - eta * g)
        loss, g1 = loss_and_grad(model, x, y)
        change = math.sqrt(sum(float(((a - b) ** 2).sum()) for a, b in zip(g0, g1)))
        losses.append(loss)
        changes.append(change)
        betas.append(change / max(eta * g_norm, 1e-12))
    with torch.no_grad():
        for p, o in zip(params, origin):
            p.copy_(o)
    return {"loss_variation": max(losses) - min(losses), "grad_predictiveness": max(changes), "beta_smoothness": max(betas)}


def filter_normalized_direction(model: tnn.Module, generator: torch.Generator) -> list[torch.Tensor]:
    """A random direction scaled per output unit to the norm of that unit's weights; 1-D params get none (Li et al.)."""
    direction = []
    for p in _params(model):
        d = torch.randn(p.shape, generator=generator)
        if p.dim() <= 1:
            d.zero_()
        else:
            d = d * (p.detach().flatten(1).norm(dim=1) / d.flatten(1).norm(dim=1).clamp_min(1e-12)).view(-1, *[1] * (p.dim() - 1))
        direction.append(d.to(p.device))
    return direction


@torch.no_grad()
def landscape(model: tnn.Module, x: torch.Tensor, y: torch.Tensor, grid: int, generator: torch.Generator) -> dict:
    """Loss on a 1-D line and a 2-D plane through the weights, coordinates in [-1, 1], batch statistics."""
    params = _params(model)
    origin = [p.detach().clone() for p in params]
    d1, d2 = filter_normalized_direction(model, generator), filter_normalized_direction(model, generator)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    coords = torch.linspace(-1, 1, grid).tolist()

    def loss_at(a: float, b: float) -> float:
        for p, o, u, v in zip(params, origin, d1, d2):
            p.copy_(o + a * u + b * v)
        value = float(F.cross_entropy(model(x), y))
        for k, v in model.named_buffers():
            v.copy_(buffers[k])
        return min(value, 50.0)

    line = [loss_at(a, 0.0) for a in coords]
    plane = [[loss_at(a, b) for a in coords] for b in coords]
    for p, o in zip(params, origin):
        p.copy_(o)
    return {"coords": coords, "line": line, "plane": plane}


def run(config: dict) -> dict:
    generator = seed_everything(config["seed"])
    data = mnist1d().subset(config["n_train"])
    device = config["device"]
    model = MLP(40, config["width"], 3, 10, config["norm"], config["backend"]).to(device)
    x, y = data.x_train[:256].to(device), data.y_train[:256].to(device)
    probes: list[dict[str, float]] = []

    def probe(step: int, m: tnn.Module) -> None:
        if step % config["every"] == 1:
            probes.append(smoothness_probe(m, x, y, config["lr"]))

    history = train_classifier(
        model, data, epochs=config["epochs"], batch_size=config["batch_size"], lr=config["lr"], seed=config["seed"],
        device=device, on_step=probe,
    )  # fmt: skip
    result = history.to_dict()
    result["probes"] = probes
    for name in MEASURES:
        result[name] = sum(p[name] for p in probes) / len(probes)
    if config["seed"] == 0:
        model.train()
        xs, ys = data.x_train[:512].to(device), data.y_train[:512].to(device)
        result["landscape"] = landscape(model, xs, ys, config["grid"], generator)
    return result


def rule(stats: dict) -> tuple[str, str]:
    """One check per measure: BN's value is below no-norm's (CI of the ratio none/BN above 1).
    All three -> holds, one or two -> holds partly, none -> does not hold here."""
    checks = {f"BN lowers {m.replace('_', ' ')}": stats["ratio_low"][m] > 1 for m in MEASURES}
    verdict = verdict_from_checks(checks)
    return verdict, "; ".join(f"{k}: {'yes' if v else 'no'}" for k, v in checks.items())


def sharpness(line: list[float]) -> float:
    """Mean rise of the 1-D landscape (an odd grid over alpha in [-1, 1]) at |alpha| = 0.5 over its centre,
    interpolated linearly where 0.5 falls between grid points: a plain flatness number for the picture."""
    n = len(line)

    def at(alpha: float) -> float:
        pos = (alpha + 1) / 2 * (n - 1)
        i = min(int(pos), n - 2)
        return line[i] + (pos - i) * (line[i + 1] - line[i])

    return (at(-0.5) + at(0.5)) / 2 - line[n // 2]


def analyze(runs: list[Run], profile: Profile, out_dir: Path) -> Finding:
    s = settings(profile)
    norms = s["norms"]
    by = group(runs, "norm")
    effects = {(n, m): ratio_effect(f"{m}: no norm / {n}", values(by[("none",)], m), values(by[(n,)], m)) for n in norms if n != "none" for m in MEASURES}
    stats = {
        "ratio": {m: effects[("bn", m)].estimate for m in MEASURES},
        "ratio_low": {m: effects[("bn", m)].low for m in MEASURES},
    }
    verdict, reason = rule(stats)
    rows = [[norm_label(n)] + [cell(values(by[(n,)], m), 3) for m in MEASURES] for n in norms]
    ratio_rows = [[norm_label(n)] + [effects[(n, m)].text() for m in MEASURES] for n in norms if n != "none"]

    fig, axes = plots.figure(3, width=4.2, height=3.2)
    for ax, m in zip(axes, MEASURES):
        for n in norms:
            traces = list(zip(*[[p[m] for p in r.result["probes"]] for r in by[(n,)]]))
            plots.line_ci(ax, [1 + i * s["every"] for i in range(len(traces))], traces, norm_label(n), n)
        ax.set(yscale="log", xlabel="step", title=m.replace("_", " "))
        ax.legend(fontsize=7)
    figures = [plots.save(fig, out_dir, f"{CLAIM.id}_trajectory.png")]

    scapes = {n: next(r.result["landscape"] for r in by[(n,)] if "landscape" in r.result) for n in norms}
    fig, axes = plots.figure(len(norms) + 1, width=3.6, height=3.2)
    for n in norms:
        axes[0].plot(scapes[n]["coords"], scapes[n]["line"], label=norm_label(n), color=plots.color(n))
    axes[0].set(xlabel="alpha (filter-normalized)", ylabel="training loss", title="1-D landscape", yscale="log")
    axes[0].legend(fontsize=7)
    for ax, n in zip(axes[1:], norms):
        c = scapes[n]["coords"]
        cs = ax.contour(c, c, torch.tensor(scapes[n]["plane"]).clamp_max(10).log10().tolist(), levels=12, cmap="viridis")
        ax.clabel(cs, fontsize=6, fmt="%.1f")
        ax.set(title=f"2-D, {norm_label(n)} (log10 loss)", xlabel="alpha", ylabel="beta")
    figures.append(plots.save(fig, out_dir, f"{CLAIM.id}_landscape.png"))
    sharp = {n: sharpness(scapes[n]["line"]) for n in norms}
    stats["landscape_sharpness"] = sharp
    flatter = sharp["bn"] < sharp["none"]
    return Finding(
        verdict=verdict,
        reason=reason,
        effect=effects[("bn", "beta_smoothness")],
        setting=(
            f"MNIST-1D ({s['n_train']} signals), MLP 3x{s['width']}, SGD lr {s['lr']} momentum 0.9, batch {s['batch_size']}, "
            f"{s['epochs']} epochs; every {s['every']} steps, on a fixed batch of 256, steps of {list(STEP_MULTIPLIERS)} x lr along "
            f"-gradient. Landscapes: {s['grid']}-point grids on 512 training signals, seed 0, batch statistics."
        ),
        stats=stats,
        tables=[
            Table("Trajectory means [95% CI] (lower = smoother)", ["norm", *MEASURES], rows),
            Table("Ratio no norm / norm [95% CI] (> 1 = norm smoother)", ["norm", *MEASURES], ratio_rows),
        ],
        figures=figures,
        notes=[
            "Landscape pictures, read plainly: the 1-D curve around BN's solution rises "
            f"{sharp['bn']:.3f} at |alpha| = 0.5 against {sharp['none']:.3f} without a norm, so the picture "
            + ("does show a flatter basin for BN." if flatter else "does not show a flatter basin for BN.")
            + " Filter normalization makes these comparable in shape only; a single seed, not a statistic."
        ],
    )
