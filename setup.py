"""Build hook: ship the top-level ``conf/`` Hydra configs inside the package as ``flatq_lightning/conf``.

The configs stay at the repository root (``flatq-train`` reads them from there in a checkout or an editable
install); a wheel has no repository root, so ``build_py`` copies them into the built package, where
``flatq_lightning.app.train`` looks next. Everything else is declared in ``pyproject.toml``.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithConfigs(build_py):
    def run(self) -> None:
        super().run()
        src = ROOT / "conf"
        dst = Path(self.build_lib) / "flatq_lightning" / "conf"
        files = sorted(src.rglob("*.yaml"))
        if not files:
            raise RuntimeError(f"no Hydra configs under {src}: the wheel would ship a flatq-train without them")
        for f in files:
            target = dst / f.relative_to(src)
            self.mkpath(str(target.parent))
            self.copy_file(str(f), str(target))


setup(cmdclass={"build_py": BuildPyWithConfigs})
