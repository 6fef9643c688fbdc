"""Claim 7: normalization costs compute -- BN some, LN more, GN a good balance.

Protocol: one training step (forward, backward, SGD update) of the same small 2-D CNN on 8x8 digit batches
with each norm and with none, for torch.nn and for each available normkit backend. All variants are timed
interleaved in one process, round after round, so machine noise hits them alike; the fastest round counts (the
least disturbed); each seed is an independent repetition, run after all other runs with nothing of the lab beside
it. Memory: bytes of tensors saved for backward (the activation memory a norm adds), and CUDA peak
memory when on a GPU.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

import normkit
from normkit import kernels

from .. import plots
from ..data import digits
from ..models import ConvNet, norm_label
from ..stats import cell, ratio_effect, verdict_from_checks
from ..study import Claim, Finding, Profile, Run, Table, values

CLAIM = Claim(
    id="compute_overhead",
    number=7,
    title="Normalization adds compute; LN costs more; GN balances cost and effect",
    source="BN 缺点 2 · LN 缺点 · GN 优点 2",
    zh="(BN)在某些情况下会引入额外的计算开销。(LN)对计算开销要求较高。(GN)在计算效率和效果上有较好的平衡。",
    en="BN introduces extra computational overhead in some cases. LN is demanding in compute. GN strikes a good "
    "balance between computational efficiency and effectiveness.",
)
VERSION = 1
TIMES_THE_MACHINE = True
NORMS = ("none", "bn", "ln", "in", "gn")
OVERHEAD = 1.05


def settings(profile: Profile) -> dict:
    return {"rounds": profile.pick(2, 8, 20), "steps": profile.pick(2, 3, 5), "batch_size": 64, "widths": [32, 64]}


def implementations(device: str) -> list[str]:
    """torch.nn, normkit's reference backend, and the normkit backends ``auto`` would try on ``device`` that load here."""
    fast = [n for n in kernels.AUTO_ORDER.get(device, ()) if kernels.try_load(n) is not None]
    return ["torch", "reference", *fast]


def jobs(profile: Profile) -> list[dict]:
    s = settings(profile)
    base = profile.base(CLAIM.id, VERSION)
    return [{**base, "seed": seed, "impls": implementations(profile.device), **s} for seed in profile.seeds]


