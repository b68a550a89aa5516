"""Fetch uv onto a fresh machine: its wheel from the package index, digest checked.

Run by the boot script with the image's own ``python3`` (standard library only, Python
3.6+), because a cloud image has Python (cloud-init is written in it) but often no pip
and no venv module.  No installer script is downloaded and run: the wheel's digest comes
from the index's own listing (PEP 691 JSON), and only the ``uv`` binary is taken out.

Usage: ``python3 fetch_uv.py VERSION DEST_DIR`` (``PIP_INDEX_URL`` picks another index).
"""

import hashlib
import io
import json
import os
import platform
import sys
import time
import urllib.parse
import urllib.request
import zipfile

ARCHES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}


def fetch(url, accept=None, tries=5):
    headers = {"Accept": accept} if accept else {}
    for attempt in range(tries):
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                        timeout=60) as response:
                return response.read()
        except OSError as exc:
            if attempt == tries - 1:
                raise
            sys.stderr.write(f"fetch_uv: {url}: {exc}; retrying\n")
            time.sleep(2 ** attempt)


def pick(files, version):
    arch = ARCHES.get(platform.machine().lower())
    libc = "manylinux" if platform.libc_ver()[0] == "glibc" else "musllinux"
    prefix = f"uv-{version}-py3-none-"
    for entry in files:
        name = entry["filename"]
        if name.startswith(prefix) and name.endswith(".whl") and libc in name \
                and arch is not None and name.endswith(f"_{arch}.whl"):
            return entry
    raise SystemExit(f"fetch_uv: the index has no uv {version} wheel for {libc} "
                     f"{platform.machine()}")


def main():
    version, dest = sys.argv[1], sys.argv[2]
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/") + "/uv/"
    listing = json.loads(fetch(index, "application/vnd.pypi.simple.v1+json").decode())
    entry = pick(listing["files"], version)
    wheel = fetch(urllib.parse.urljoin(index, entry["url"]))
    digest = hashlib.sha256(wheel).hexdigest()
    if digest != entry["hashes"]["sha256"]:
        expected = entry["hashes"]["sha256"]
        raise SystemExit(f"fetch_uv: {entry['filename']} has sha256 {digest}, "
                         f"the index says {expected}")
    with zipfile.ZipFile(io.BytesIO(wheel)) as archive:
        member = next(n for n in archive.namelist() if n.endswith(".data/scripts/uv"))
        binary = archive.read(member)
    os.makedirs(dest, exist_ok=True)
    target = os.path.join(dest, "uv")
    with open(target + ".tmp", "wb") as fh:
        fh.write(binary)
    os.chmod(target + ".tmp", 0o755)
    os.replace(target + ".tmp", target)
    print("fetch_uv: uv {} from {}".format(version, entry["filename"]))


if __name__ == "__main__":
    main()
