#!/usr/bin/env bash
# Make fx_offload importable, with its Dynamo backends registered, on a machine with no network
# (the lent GPU machine): source this from the repository root. Carried wheels in .whl/ (the
# benchmark's peers: diffusers and what it needs) are installed beside it.
site=/tmp/fx_offload_site
mkdir -p "$site/fx_offload-0.1.0.dist-info"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
fi
printf 'Metadata-Version: 2.1\nName: fx_offload\nVersion: 0.1.0\n' > "$site/fx_offload-0.1.0.dist-info/METADATA"
python3 - "$site" <<'PY'
import sys, tomllib
points = tomllib.load(open("pyproject.toml", "rb"))["project"]["entry-points"]
with open(f"{sys.argv[1]}/fx_offload-0.1.0.dist-info/entry_points.txt", "w") as f:
    for group, entries in points.items():
        f.write(f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in entries.items()))
PY
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
