"""bench/run_all.py: every benchmark becomes rows of one Markdown table whose ratios and MFU are those of
the benchmarks' own JSON; a failing benchmark is a failed row and a non-zero exit, never a missing row.
The recorded GPU logs in docs/bench/ are parsed, and checked against the speed-ups those logs print."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.run_all import parse_inference_log, parse_mae_log  # noqa: E402

# bench/distill_gain.py's results.json, with AP values whose per-seed gains are 5, 4 and 6 points
DISTILL = {
    "plan": {"train_images": 64, "val_images": 8, "teacher_steps": 20, "student_steps": 12, "stage2_steps": 4,
             "backbone_steps": 6, "seeds": [0, 1, 2], "workers": 0},
    "device": "CPU test (2 threads)",
    "runs": {
        "teacher": {"AP": 0.5},
        **{f"baseline_s{s}": {"AP": ap} for s, ap in enumerate([0.30, 0.32, 0.34])},
        **{f"stage1_s{s}": {"AP": ap} for s, ap in enumerate([0.35, 0.36, 0.40])},
        **{f"stage2_s{s}": {"AP": ap} for s, ap in enumerate([0.31, 0.33, 0.35])},
        **{f"backbone_ft_s{s}": {"AP": ap} for s, ap in enumerate([0.29, 0.33, 0.34])},
    },
    "seconds": {},
}  # fmt: skip


def run_all(tmp_path: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    (tmp_path / "distill.json").write_text(json.dumps(DISTILL))
    cmd = [sys.executable, str(ROOT / "bench" / "run_all.py"), "--quick", "--out", str(tmp_path / "benchmarks.md"),
           "--json-dir", str(tmp_path / "json"), "--distill-results", str(tmp_path / "distill.json"), *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def table(path: Path) -> dict[str, dict[str, str]]:
    """The one Markdown table of `path`: {benchmark label: {column: cell}} (labels are unique)."""
    lines = [line for line in path.read_text().splitlines() if line.startswith("| ")]
    split = lambda line: [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]  # noqa: E731
    columns = split(lines[0])
    assert set(lines[1].replace("|", "").split()) == {"---"}
    rows = [dict(zip(columns, split(line))) for line in lines[2:]]
    by_label = {r["benchmark"]: r for r in rows}
    assert len(by_label) == len(rows), [r["benchmark"] for r in rows]
    return by_label


def number(cell: str) -> float:
    return float(cell.split()[0].replace(",", ""))


def assert_ratio(row: dict, ours: float, ref: float) -> None:
    assert number(row["ours"]) == pytest.approx(ours, rel=0.01), row
    assert number(row["reference"]) == pytest.approx(ref, rel=0.01), row
    assert float(row["ratio ours / ref"]) == pytest.approx(ours / ref, rel=0.005, abs=0.005), row


def assert_mfu(row: dict, ours: float, ref: float) -> None:
    a, b = (float(x.rstrip("%")) / 100 for x in row["MFU ours / ref"].split(" / "))
    assert (a, b) == (pytest.approx(ours, abs=6e-4), pytest.approx(ref, abs=6e-4)), row


@pytest.mark.slow
def test_quick_run_has_every_row(tmp_path):
    proc = run_all(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = table(tmp_path / "benchmarks.md")
    text = (tmp_path / "benchmarks.md").read_text()
    assert "--quick: tiny sizes" in text and f"torch {torch.__version__}" in text
    js = {
        n: json.loads((tmp_path / "json" / f"{n}.json").read_text())
        for n in ("data", "mae", "decode", "inference")
    }

    for size, r in js["data"]["sizes"].items():
        row = rows[f"data throughput, MAE crops {size}"]
        assert_ratio(row, r["ours_img_s"], r["reference_img_s"])
        assert row["MFU ours / ref"] == "n/a" and row["device"] == js["data"]["device"]
        decoders = {k: v for k, v in r["decoders_img_s"].items() if k != "ours: PIL+cv2"}
        best = max(decoders, key=decoders.get)
        row = rows[f"JPEG decode + crop to {size}: ours (PIL + cv2) vs fastest other ({best})"]
        assert_ratio(row, r["decoders_img_s"]["ours: PIL+cv2"], decoders[best])

    mae = js["mae"]["rows"]
    row = rows["MAE training vit_test, ours vs transformers ViTMAE"]
    assert_ratio(row, mae["ours"]["img_s"], mae["transformers"]["img_s"])
    assert_mfu(row, mae["ours"]["mfu"], mae["transformers"]["mfu"])

    ms = js["decode"]["decode"]["ms_per_person"]
    for ref, what in (("mmpose", "mmpose DARK-UDP loop (numpy + cv2)"),
                      ("transformers", "transformers post_process_pose_estimation")):  # fmt: skip
        row = rows[f"post-processing: decode 17 keypoints, fp32, vs {what}"]
        assert_ratio(row, 1e3 / ms["ours fp32"], 1e3 / ms[ref])

    inference = js["inference"]["e2e"]["archs"]["vit_test"]["rows"]
    for part in ("e2e", "model"):
        row = rows[f"pose inference {part} vit_test, ours vs transformers VitPose"]
        ours, ref = inference[f"ours {part}"], inference[f"transformers {part}"]
        assert_ratio(row, ours["img_s"], ref["img_s"])
        assert_mfu(row, ours["mfu"], ref["mfu"])

    teacher = rows["distillation: teacher AP (128x96, 128 wide, 4 blocks)"]
    assert teacher["ours"] == "50.0 AP"
    stage1 = rows[
        "distillation gain: student stage 1 vs ground-truth baseline (student of configs/distill/tiny_cpu_coco17.yaml)"
    ]
    assert stage1["reference"] == "32.0 ± 2.0 (30.0..34.0) AP"
    assert stage1["ours"] == "37.0 ± 2.6 (35.0..40.0) AP"
    assert stage1["ratio ours / ref"] == "gain 5.0 ± 1.0 (4.0..6.0)"
    for label in ("stage 1 + 2", "distilled backbone + FT"):
        assert (
            f"distillation gain: student {label} vs ground-truth baseline (student of configs/distill/tiny_cpu_coco17.yaml)"
            in rows
        )

    if not torch.cuda.is_available():  # the GPU rows: recorded from docs/bench/, or named as not measured yet
        recorded = [r for label, r in rows.items() if "[recorded: " in label]
        assert all(
            re.search(r"recorded in docs/bench/(inference|mae)_", r["settings, notes"]) for r in recorded
        )
        assert not [label for label in rows if "[not measured]" in label and "(GPU)" in label]
        mae = (ROOT / "docs/bench/mae_h200_compiled.txt").read_text()
        speedup = re.search(r"speed-up ours\+compile / transformers\+compile: ([\d.]+)x", mae)[1]
        row = rows["MAE training sapiens_0.3b, ours+compile vs transformers+compile ViTMAE (GPU) "
                   "[recorded: mae_h200_compiled.txt]"]  # fmt: skip
        assert float(row["ratio ours / ref"]) == pytest.approx(float(speedup), abs=0.006)
        largest = rows[
            "largest MAE training batch in 79.1 GiB, sapiens_2b (GPU) [recorded: mae_h200_largest.txt]"
        ]
        assert largest["ours"].startswith("batch 64+") and largest["device"] == "NVIDIA H200", largest
        e2e = (ROOT / "docs/bench/inference_h200_e2e.txt").read_text()
        speedups = re.findall(r"speed-up ours / transformers \((e2e|model)\): ([\d.]+)x", e2e)
        labels = [f"pose inference {part} {arch}, ours vs transformers VitPose (GPU) [recorded: inference_h200_e2e.txt]"
                  for arch in ("sapiens_0.3b", "sapiens_1b") for part in ("e2e", "model")]  # fmt: skip
        assert [part for part, _ in speedups] == ["e2e", "model", "e2e", "model"]
        for (_, speedup), label in zip(speedups, labels):
            assert float(rows[label]["ratio ours / ref"]) == pytest.approx(
                float(speedup), rel=2e-3, abs=0.006
            )
            assert rows[label]["device"] == "NVIDIA H200"
        assert any("[recorded: inference_h200_decode.txt]" in label for label in rows)

    # --reuse: the same table again from the JSON left in --json-dir, without running anything
    (tmp_path / "json" / "mae.json").write_text(json.dumps({**js["mae"], "arch": "vit_reused"}))
    again = run_all(tmp_path, "--reuse", "--out", str(tmp_path / "again.md"), timeout=120)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    reused = table(tmp_path / "again.md")
    assert "MAE training vit_reused, ours vs transformers ViTMAE" in reused
    assert (
        reused["pose inference e2e vit_test, ours vs transformers VitPose"]
        == rows["pose inference e2e vit_test, ours vs transformers VitPose"]
    )
    assert "inference reused from" in (tmp_path / "again.md").read_text()


@pytest.mark.slow
def test_failing_benchmark_is_a_failed_row(tmp_path):
    proc = run_all(tmp_path, "--skip", "data", "decode", "inference", "--args", "mae=--arch no_such_arch")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = table(tmp_path / "benchmarks.md")
    failed = rows["MAE training [failed]"]
    assert failed["ours"] == "failed" and "exit 1" in failed["settings, notes"], failed
    assert "--arch no_such_arch" in failed["settings, notes"]
    assert "no_such_arch" in (tmp_path / "json" / "mae.log").read_text()
    # the others are still there: skipped benchmarks named, the distillation rows read from the file
    assert rows["data throughput [not measured]"]["ours"] == "skipped"
    assert "distillation: teacher AP (128x96, 128 wide, 4 blocks)" in rows
    assert "1 failed row" in (tmp_path / "benchmarks.md").read_text()


@pytest.mark.slow
def test_gpu_configurations_dry_run(tmp_path, monkeypatch):
    """SAPIENS_GPU_CHECK_DRY (as for bench/gpu_check.sh): the GPU configurations run on the CPU at tiny sizes
    in fp32, so that their arguments and rows are checked before a lent GPU's minutes are spent (compiled
    ones aside: compiling takes minutes on a CPU)."""
    monkeypatch.setenv("SAPIENS_GPU_CHECK_DRY", "1")
    proc = run_all(tmp_path, "--skip", "cpu", "mae_gpu_compile", "inference_gpu_compile")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = table(tmp_path / "benchmarks.md")
    mae = json.loads((tmp_path / "json" / "mae_gpu.json").read_text())
    assert (
        "--dtype bf16" in rows["MAE training vit_test, ours vs transformers ViTMAE (GPU)"]["settings, notes"]
    )
    row = rows["MAE training vit_test, ours vs transformers ViTMAE (GPU)"]
    assert_ratio(row, mae["rows"]["ours"]["img_s"], mae["rows"]["transformers"]["img_s"])
    assert_mfu(row, mae["rows"]["ours"]["mfu"], mae["rows"]["transformers"]["mfu"])
    inference = json.loads((tmp_path / "json" / "inference_gpu.json").read_text())["e2e"]
    for part in ("e2e", "model"):
        r = inference["archs"]["vit_test"]["rows"]
        row = rows[f"pose inference {part} vit_test, ours vs transformers VitPose (GPU)"]
        assert_ratio(row, r[f"ours {part}"]["img_s"], r[f"transformers {part}"]["img_s"])
    assert "post-processing: decode 17 keypoints, fp32, vs mmpose DARK-UDP loop (numpy + cv2) (GPU)" in rows
    largest = json.loads((tmp_path / "json" / "largest_gpu.json").read_text())
    assert [(r["arch"], r["batch"], r["capped"]) for r in largest["rows"]] == [
        ("vit_test", 2, True),
        ("vit_tiny", 2, True),
    ]
    row = rows["largest MAE training batch in 79.1 GiB, vit_tiny (GPU)"]
    assert row["ours"].startswith("batch 2+ (every batch tried fitted)"), row
    mfu_ours = float(row["MFU ours / ref"].split(" / ")[0].rstrip("%")) / 100
    assert mfu_ours == pytest.approx(largest["rows"][1]["mfu"], abs=6e-4)
    # measured in this run, so no recorded eager or decode rows; the compiled ones (skipped) stay recorded
    recorded = [label for label in rows if "[recorded: " in label]
    assert recorded and all("+compile" in label for label in recorded), recorded


def test_parse_recorded_log_matches_its_printed_speedups():
    """Every recorded log: the parsed figures give the speed-ups that the log itself printed (those come
    from unrounded img/s, hence the tolerance)."""
    pattern = r"speed-up ours(\+compile)? / transformers(?:\+compile)? \((e2e|model)\): ([\d.]+)x"
    for path in sorted((ROOT / "docs" / "bench").glob("inference_*.txt")):
        text = path.read_text()
        js = parse_inference_log(text)
        assert "decode" in js or "e2e" in js, path
        parsed = []
        for block in (js.get("e2e") or {}).get("archs", {}).values():
            for suffix in ("", "+compile"):
                for part in ("e2e", "model"):
                    ours, ref = (
                        block["rows"].get(f"ours{suffix} {part}"),
                        block["rows"].get(f"transformers{suffix} {part}"),
                    )
                    if ours and ref:
                        parsed.append((suffix, part, ours["img_s"] / ref["img_s"]))
        printed = re.findall(pattern, text)
        assert [(s, p) for s, p, _ in parsed] == [(s, p) for s, p, _ in printed], path
        for (_, _, ratio), (_, _, speedup) in zip(parsed, printed):
            assert ratio == pytest.approx(float(speedup), rel=2e-3, abs=0.006), path
        if "decode" in js:
            ms = js["decode"]["ms_per_person"]
            assert {"ours fp32", "ours bf16", "mmpose", "transformers"} <= set(ms), ms


def test_parse_recorded_mae_logs():
    """docs/bench/mae_*.txt: the parsed MAE figures give the speed-ups the logs printed; the largest-batch
    table is read row by row, batches at --max-batch marked as capped (the log's first line names it)."""
    pattern = r"speed-up ours(\+compile)? / transformers(?:\+compile)?: ([\d.]+)x"
    paths = sorted((ROOT / "docs" / "bench").glob("mae_*.txt"))
    assert {p.name for p in paths} >= {"mae_h200_eager.txt", "mae_h200_compiled.txt", "mae_h200_largest.txt"}
    for path in paths:
        text = path.read_text()
        js = parse_mae_log(text)
        if js["benchmark"] == "mae_training":
            printed = re.findall(pattern, text)
            assert printed, path
            for suffix, speedup in printed:
                ratio = js["rows"]["ours" + suffix]["img_s"] / js["rows"]["transformers" + suffix]["img_s"]
                assert ratio == pytest.approx(float(speedup), abs=0.006), path
            assert js["flops_per_image"] > 0 and js["peak_tflops"] > 0
        else:
            table_lines = [line.split() for line in text.splitlines() if line.startswith("sapiens_")]
            assert [(r["arch"], r["batch"]) for r in js["rows"]] == [
                (a, int(b.rstrip("+"))) for a, b, *_ in table_lines
            ]
            assert all(r["capped"] == (r["batch"] == js["max_batch"]) for r in js["rows"]), js
