"""Claim 11: layer norm suits sequences (NLP).

Protocol: a small pre-norm transformer classifies padded variable-length token sequences (label: the most
frequent of four marker tokens). BN normalizes each feature over batch and positions -- padding included, as
a naive drop-in would -- while LN and RMSNorm normalize each token on its own. A fourth contender, BN with
the padding mask, takes batch statistics from valid positions only: how much of BN's gap is padding?
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import plots
from ..data import token_sequences
from ..models import TinyTransformer, norm_label
from ..stats import PERCENT, bounds, cell, graded, paired_effect
from ..study import Claim, Finding, Profile, Run, Table, accuracies, accuracy_curves, group, values
from ..training import DIVERGED_LOSS, seed_everything

CLAIM = Claim(
    id="sequences",
    number=11,
    title="Layer norm suits sequences and NLP",
    source="LN 优点",
    zh="对小批量大小不敏感,适用于自然语言处理和小批量训练。",
    en="(LN) is insensitive to the batch size and suits natural language processing and small-batch training.",
)
VERSION = 1
NORMS = ("bn", "bnmask", "ln", "rms")
PRACTICAL = 0.02
MAX_LEN, VOCAB = 32, 12
CLASSES = 4  # which of tokens 1..4 occurs most (``token_sequences``)


def settings(profile: Profile) -> dict:
    return {"n_train": profile.pick(256, 1500, 4000), "epochs": profile.pick(1, 3, 6), "batch_size": 32, "lr": 3e-3,
            "dim": profile.pick(16, 32, 64), "depth": profile.pick(1, 2, 2)}  # fmt: skip


def jobs(profile: Profile) -> list[dict]:
    s = settings(profile)
    base = profile.base(CLAIM.id, VERSION)
    return [{**base, "norm": n, "seed": seed, **s} for n in NORMS for seed in profile.seeds]


@torch.no_grad()
def accuracy(model: torch.nn.Module, tokens: torch.Tensor, lengths: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    correct = sum(int((model(tokens[i : i + 250], lengths[i : i + 250]).argmax(1) == labels[i : i + 250]).sum()) for i in range(0, len(tokens), 250))
    model.train()
    return correct / len(tokens)


def run(config: dict) -> dict:
    generator = seed_everything(config["seed"])
    device = config["device"]
    tokens, lengths, labels = (t.to(device) for t in token_sequences(config["n_train"], seed=config["seed"], vocab=VOCAB, max_len=MAX_LEN))
    test = [t.to(device) for t in token_sequences(2000, seed=50_000, vocab=VOCAB, max_len=MAX_LEN)]
    model = TinyTransformer(VOCAB, config["dim"], config["depth"], 2, MAX_LEN, CLASSES, config["norm"], config["backend"]).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=config["lr"])
    curve, losses = [], []
    for _ in range(config["epochs"]):
        order = torch.randperm(len(tokens), generator=generator)
        for i in range(0, len(order) - config["batch_size"] + 1, config["batch_size"]):
            idx = order[i : i + config["batch_size"]]
            loss = F.cross_entropy(model(tokens[idx], lengths[idx]), labels[idx])
            losses.append(float(loss.detach()))
            if not math.isfinite(losses[-1]) or losses[-1] > DIVERGED_LOSS:
                return {"test_acc": curve, "final_test_acc": math.nan, "final_loss": math.nan, "diverged": True}
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        curve.append(accuracy(model, *test))
    return {"test_acc": curve, "final_test_acc": curve[-1], "final_loss": sum(losses[-20:]) / len(losses[-20:]), "diverged": False}


def rule(stats: dict) -> tuple[str, str]:
    """LN minus BN test accuracy (paired t CI): above 2 points -> holds, above 0 -> holds partly, else does not hold here."""
    e = stats["effect"]
    return graded(e, PRACTICAL), f"LN - BN = {100 * e.estimate:.1f} points {bounds(e.low, e.high, '.1f', 100)}"


def analyze(runs: list[Run], profile: Profile, out_dir: Path) -> Finding:
    s = settings(profile)
    by = group(runs, "norm")
    acc = {n: accuracies(by[(n,)], CLASSES) for n in NORMS}
    effect = paired_effect("test accuracy: LN - BN", acc["ln"], acc["bn"], "acc")
    rms = paired_effect("test accuracy: RMSNorm - LN", acc["rms"], acc["ln"], "acc")
    masked = paired_effect("test accuracy: masked BN - BN", acc["bnmask"], acc["bn"], "acc")
    stats = {"effect": effect}
    verdict, reason = rule(stats)
    stats = {"effect": effect.to_dict(), "rms_minus_ln": rms.to_dict(), "masked_bn_minus_bn": masked.to_dict()}

    fig, (ax,) = plots.figure(1, width=6)
    for n in NORMS:
        curves = accuracy_curves(by[(n,)], CLASSES)
        plots.line_ci(ax, list(range(1, len(curves[0]) + 1)), list(zip(*curves)), norm_label(n), n, 100, PERCENT)
    ax.set(xlabel="epoch", ylabel="test accuracy (%)", title="Transformer on padded variable-length sequences")
    ax.legend(fontsize=8)
    figures = [plots.save(fig, out_dir, f"{CLAIM.id}.png")]
    rows = [[norm_label(n), cell(acc[n], 1, 100, PERCENT), cell(values(by[(n,)], "final_loss"), 3)] for n in NORMS]
    return Finding(
        verdict=verdict,
        reason=reason,
        effect=effect,
        setting=(
            f"Token sequences of length 4..{MAX_LEN} padded to {MAX_LEN}, vocabulary {VOCAB}, {s['n_train']} train / 2000 test; "
            f"pre-norm transformer, {s['depth']} blocks, width {s['dim']}, 2 heads, masked attention and pooling; Adam {s['lr']}, "
            f"batch {s['batch_size']}, {s['epochs']} epochs. BN sees padded positions (naive drop-in), masked BN does not; "
            "eval mode for testing."
        ),
        stats=stats,
        tables=[Table("Test accuracy % [95% CI]", ["norm", "test accuracy", "final train loss"], rows)],
        figures=figures,
        notes=[f"RMSNorm minus LN: {rms.text(3)}.", f"BN with the padding mask minus plain BN: {masked.text(3)}."],
    )


def decision_rows(runs: list[Run], profile: Profile) -> list[dict]:
    """Sequence classification with a transformer at batch 32: test accuracy per norm."""
    by = group(runs, "norm")
    return [{"task": "token sequences, transformer", "batch": settings(profile)["batch_size"], "metric": "test accuracy",
             "scores": {n: accuracies(by[(n,)], CLASSES) for n in NORMS if n != "bnmask"}}]  # fmt: skip
