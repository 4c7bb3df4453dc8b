#!/usr/bin/env bash
# The API reference, generated from the docstrings with pdoc (https://pdoc.dev; `pip install pdoc`, tested with
# pdoc 16): HTML for every public module of flatq_lightning in docs/api/ (or the folder given as $1). The output is
# not committed (docs/.gitignore). Open docs/api/index.html, or serve it live with
#   pdoc --docformat google flatq_lightning        # http://localhost:8080, rebuilt on every change
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-docs/api}"
if ! python -c "import pdoc" 2>/dev/null; then
  echo "build_api.sh: pdoc is not installed: pip install pdoc" >&2
  exit 1
fi
# every module, not only the names in a package's __all__ (pdoc shows a package's submodules only when __all__
# lists them); private modules (a leading underscore) are left out
modules=$(python - <<'PY'
import pkgutil

import flatq_lightning

names = ["flatq_lightning"] + [m.name for m in pkgutil.walk_packages(flatq_lightning.__path__, "flatq_lightning.")]
print(" ".join(n for n in names if not any(part.startswith("_") for part in n.split(".")[1:])))
PY
)
# (a package listed with its submodules would add some twice: that notice is silenced)
# shellcheck disable=SC2086
python -W "ignore:The module specification" -m pdoc --docformat google --output-directory "$out" $modules
echo "API reference: $out/index.html ($(find "$out" -name '*.html' | wc -l) pages)"