def saved_bytes(step) -> int:
    """Bytes of the tensors autograd saves for backward during ``step()``."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return total


def run(config: dict) -> dict:
    torch.manual_seed(config["seed"])
    device = config["device"]
    data = digits()
    x, y = data.x_train[: config["batch_size"]].to(device), data.y_train[: config["batch_size"]].to(device)
    variants = {}
    for impl in config["impls"]:
        for n in NORMS:
            if n == "none" and impl != "torch":
                continue
            model = ConvNet(1, (8, 8), config["widths"], 10, n, "torch" if impl == "torch" else "auto", strides=[1, 2]).to(device)
            variants[f"{impl}/{n}"] = (impl, model, torch.optim.SGD(model.parameters(), lr=0.01))

    def step_of(key: str):
        impl, model, opt = variants[key]

        def step() -> None:
            with normkit.backend(impl if impl != "torch" else "reference"):
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

        return step

    steps = {k: step_of(k) for k in variants}
    memory = {k: saved_bytes(steps[k]) for k in variants}
    cuda_peak = {}
    for k in variants:
        steps[k]()  # warm-up
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            steps[k]()
            cuda_peak[k] = torch.cuda.max_memory_allocated()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(config["rounds"]):
        for k in variants:
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(config["steps"]):
                steps[k]()
            if device == "cuda":
                torch.cuda.synchronize()
            times[k].append((time.perf_counter() - start) / config["steps"])
    result = {f"ms/{k}": 1e3 * min(v) for k, v in times.items()}  # the least-disturbed round
    result.update({f"saved_kib/{k}": v / 1024 for k, v in memory.items()})
    result.update({f"cuda_peak_kib/{k}": v / 1024 for k, v in cuda_peak.items()})
    return result


def rule(stats: dict) -> tuple[str, str]:
    """Three checks on torch.nn step times (ratio CIs): BN/no-norm above 1.05 (BN adds overhead), LN/BN above 1.05
    (LN costs more), GN/LN below 1 (GN cheaper than LN). All -> holds, some -> holds partly, none -> does not hold."""
    checks = {
        "BN adds overhead over no norm (torch.nn)": stats["bn_over_none_low"] > OVERHEAD,
        "LN costs more than BN (torch.nn)": stats["ln_over_bn_low"] > OVERHEAD,
        "GN costs less than LN (torch.nn)": stats["gn_over_ln_high"] < 1,
    }
    verdict = verdict_from_checks(checks)
    return verdict, "; ".join(f"{k}: {'yes' if v else 'no'}" for k, v in checks.items())


def analyze(runs: list[Run], profile: Profile, out_dir: Path) -> Finding:
    s = settings(profile)
    impls = runs[0].config["impls"]

    def ms(impl: str, n: str) -> list[float]:
        return values(runs, f"ms/{'torch' if n == 'none' else impl}/{n}")

    ratio = {(impl, a, b): ratio_effect(f"{impl}: {a}/{b} step time", ms(impl, a), ms(impl, b)) for impl in impls
             for a, b in (("bn", "none"), ("ln", "bn"), ("gn", "ln"), ("ln", "none"), ("gn", "none"), ("in", "none"))}  # fmt: skip
    stats = {
        "bn_over_none_low": ratio[("torch", "bn", "none")].low,
        "ln_over_bn_low": ratio[("torch", "ln", "bn")].low,
        "gn_over_ln_high": ratio[("torch", "gn", "ln")].high,
        "ratios": {f"{i}: {a}/{b}": e.estimate for (i, a, b), e in ratio.items()},
    }
    verdict, reason = rule(stats)
    rows = []
    for impl in impls:
        for n in NORMS:
            if n == "none" and impl != "torch":
                continue
            key = f"{impl}/{n}"
            rows.append([
                "torch.nn" if impl == "torch" else f"normkit ({impl})", norm_label(n), cell(ms(impl, n), 3),
                ratio[(impl, n, "none")].text() if n in ("bn", "ln", "gn", "in") else "1", f"{runs[0].result[f'saved_kib/{key}']:.0f}",
            ])  # fmt: skip

    fig, axes = plots.figure(len(impls), width=4.5)
    for ax, impl in zip(axes, impls):
        plots.bars_ci(ax, [norm_label(n) for n in NORMS], [ms(impl, n) for n in NORMS], list(NORMS))
        ax.set(ylabel="ms per training step", title="torch.nn" if impl == "torch" else f"normkit ({impl})")
    figures = [plots.save(fig, out_dir, f"{CLAIM.id}.png")]
    return Finding(
        verdict=verdict,
        reason=reason,
        effect=ratio[("torch", "ln", "bn")],
        setting=(
            f"2-D CNN widths {s['widths']} on 8x8 digits, batch {s['batch_size']}, one SGD step = forward + backward + update; "
            f"{s['rounds']} interleaved rounds of {s['steps']} steps per repetition, fastest round per repetition, one repetition per "
            f"seed, device {profile.device}, one thread, run alone after the other studies."
        ),
        stats=stats,
        tables=[Table("Time and activation memory per training step", ["implementation", "norm", "ms/step [95% CI]",
                      "x no norm (torch.nn) [95% CI]", "saved for backward (KiB)"], rows)],  # fmt: skip
        figures=figures,
        notes=[f"LN/BN step-time ratio, torch.nn: {ratio[('torch', 'ln', 'bn')].text()}; "
               + "; ".join(f"normkit ({i}): {ratio[(i, 'ln', 'bn')].text()}" for i in impls if i != "torch")],  # fmt: skip
    )
