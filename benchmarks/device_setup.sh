#!/usr/bin/env bash
# Make the package importable on an offline GPU machine from a checkout, without pip's network:
# source this from the repository root (`source benchmarks/device_setup.sh`). It writes a minimal
# dist-info for fx_offload (so torch finds the offload_inductor / offload_eager backends through
# their entry points) under /tmp/fx_offload_site, installs any wheels found in .whl/ there (the
# benchmark's peers and test needs: diffusers, importlib_metadata, zipp, pytest, ...), and puts
# that folder and the checkout on PYTHONPATH. Uses the machine's own python3 and torch.
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
