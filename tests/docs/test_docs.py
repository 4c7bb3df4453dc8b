"""The reference pages stay true to the code: the Python blocks of docs/callbacks.md and docs/ptq.md run, every
public name is on docs/api.md, every metric a callback logs by a literal name is on docs/callbacks.md, every Hydra
config key and group option is on docs/configuration.md. Fast: tiny models, no training."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def _python_blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), re.S)


def _tiny():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                        nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 3, 8, 8, generator=g), torch.randint(0, 3, (32,), generator=g))
    loader = DataLoader(data, batch_size=8)
    return {"net": net.eval(), "model": net.eval(), "calib_loader": loader, "test_loader": loader,
            "train_loader": loader, "augment": None}


@pytest.mark.parametrize("page", ["callbacks.md", "ptq.md"])
def test_the_python_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = _python_blocks(page)
    assert blocks, f"docs/{page} has no Python block"
    ns = _tiny()
    for i, code in enumerate(blocks):
        # the PTQ calls as printed, on 2 calibration batches of the tiny data (the pages show real settings)
        code = code.replace('bits=("w4a4",)', 'bits=("w4a4",), calib_batches=2, progress=False')
        exec(compile(code, f"docs/{page} block {i + 1}", "exec"), ns)  # noqa: S102 - the repository's own docs


def test_every_public_name_is_on_the_api_page():
    import flatq_lightning

    page = (DOCS / "api.md").read_text()
    missing = [n for n in flatq_lightning.__all__ if f"`{n}`" not in page]
    assert not missing, f"docs/api.md does not name {missing} (the 'Where to start' table)"


def test_every_metric_a_callback_logs_is_on_the_callbacks_page():
    page = (DOCS / "callbacks.md").read_text()
    sources = [*(ROOT / "flatq_lightning" / "callbacks").rglob("*.py"), ROOT / "flatq_lightning" / "ptq" / "callback.py"]
    names: set[str] = set()
    for path in sources:
        text = path.read_text()
        names |= set(re.findall(r"\.log\(\s*\"([^\"{}]+)\"", text))  # self.log("name", ...), pl_module.log(...)
        for block in re.findall(r"log_dict\(\s*\{(.*?)\}", text, re.S):
            names |= set(re.findall(r"\"([^\"{}]+)\"\s*:", block))
    assert {"dnq/kappa", "dnq/act_kappa", "sharpness/top_eig"} <= names, names  # the scan still finds them
    missing = sorted(n for n in names if f"`{n}`" not in page)
    assert not missing, f"docs/callbacks.md does not name the logged metrics {missing}"


def _keys(node, prefix=""):
    if isinstance(node, dict):
        for k, v in node.items():
            if k in ("defaults", "_target_") or str(k).startswith("_"):
                continue
            yield f"{prefix}{k}"
            yield from _keys(v, f"{prefix}{k}.")


def test_every_config_key_and_option_is_on_the_configuration_page():
    page = (DOCS / "configuration.md").read_text()
    conf = ROOT / "conf"
    missing = []
    for path in sorted(conf.rglob("*.yaml")):
        rel = path.relative_to(conf)
        group = str(rel.parent)
        if group not in (".", "quant/base") and f"`{path.stem}`" not in page:
            missing.append(f"option {group}={path.stem}")
        for key in _keys(yaml.safe_load(path.read_text()) or {}):
            leaf = key.rsplit(".", 1)[-1]
            # a key is named in backticks, alone or inside a dotted path / list of keys
            if not re.search(rf"`[^`\n]*\b{re.escape(leaf)}\b[^`\n]*`", page):
                missing.append(f"{rel}: {key}")
    assert not missing, f"docs/configuration.md does not name: {missing}"


def test_build_api_script_is_valid_bash():
    import subprocess

    script = DOCS / "build_api.sh"
    assert script.stat().st_mode & 0o111, "docs/build_api.sh is not executable"
    subprocess.run(["bash", "-n", str(script)], check=True)


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", ["README.md", *sorted(p.name for p in DOCS.glob("*.md"))])
def test_relative_links_and_anchors_resolve(page):
    path = ROOT / page if page == "README.md" else DOCS / page
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
        if re.match(r"[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            bad.append(target)
        elif anchor and dest.suffix == ".md":
            slugs = {_slug(h) for h in re.findall(r"^#+ (.+)$", dest.read_text(), re.M)}
            if anchor not in slugs:
                bad.append(target)
    assert not bad, f"{page}: links that do not resolve: {bad}"
