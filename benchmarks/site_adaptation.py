"""Cross-domain check of site adaptation: does an encoder that never saw a cardiac image get better at
1-shot cardiac segmentation after `metaapp adapt-site` on the cardiac images alone (labels unused)?
And would the guard have taken the better encoder?

Stages (each one is skipped when its output exists in --work, so a long run can be resumed):
1. data: TotalSegmentator's examples and the brain sample studies (6, all labelled, built afresh) as
   `metaapp bank` files; the 35 MS-CMRSeg bSSFP images as a datastore view without labels (for
   adapt-site) and with labels (for the evaluation only);
2. base: `metaapp meta-train` on the two banks only (no cardiac image)
   (`--base-sampler`: the classic or the bank sampler);
3. site: `metaapp adapt-site --studies <cardiac images> --init base.pt`, one arm per self-supervised
   task T of --ssl-tasks with the classic sampler and one with the bank sampler (--site-samplers), each
   from the same base (time budget, checks every --check-minutes with each candidate kept; `site.pt`
   for superpixel, `site_T.pt` otherwise); with --server-samplers, the same through a real
   `metaapp serve`'s idle loop on the cardiac images (`server_S.pt`: its last candidate);
4. evaluation: `evaluate_seg` (1-shot, whole volume, same supports and queries for every encoder) of
   the base encoder and of every checked candidate on LV myocardium (200), LV blood pool (500) and
   RV blood pool (600), each kept next to its weights (`.eval.json`). The guard's self-supervised
   validation loss of each candidate is compared with its Dice.

Usage:
    python benchmarks/site_adaptation.py --work /tmp/site_bench [--base-minutes 58 --base-steps 250]
        [--base-sampler bank] [--site-minutes 30 --check-minutes 10] [--repeats 8 --queries 5]
        [--ssl-tasks superpixel supervoxel] [--site-samplers classic bank] [--server-samplers classic bank] [--paired]
Results: benchmarks/results/site_adaptation.json + .png (with the commands and the provenance); with
several arms the summary has one entry per arm.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from monailabel_metaapp.core.checkpoint import atomic_write  # noqa: E402
from monailabel_metaapp.shared_data import (  # noqa: E402
    CMR_STRUCTURES,
    cmr_view,
    require_shared_datasets,
    totalseg_view,
)

OUT = REPO / "benchmarks" / "results" / "site_adaptation"


def metaapp(*args: str) -> list[str]:
    return [sys.executable, "-m", "monailabel_metaapp", *args]


def run(cmd: list[str], log: Path, commands: list[str]) -> None:
    commands.append(shlex.join(["metaapp", *cmd[3:]]))
    print("$", commands[-1], flush=True)
    with open(log, "a") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT)


def prepare(work: Path, commands: list[str]) -> dict[str, Path]:
    from monailabel_metaapp.samples import build_samples

    require_shared_datasets()
    p = {
        "totalseg": work / "totalseg.npz",
        "brain": work / "brain.npz",
        "cmr_images": work / "cmr_images",
        "cmr": work / "cmr",
    }
    if not p["totalseg"].exists():
        run(metaapp("bank", "--studies", str(totalseg_view(work / "totalseg")), "--out", str(p["totalseg"])),
            work / "bank.log", commands)  # fmt: skip
    if not p["brain"].exists():
        build_samples(work / "brain", n_studies=6, n_labelled=6, seed=0)
        run(metaapp("bank", "--studies", str(work / "brain"), "--out", str(p["brain"])), work / "bank.log", commands)
    if not p["cmr_images"].exists():
        cmr_view(p["cmr_images"], labelled=False)
    if not p["cmr"].exists():
        cmr_view(p["cmr"], labelled=True)
    return p


def server_run(p: dict[str, Path], base: Path, work: Path, sampler: str, minutes: float, check_minutes: float):
    """The idle loop of a real `metaapp serve` on the cardiac images (no labels): it trains for `minutes`
    (conf `site_adapt_minutes`), the guard checks every `check_minutes`. Returns (the loop's last
    candidate, read from its training state whatever the guard decided; the loop's record). Skipped when
    the candidate exists.

    Args:
        p: the prepared data (`prepare`).
        base: the encoder the server starts with (conf `model`).
        work: scratch folder.
        sampler: conf `site_sampler`.
        minutes: conf `site_adapt_minutes`.
        check_minutes: conf `site_check_minutes`.
    """
    import time

    import requests
    import torch

    from monailabel_metaapp.core.checkpoint import save_model
    from monailabel_metaapp.core.site_adaptation import SiteAdaptation
    from monailabel_metaapp.devserver import Server

    out = work / f"server_{sampler}.pt"
    store = work / f"server_store_{sampler}"
    site = store / ".metaapp" / "site"
    if out.exists():
        return out, json.loads((site / "site.json").read_text())
    store.mkdir(parents=True, exist_ok=True)
    for f in p["cmr_images"].iterdir():
        if not (store / f.name).exists():
            (store / f.name).symlink_to(f.resolve())
    conf = {"model": str(base), "device": "cpu", "site_adapt": "true", "site_adapt_cls": "false",
            "site_adapt_minutes": str(minutes), "site_check_minutes": str(check_minutes),
            "site_sampler": sampler, "refine": "false"}  # fmt: skip
    server = Server(store, work / f"server_{sampler}.log", conf).start()
    t0 = time.time()
    try:
        while True:
            info = requests.get(f"{server.url}/info/", timeout=30).json()["metaapp"]["fewshot_seg"]["site_adaptation"]
            if info.get("error"):
                raise RuntimeError(f"the idle loop failed: {info['error']}")
            rec = json.loads((site / "site.json").read_text()) if (site / "site.json").exists() else {}
            if rec.get("last_check_minutes", 0) >= minutes and info["state"] in ("idle", "off"):
                break
            if time.time() - t0 > minutes * 60 * 3 + 900:
                raise TimeoutError(f"the idle loop did not finish: {info}")
            time.sleep(5)
    finally:
        server.stop()
    record = json.loads((site / "site.json").read_text())
    record["wall_minutes"] = round((time.time() - t0) / 60, 1)
    state = torch.load(site / "state.pt", map_location="cpu", weights_only=True)
    model = SiteAdaptation.load(base)
    model.load_state_dict(state["model"])
    save_model(model, out, {"site_adaptation": {"server": True, "sampler": sampler, "steps": state["steps"]}})
    return out, record


def evaluate(model: Path, cmr: Path, repeats: int, queries: int, seed: int, per_episode: bool = False) -> dict:
    """structure -> 1-shot Dice of `model` (mean, spread, and each episode's in `values`); kept next to the
    weights (`.eval.json`, keyed by the settings and the weights' digest) so that a resumed run does not
    evaluate an encoder twice. `per_episode`: a kept result without each episode's Dice is redone."""
    import hashlib

    from monailabel_metaapp.evaluate import evaluate_seg

    key = f"{hashlib.sha256(model.read_bytes()).hexdigest()}:{repeats}:{queries}:{seed}"
    cache = Path(str(model) + ".eval.json")
    if cache.exists() and json.loads(cache.read_text()).get("key") == key:
        kept = json.loads(cache.read_text())["dice"]
        if not per_episode or all("values" in d for d in kept.values()):
            return kept
    res = evaluate_seg(cmr, [1], CMR_STRUCTURES, str(model), repeats, queries, [], protocol="volume", seed=seed)
    dice = {r["structure"]: {"dice": r["dice_mean"], "std": r["dice_std"], "n": r["n"], "values": r["values"]}
            for r in res["rows"]}  # fmt: skip
    atomic_write(cache, lambda f: Path(f).write_text(json.dumps({"key": key, "dice": dice})))
    return dice


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/site_bench"), help="data, weights and logs")
    ap.add_argument("--base-minutes", type=float, default=58.0)
    ap.add_argument("--base-steps", type=int, default=250)
    ap.add_argument("--site-minutes", type=float, default=30.0)
    ap.add_argument("--check-minutes", type=float, default=10.0)
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--queries", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--ssl-tasks", nargs="+", choices=["superpixel", "supervoxel"], default=["superpixel"],
        help="site-adapt once per self-supervised task, each from the same base",
    )  # fmt: skip
    ap.add_argument("--base-sampler", choices=["classic", "bank"], default="classic", help="meta-train --sampler")
    ap.add_argument(
        "--site-samplers", nargs="+", choices=["classic", "bank"], default=["classic"],
        help="adapt-site --sampler: one site adaptation per sampler (the bank sampler's tasks are superpixels)",
    )  # fmt: skip
    ap.add_argument(
        "--server-samplers", nargs="*", choices=["classic", "bank"], default=[],
        help="also site-adapt through a real `metaapp serve`'s idle loop, once per conf site_sampler",
    )  # fmt: skip
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument(
        "--paired", action="store_true",
        help="evaluate the server's encoders (and the base) with each episode's Dice kept, and test each server "
             "decision pairwise (`paired` in the summary)",
    )  # fmt: skip
    ap.add_argument("--note", default="", help="recorded with the results (e.g. how the machine was shared)")
    a = ap.parse_args()
    work = a.work
    work.mkdir(parents=True, exist_ok=True)
    commands: list[str] = []
    p = prepare(work, commands)

    base = work / "base.pt"
    base_log = Path(str(base) + ".log.jsonl")
    base_cmd = metaapp("meta-train", "--studies", str(p["totalseg"]), str(p["brain"]), "--out", str(base),
                       "--minutes", str(a.base_minutes), "--max-steps", str(a.base_steps), "--tasks-per-step", "8",
                       "--device", "cpu", "--sampler", a.base_sampler)  # fmt: skip
    if not base_log.exists() or '"final": true' not in base_log.read_text():
        run(base_cmd, work / "base.log", commands)
    else:
        made_by = json.loads(Path(str(base) + ".json").read_text())["meta_train"].get("sampler", "classic")
        if made_by != a.base_sampler:
            raise SystemExit(f"{base} was meta-trained with the {made_by} sampler, not {a.base_sampler}")
        commands.append(shlex.join(["metaapp", *base_cmd[3:]]))
    # one arm per self-supervised task with the classic sampler, and one with the bank sampler
    arms = {t: ("classic", t) for t in a.ssl_tasks if "classic" in a.site_samplers}
    arms |= {"bank": ("bank", "superpixel")} if "bank" in a.site_samplers else {}
    sites = {arm: work / ("site.pt" if arm == "superpixel" else f"site_{arm}.pt") for arm in arms}
    for task, site in sites.items():
        site_log = Path(str(site) + ".log.jsonl")
        sampler, ssl_task = arms[task]
        site_cmd = metaapp("adapt-site", "--studies", str(p["cmr_images"]), "--init", str(base), "--out", str(site),
                           "--minutes", str(a.site_minutes), "--check-minutes", str(a.check_minutes),
                           "--keep-candidates", "--device", "cpu", "--ssl-task", ssl_task,
                           "--sampler", sampler)  # fmt: skip
        if not site_log.exists() or '"final": true' not in site_log.read_text():
            run(site_cmd, work / f"site_{task}.log", commands)
        else:
            commands.append(shlex.join(["metaapp", *site_cmd[3:]]))

    servers = {}
    for sampler in a.server_samplers:
        servers[sampler] = server_run(p, base, work, sampler, a.site_minutes, a.check_minutes)
        commands.append(
            f"metaapp serve --studies {work}/server_store_{sampler} --conf model {base} --conf device cpu "
            f"--conf site_adapt_cls false "
            f"--conf site_adapt_minutes {a.site_minutes} --conf site_check_minutes {a.check_minutes} "
            f"--conf site_sampler {sampler} --conf refine false  # the cardiac images, linked"
        )
    base_meta = json.loads(Path(str(base) + ".json").read_text())
    rows = [{"encoder": "base", "steps": 0, "minutes": 0.0, "ssl_loss": None}]
    rows[0]["dice"] = evaluate(base, p["cmr"], a.repeats, a.queries, a.seed, per_episode=a.paired and bool(servers))
    summaries, all_checks, curves, weights = {}, {}, {}, [base]
    for task, site in sites.items():
        log = [json.loads(line) for line in Path(str(site) + ".log.jsonl").read_text().splitlines()]
        checks = [r["check"] for r in log if "check" in r]
        all_checks[task] = checks
        curves[task] = [(r["seconds"], r["val_loss"]) for r in log if "val_loss" in r and "step" in r]
        if checks and rows[0]["ssl_loss"] is None:  # the guard's tasks are the same for every --ssl-task
            rows[0]["ssl_loss"] = checks[0]["live"]
        task_rows, seen = [rows[0]], set()
        for c in checks:
            if c["steps"] in seen:
                continue
            seen.add(c["steps"])
            cand = Path(f"{site}.step{c['steps']:05d}.pt")
            row = {"encoder": cand.name, "ssl_task": task, "steps": c["steps"], "minutes": c["minutes"]}
            row.update(ssl_loss=c["candidate"], guard_accepts=c["accepted"])
            row["dice"] = evaluate(cand, p["cmr"], a.repeats, a.queries, a.seed)
            task_rows.append(row)
            weights.append(cand)
        rows += task_rows[1:]
        summaries[task] = summarise(task_rows, checks, base_meta)
    for sampler, (cand, record) in servers.items():
        arm, checks = f"server_{sampler}", record.get("checks", [])
        all_checks[arm] = checks
        # the base as this server saw it: its self-supervised loss on the server's own held-out images
        start = {**rows[0], "ssl_loss": checks[0]["live"] if checks else None}
        arm_rows, by_version = [start], {0: start}
        for c in checks:  # every encoder the guard took live, and the last candidate if it was turned down
            last = c is checks[-1]
            if not c["accepted"] and not last:
                continue  # a candidate turned down mid-run is not kept
            path = (
                work / f"server_store_{sampler}/.metaapp/site/encoders/v{c['version']:04d}.pt"
                if c["accepted"]
                else cand
            )
            row = {"encoder": f"{arm}:v{c['version']}" if c["accepted"] else cand.name, "ssl_task": arm}
            row.update(steps=c["steps"], minutes=c["minutes"], ssl_loss=c["candidate"], guard_accepts=c["accepted"])
            d = evaluate(path, p["cmr"], a.repeats, a.queries, a.seed, per_episode=a.paired)
            row.update(live_version=c["live_version"], dice=d)
            row["dice_mean"] = mean_dice(d)
            if c["accepted"]:
                by_version[c["version"]] = row
            arm_rows.append(row)
            weights.append(path)
        rows += arm_rows[1:]
        summaries[arm] = summarise(arm_rows, checks, base_meta, against_base=False)
        summaries[arm]["server_versions"], summaries[arm]["server_live"] = record.get("versions"), record.get("live")
        # each decision judged by the Dice of the two encoders it compared (the live one at the time); a
        # candidate turned down mid-run is not kept, so only the checks in `judged_check_steps` are judged
        for r in arm_rows[1:]:
            if r["live_version"] not in by_version:  # its check is no longer in site.json's record
                path = work / f"server_store_{sampler}/.metaapp/site/encoders/v{r['live_version']:04d}.pt"
                d = evaluate(path, p["cmr"], a.repeats, a.queries, a.seed, per_episode=a.paired)
                by_version[r["live_version"]] = {"dice": d, "dice_mean": mean_dice(d)}
        summaries[arm]["guard_right_at_each_check"] = [
            r["guard_accepts"] == (r["dice_mean"] > by_version[r["live_version"]]["dice_mean"]) for r in arm_rows[1:]
        ]
        summaries[arm]["judged_check_steps"] = [r["steps"] for r in arm_rows[1:]]
        summaries[arm]["paired"] = [paired(r["dice"], by_version[r["live_version"]].get("dice")) for r in arm_rows[1:]]
    sites |= {f"server_{s}": c for s, (c, _) in servers.items()}
    one = next(iter(sites)) if len(sites) == 1 else None
    summary = summaries[one] if one else summaries
    checks = all_checks[one] if one else all_checks
    val_curve = curves[one] if one else curves

    try:
        from monailabel_metaapp.provenance import stamp

        prov = stamp(weights)
    except ImportError:
        prov = None
    result = {
        "question": "1-shot cardiac Dice of an encoder meta-trained without cardiac images, before and after "
        "site adaptation on the cardiac images alone (labels unused); would the guard take the better one?",
        "settings": {"repeats": a.repeats, "queries": a.queries, "shots": 1, "protocol": "volume", "seed": a.seed,
                     "structures": CMR_STRUCTURES, "site_minutes": a.site_minutes, "check_minutes": a.check_minutes,
                     "base_minutes": a.base_minutes, "base_max_steps": a.base_steps, "ssl_tasks": a.ssl_tasks,
                     "base_sampler": a.base_sampler, "site_arms": {k: list(v) for k, v in arms.items()},
                     "evaluation_images": "the 35 MS-CMRSeg bSSFP volumes (the site's own images, as in the server)"},
        "commands": commands,
        "note": a.note,
        "summary": summary,
        "rows": rows,
        "checks": checks,
        "site_val_loss_curve": val_curve,
        "provenance": prov,
    }  # fmt: skip
    a.out.parent.mkdir(parents=True, exist_ok=True)
    Path(str(a.out) + ".json").write_text(json.dumps(result, indent=2))
    plot(rows, Path(str(a.out) + ".png"))
    print(json.dumps(summary, indent=2))


def mean_dice(dice: dict) -> float:
    """The mean over structures of an `evaluate` result."""
    return round(statistics.fmean(d["dice"] for d in dice.values()), 4)


def paired(candidate: dict, live: dict | None, alpha: float = 0.05) -> dict | None:
    """A guard decision's two encoders compared episode by episode (the same supports and queries for both,
    every structure pooled): the mean difference, the Wilcoxon signed-rank p-value, and `better`, `worse`
    or `level` at `alpha`. None when either lacks each episode's Dice (evaluated without --paired)."""
    if not live or not all("values" in d for d in [*candidate.values(), *live.values()]):
        return None
    from scipy.stats import wilcoxon

    diff = [c - b for s in candidate for c, b in zip(candidate[s]["values"], live[s]["values"], strict=True)]
    p_value = float(wilcoxon(diff).pvalue) if any(diff) else 1.0
    mean = statistics.fmean(diff)
    verdict = "level" if p_value >= alpha else ("better" if mean > 0 else "worse")
    return {"mean_difference": round(mean, 4), "p": round(p_value, 4), "n": len(diff), "candidate_is": verdict}


def summarise(rows: list[dict], checks: list[dict], base_meta: dict, against_base: bool = True) -> dict:
    """Base (rows[0]) against the last candidate of one site adaptation (rows[-1]); fills `dice_mean`.
    The guard's decisions are judged here only where it compared each candidate with the base (`against_base`:
    adapt-site); the server's guard compares with the live encoder, which a swap has replaced (judged by
    the caller)."""
    for r in rows:
        r["dice_mean"] = mean_dice(r["dice"])
    before, after = rows[0], rows[-1]
    rise = round(after["dice_mean"] - before["dice_mean"], 4)
    better = after["dice_mean"] > before["dice_mean"]
    guard_right = [r["guard_accepts"] == (r["dice_mean"] > before["dice_mean"]) for r in rows[1:]]
    summary = {
        "base_steps": base_meta.get("steps"),
        "base_minutes": base_meta.get("minutes"),
        "site_steps": after["steps"],
        "site_minutes": after["minutes"],
        "dice_before": before["dice"],
        "dice_after": after["dice"],
        "mean_before": before["dice_mean"],
        "mean_after": after["dice_mean"],
        "mean_rise": rise,
        "target_mean_rise_0.10": rise >= 0.10,
        "lv_blood_pool_after": after["dice"]["lv blood pool"]["dice"],
        "target_lv_blood_pool_0.60": after["dice"]["lv blood pool"]["dice"] >= 0.60,
        "final_check": checks[-1] if checks else None,
        "guard_took_the_better_encoder": checks[-1]["accepted"] == better if checks and against_base else None,
        "guard_right_at_each_check": guard_right if against_base else None,
    }
    if not against_base:  # the server: every check against the encoder live at the time
        summary["checks_accepted"] = [c["accepted"] for c in checks]
    if len(rows) >= 3:  # does the self-supervised loss rank the encoders as the Dice does?
        from scipy.stats import spearmanr

        rho = spearmanr([r["ssl_loss"] for r in rows], [r["dice_mean"] for r in rows]).statistic
        summary["spearman_ssl_loss_vs_dice"] = round(float(rho), 3)
    return summary


def plot(rows: list[dict], png: Path) -> None:
    """Mean Dice against minutes per arm; each structure's Dice, base against each arm's last encoder;
    the guard's self-supervised loss against the mean Dice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4))
    arms = list(dict.fromkeys(r["ssl_task"] for r in rows[1:]))
    last = {}
    for i, t in enumerate(arms):  # one line per arm, each from the base
        tr = [rows[0], *[r for r in rows[1:] if r["ssl_task"] == t]]
        ax1.plot([r["minutes"] for r in tr], [r["dice_mean"] for r in tr], marker="o", color=f"C{i}", label=t)
        last[t] = tr[-1]
    ax1.set_xlabel("minutes of site adaptation (0 = base encoder)")
    ax1.set_ylabel("mean 1-shot whole-volume Dice")
    ax1.set_ylim(0, 1)
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    x = np.arange(len(CMR_STRUCTURES))
    width = 0.8 / (len(arms) + 1)
    for i, (name, r) in enumerate([("base", rows[0]), *last.items()]):
        label = name if i == 0 else f"{name}, {r['minutes']:.0f} min"
        color = f"C{i - 1}" if i else "grey"
        ax2.bar(x + i * width, [r["dice"][s]["dice"] for s in CMR_STRUCTURES], width, color=color, label=label)
    ax2.axhline(0.60, ls=":", color="k", lw=1)
    ax2.set_xticks(x + width * len(arms) / 2, list(CMR_STRUCTURES), fontsize=8)
    ax2.set_ylabel("1-shot Dice")
    ax2.set_ylim(0, 1)
    ax2.legend(fontsize=7)
    # the server holds out other images (names differ) and compares with its live encoder: not on this scale
    scored = [r for r in rows if r["ssl_loss"] is not None and not str(r.get("ssl_task", "")).startswith("server")]
    ax3.scatter([r["ssl_loss"] for r in scored], [r["dice_mean"] for r in scored])
    for r in scored:
        name = f"{r['minutes']:.0f} min" + (f" {r['ssl_task']}" if r.get("ssl_task") and len(arms) > 1 else "")
        ax3.annotate(name, (r["ssl_loss"], r["dice_mean"]), fontsize=7)
    ax3.set_xlabel("guard's self-supervised validation loss (lower = better)")
    ax3.set_ylabel("mean Dice")
    ax3.grid(alpha=0.3)
    fig.suptitle("site adaptation on cardiac MRI, encoder meta-trained without cardiac images")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
