"""`sapiens info`: versions, device, arch table with parameter counts and GFLOPs; fast and import-light."""

from __future__ import annotations

import re
import subprocess
import sys

from sapiens_lite.cli import main
from sapiens_lite.flops import count_params, forward_flops
from sapiens_lite.models.vit import ARCHS


def run_info(capsys, *args) -> str:
    assert main(["info", *args]) == 0
    return capsys.readouterr().out


def test_info_reports_versions_device_and_every_arch(capsys):
    import torch

    out = run_info(capsys)
    for name in ("sapiens-toolkit", "python", "torch", "timm", "safetensors", "huggingface_hub", "numpy"):
        assert re.search(rf"^{re.escape(name)}\s+\S", out, re.M), name
    assert re.search(rf"^torch\s+{re.escape(torch.__version__.split('+')[0])}", out, re.M)
    for name in ("deepspeed", "webdataset", "pycocotools"):
        assert re.search(rf"^{name}\s+(\d[\w.+]*|not installed)\s+\(training extra\)", out, re.M), name
    assert re.search(r"^device\s+(cuda: \d+ x .+|CPU \(\d+ threads\))$", out, re.M)
    assert "1024x768" in out

    rows = {
        m.group(1): m.groups()[1:]
        for m in re.finditer(r"^(\S+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\S+)\s+([\d.]+)$", out, re.M)
    }
    assert list(rows) == list(ARCHS)
    for arch, (dim, depth, heads, params, gflops) in rows.items():
        assert (int(dim), int(depth), int(heads)) == tuple(
            ARCHS[arch][k] for k in ("embed_dim", "depth", "num_heads")
        )
        n = count_params(arch)
        assert params == (f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.1f}M")
        assert float(gflops) == round(forward_flops(arch, (1024, 768)) / 1e9, 1)
    assert rows["sapiens_0.3b"][3] == "306.2M" and rows["sapiens_2b"][3] == "2.132B"


def test_info_img_size_option(capsys):
    out = run_info(capsys, "--img-size", "512", "384")
    assert "512x384" in out
    gflops = re.search(r"^sapiens_1b\s.*\s([\d.]+)$", out, re.M).group(1)
    assert float(gflops) == round(forward_flops("sapiens_1b", (512, 384)) / 1e9, 1)


def test_info_rejects_a_size_that_is_not_a_multiple_of_16(capsys):
    assert main(["info", "--img-size", "1000", "768"]) == 2
    assert "--img-size" in capsys.readouterr().err


def test_info_is_fast_and_imports_no_training_or_heavy_modules():
    """A fresh process: `sapiens info` imports neither the training extras nor timm/transformers.

    Its own work takes well under a second; the rest of its < 3 s is Python + `import torch`
    (about 1.5 s on an idle machine; timed separately so a busy CI machine does not make this flaky).
    """
    code = (
        "import sys, time; t0 = time.perf_counter()\n"
        "import torch; t1 = time.perf_counter()\n"
        "from sapiens_lite.cli import main\n"
        "assert main(['info']) == 0\n"
        "print('TIMES', t1 - t0, time.perf_counter() - t1)\n"
        "print('LOADED', sorted(m for m in ('deepspeed', 'webdataset', 'pycocotools', 'timm', 'transformers')"
        " if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert "LOADED []" in out
    torch_import, info = map(float, re.search(r"TIMES (\S+) (\S+)", out).groups())
    assert info < 1.0, (torch_import, info)
