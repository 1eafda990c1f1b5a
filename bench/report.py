"""Results of a benchmark session: the environment header, the ratio table, the markdown file and the plots.

Every time is compared with the floor and the naive path *measured in the same process*, on the same case,
using the fastest round of each (a shared machine's other processes only add time; medians are shown too):
``vs floor`` divides by the floor of the same shape, dtype and mode (the floor does not depend on K);
``vs naive`` by the naive reference with the same K. An absolute time is only meaningful with the hardware
named in the header.

``python -m bench.report bench/results/<machine>/records.json`` rebuilds ``results.md`` and the plots.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_ROOT = REPO_ROOT / "bench" / "results"

# Order of the contenders in tables and plot legends.
CONTENDER_ORDER = ("floor", "sdpo_triton", "sdpo_torch", "trl_chunked", "liger_fused_jsd", "naive")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_slug() -> str:
    """``bench/results/<machine>``: the GPU name on CUDA, else the CPU name and core count."""
    import torch

    if torch.cuda.is_available():
        return _slug(torch.cuda.get_device_name())
    return f"cpu-{_slug(cpu_name())}-{os.cpu_count()}c"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def command_line() -> str:
    """The command that produced a result, ``python -m <module>`` style where it was run that way."""
    script = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    args = sys.argv[1:]
    if script is not None and script.name == "__main__.py":
        head = ["python", "-m", script.parent.name]
    elif script is not None and script.suffix == ".py" and script.resolve().parent == REPO_ROOT / "bench":
        head = ["python", "-m", f"bench.{script.stem}"]
    else:
        head = ["python", *sys.argv[:1]]
    return " ".join([*head, *args])


def environment() -> dict:
    """Hardware, versions, commit and date: the header of every result file."""
    import torch

    commit = _git("rev-parse", "--short", "HEAD") or "no commit"
    if _git("status", "--porcelain", "--untracked-files=no"):
        commit += " (+ uncommitted changes)"
    return {
        "machine": machine_slug(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cpu": cpu_name(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # Other processes share the cores on a CI or dev machine: a high load makes CPU timings noisy.
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "trl": _version("trl"),
        "transformers": _version("transformers"),
        "liger_kernel": _version("liger-kernel"),
        "commit": commit,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command_line(),
    }


def header_markdown(env: dict, title: str) -> str:
    device = env["gpu"] or f"CPU only: {env['cpu']} ({env['cpu_cores']} cores, {env['torch_threads']} torch threads)"
    load = env.get("load_average_1min")
    versions = ", ".join(
        f"{name} {env[key]}"
        for name, key in (
            ("torch", "torch"),
            ("CUDA", "cuda"),
            ("triton", "triton"),
            ("trl", "trl"),
            ("transformers", "transformers"),
            ("liger-kernel", "liger_kernel"),
        )
        if env.get(key)
    )
    return "\n".join(
        [
            f"# {title}",
            "",
            f"- Device: {device}"
            + (f"; CPU {env['cpu']}" if env["gpu"] else "")
            + (f"; 1-min load average when written: {load}" if load is not None else ""),
            f"- Versions: Python {env['python']}, {versions}",
            f"- Commit: {env['commit']}; date: {env['date']}",
            f"- Command: `{env['command']}`",
            "",
        ]
    )


# --- the ratio table ------------------------------------------------------------------------------------


def format_bytes(value: float | None) -> str:
    if value is None:
        return "n/a"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(value) >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value:.0f} B"


def format_seconds(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value >= 1.0:
        return f"{value:.3f} s"
    if value >= 1e-3:
        return f"{value * 1e3:.2f} ms"
    return f"{value * 1e6:.1f} us"


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return a / b


def _fmt_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _case_key(record: dict, with_topk: bool) -> tuple:
    key = (record["test"], record["n"], record["h"], record["v"], record["dtype"], record["mode"])
    return (*key, record["topk"]) if with_topk else key


def add_ratios(records: list[dict]) -> list[dict]:
    """Fill ``time_vs_floor``, ``time_vs_naive`` and ``memory_vs_naive`` from records of the same session."""
    floors = {_case_key(r, False): r for r in records if r["contender"] == "floor" and r.get("time_s")}
    naives = {_case_key(r, True): r for r in records if r["contender"] == "naive"}
    for record in records:
        floor = floors.get(_case_key(record, False))
        naive = naives.get(_case_key(record, True))
        record["time_vs_floor"] = _ratio(record.get("time_s"), floor and floor.get("time_s"))
        record["time_vs_naive"] = _ratio(record.get("time_s"), naive and naive.get("time_s"))
        record["memory_vs_naive"] = _ratio(record.get("extra_bytes"), naive and naive.get("extra_bytes"))
    return records


def _sort_key(record: dict) -> tuple:
    order = CONTENDER_ORDER.index(record["contender"]) if record["contender"] in CONTENDER_ORDER else 99
    topk = -1 if record["topk"] is None else record["topk"]
    return (record["test"], record["h"], record["v"], record["n"], record["dtype"], record["mode"], topk, order)


TABLE_COLUMNS = (
    "case",
    "K",
    "contender",
    "time (min)",
    "median",
    "vs floor",
    "vs naive",
    "extra memory",
    "memory vs naive",
    "note",
)


def table_rows(records: Iterable[dict]) -> list[list[str]]:
    rows = []
    for r in sorted(records, key=_sort_key):
        case = f"{r['shape']} N={r['n']} H={r['h']} V={r['v']} {r['dtype']} {r['mode']}"
        note = r.get("note") or ""
        if r.get("status") != "ok":
            note = f"{r.get('status')}: {r.get('reason', '')}".strip()
        rows.append(
            [
                case,
                "full" if r["topk"] is None else str(r["topk"]),
                r["contender"],
                format_seconds(r.get("time_s")),
                format_seconds(r.get("time_median_s")),
                _fmt_ratio(r.get("time_vs_floor")),
                _fmt_ratio(r.get("time_vs_naive")),
                format_bytes(r.get("extra_bytes")),
                _fmt_ratio(r.get("memory_vs_naive")),
                note,
            ]
        )
    return rows


def markdown_table(columns: Iterable[str], rows: list[list[str]]) -> str:
    columns = list(columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(columns: Iterable[str], rows: list[list[str]]) -> str:
    columns = list(columns)
    widths = [max(len(str(c)), *(len(row[i]) for row in rows)) if rows else len(c) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))
    out = [line, "-" * len(line)]
    out += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(out)


TEST_TITLES = {
    "loss": "Loss: forward+backward per contender",
    "scaling_n": "Scaling with N (tokens)",
    "scaling_v": "Scaling with V (vocabulary)",
}


def summary_text(records: list[dict]) -> str:
    parts = []
    for test, title in TEST_TITLES.items():
        chosen = [r for r in records if r["test"] == test]
        if chosen:
            parts += [f"== {title} ==", text_table(TABLE_COLUMNS, table_rows(chosen)), ""]
    e2e = [r for r in records if r["test"] == "e2e"]
    if e2e:
        parts += ["== End to end: one SDPO training step (loss fwd+bwd, generation excluded) ==", e2e_text(e2e), ""]
    return "\n".join(parts)


E2E_COLUMNS = (
    "trainer",
    "batch",
    "time (min)",
    "median",
    "vs TRL",
    "vs TRL, interleaved",
    "peak memory of the step",
    "memory vs TRL",
    "note",
)


def e2e_rows(records: list[dict]) -> list[list[str]]:
    trl = next((r for r in records if r["contender"] == "trl_sdpo_trainer"), None)
    rows = []
    for r in records:
        note = r.get("note") or ""
        if r.get("status") != "ok":
            note = f"{r.get('status')}: {r.get('reason', '')}".strip()
        rows.append(
            [
                r["contender"],
                r.get("batch", ""),
                format_seconds(r.get("time_s")),
                format_seconds(r.get("time_median_s")),
                _fmt_ratio(_ratio(r.get("time_s"), trl and trl.get("time_s"))),
                _fmt_ratio(1.0 if r is trl else r.get("time_vs_trl_interleaved")),
                format_bytes(r.get("extra_bytes")),
                _fmt_ratio(_ratio(r.get("extra_bytes"), trl and trl.get("extra_bytes"))),
                note,
            ]
        )
    return rows


def e2e_text(records: list[dict]) -> str:
    return text_table(E2E_COLUMNS, e2e_rows(records))


# --- files ----------------------------------------------------------------------------------------------


def plot_scaling(records: list[dict], out_dir: Path) -> list[Path]:
    """``scaling_n.png`` and ``scaling_v.png``: time and extra memory per contender, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for test, axis, label in (("scaling_n", "n", "N (tokens)"), ("scaling_v", "v", "V (vocabulary)")):
        chosen = [r for r in records if r["test"] == test and r.get("status") == "ok"]
        if not chosen:
            continue
        fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4.2))
        contenders = sorted({r["contender"] for r in chosen}, key=lambda c: (c not in CONTENDER_ORDER, c))
        for contender in contenders:
            points = sorted((r for r in chosen if r["contender"] == contender), key=lambda r: r[axis])
            xs = [r[axis] for r in points]
            times = [r.get("time_s") for r in points]
            mems = [r.get("extra_bytes") for r in points]
            if any(t is not None for t in times):
                ax_time.plot(xs, [t if t is not None else float("nan") for t in times], "o-", label=contender)
            if any(m is not None for m in mems):
                ax_mem.plot(xs, [m / 2**20 if m is not None else float("nan") for m in mems], "o-", label=contender)
        fixed = chosen[0]
        others = ", ".join(f"{k.upper()}={fixed[k]}" for k in ("n", "h", "v") if k != axis)
        k_label = "full vocab" if fixed["topk"] is None else f"K={fixed['topk']}"
        for ax, ylabel in ((ax_time, "fwd+bwd time (s, fastest round)"), (ax_mem, "extra peak memory (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(label)
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"SDPO loss vs {label}: {others}, {k_label}, {fixed['dtype']}")
        fig.tight_layout()
        path = out_dir / f"{test}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def results_markdown(
    records: list[dict], env: dict, profile: str, plots: list[Path], companions: Iterable[Path] = ()
) -> str:
    parts = [header_markdown(env, f"sdpo_ops benchmarks: {env['machine']} (profile `{profile}`)")]
    parts.append(
        "Ratios are measured in the same process, on the fastest round (other processes on a shared machine "
        "only add time; the median is shown beside it): `vs floor` divides by the bare GEMMs (student and teacher "
        "logits, dH, dW; `torch.mm` on the same token chunks) of the same shape, `vs naive` by the "
        "materialising reference (what the official SDPO and TRL's `SDPOTrainer` compute) with the same K. "
        "Extra memory = peak during the call minus the inputs minus the returned gradients "
        "(CPU: peak RSS of a fresh subprocess; CUDA: `max_memory_allocated`). Loss options: tail bucket, "
        "alpha 0.5, IS clip 2 with old log-probs, 10% of tokens masked, token-mean.\n"
    )
    if not env.get("gpu"):
        parts.append(
            "On a shared CPU machine the speed changes by up to several times between seconds (other processes; "
            "see the load average above), and each benchmark's rounds run back to back: time ratios between "
            "separate benchmarks here are indicative only. The memory figures are stable. For CPU time ratios "
            "use the interleaved measurements: `cpu_ratio.md` and the end-to-end `vs TRL, interleaved` column.\n"
        )
    for test, title in TEST_TITLES.items():
        chosen = [r for r in records if r["test"] == test]
        if chosen:
            parts += [f"## {title}", "", markdown_table(TABLE_COLUMNS, table_rows(chosen)), ""]
            for plot in plots:
                if plot.stem == test:
                    parts += [f"![{title}]({plot.name})", ""]
    e2e = [r for r in records if r["test"] == "e2e"]
    if e2e:
        parts += [
            "## End to end: one SDPO training step",
            "",
            "The loss forward+backward of one step (student and teacher model forwards included, generation "
            'excluded) on the same tiny model and batch, `distillation_mode="topk_logits"`, K=100, tail, '
            "alpha 0.5, IS on. `vs TRL`: fastest rounds of the two benchmarks; `vs TRL, interleaved`: fastest of "
            "rounds that alternate the two steps (robust to a shared machine's changes of speed). Memory: peak RSS "
            "of the step in a fresh subprocess beyond the baseline before it.",
            "",
            markdown_table(E2E_COLUMNS, e2e_rows(e2e)),
            "",
        ]
    parts.append("Raw pytest-benchmark data: `benchmark.json`; every record with its ratios: `records.json`.")
    for companion in companions:
        parts.append(f"Acceptance measurement, run separately: [{companion.name}]({companion.name}).")
    parts.append("")
    return "\n".join(parts)


def write_results(records: list[dict], env: dict, profile: str, out_dir: Path) -> list[Path]:
    """Write ``records.json``, ``results.md`` and the plots into ``out_dir``; return the written paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    add_ratios(records)
    plots = plot_scaling(records, out_dir)
    records_path = out_dir / "records.json"
    records_path.write_text(json.dumps({"environment": env, "profile": profile, "records": records}, indent=2))
    md_path = out_dir / "results.md"
    companions = [out_dir / name for name in ("cpu_ratio.md", "gpu_targets.md") if (out_dir / name).is_file()]
    md_path.write_text(results_markdown(records, env, profile, plots, companions))
    return [records_path, md_path, *plots]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m bench.report bench/results/<machine>/records.json", file=sys.stderr)
        return 2
    path = Path(argv[0])
    data = json.loads(path.read_text())
    for written in write_results(data["records"], data["environment"], data["profile"], path.parent):
        print(written)
    return 0


if __name__ == "__main__":
    sys.exit(main())
