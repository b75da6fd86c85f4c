#!/usr/bin/env python3
"""Build kubevmm's container images as OCI image tarballs, without a container
engine, deterministically; optionally import them into containerd.

Usage (from anywhere; paths default relative to the repository):

    images/build.py [--bin-dir DIR] [--out DIR] [--tag TAG]
                    [--pause-src FILE] [--nft FILE]
                    [--import [--containerd-address SOCK] [--namespace NS]
                              [--snapshotter NAME]]
                    [operator | node-vmm | pause | all ...]

Targets (default: operator node-vmm):

    operator  ghcr.io/kubevmm/operator:TAG   /usr/local/bin/kubevmm-operator,
              its shared libraries (ldd), /etc/passwd and /etc/group with the
              `nonroot` user 65532, CA certificates, /tmp; runs as 65532:65532.
    node-vmm  ghcr.io/kubevmm/node-vmm:TAG   /usr/local/bin/node-vmm and
              kubevmm-vmm, the host's nft (/usr/sbin/nft, the agent's NAT and
              anti-spoofing rules), the shared libraries of all three, CA
              certificates, /etc/protocols and /etc/services, /tmp, /run,
              /var/run -> /run; runs as root, `node-vmm agent`.
    pause     registry.k8s.io/pause:3.10     /pause, compiled from Kubernetes'
              build/pause/linux/pause.c (gcc -Os -static, stripped); the
              kubelet's sandbox image where nothing can be pulled.
    all       the three.

TAG defaults to appVersion in charts/kubevmm/Chart.yaml, which is the tag the
chart uses when operator.image.tag / nodeVmm.image.tag are empty
(templates/_helpers.tpl).  The binaries come from --bin-dir (default
$CARGO_TARGET_DIR/release, else <repo>/target/release); build them with

    cargo build --release -p node-vmm -p kubevmm-vmm -p kubevmm-operator

Output: --out (default $CARGO_TARGET_DIR/images, else <repo>/target/images)
gets operator.oci.tar, node-vmm.oci.tar, pause.oci.tar: OCI image layouts
(oci-layout, index.json, blobs/sha256/...) with one gzip layer each.  For each
image the script prints the tarball's path, the image reference, the manifest
digest and the size.

Determinism: the same inputs (binaries, host libraries and files, tag) give
byte-identical tarballs: entries sorted, uid/gid 0 (but /home/nonroot, owned
by 65532), empty user/group names, fixed modes, mtime and the config's
`created` = $SOURCE_DATE_EPOCH or 0 (1970-01-01T00:00:00Z), gzip with mtime 0
and no file name, JSON with sorted keys.

--import runs, for each built tarball,

    ctr --address SOCK --namespace k8s.io images import [--snapshotter NAME] TAR

(containerd >= 1.6: unpacks into the snapshotter, so the CRI plugin, hence the
kubelet, runs the image without pulling) and checks the image is listed.  The
index names the image (annotation io.containerd.image.name) so ctr needs no
--base-name.  For the pause image, containerd's CRI `sandbox_image` must be
registry.k8s.io/pause:3.10 (containerd 1.6 defaults to pause:3.6).

Requires: Python 3.8+, ldd, and for pause gcc (with static glibc) and strip;
ctr for --import.  Exits non-zero on any error.
"""

import argparse
import gzip
import hashlib
import json
import os
import platform
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHART = os.path.join(REPO, "charts", "kubevmm", "Chart.yaml")
CARGO_HINT = "cargo build --release -p node-vmm -p kubevmm-vmm -p kubevmm-operator"

OPERATOR_REPO = "ghcr.io/kubevmm/operator"  # charts/kubevmm/values.yaml
NODE_VMM_REPO = "ghcr.io/kubevmm/node-vmm"  # charts/kubevmm/values.yaml
PAUSE_REF = "registry.k8s.io/pause:3.10"  # the kubelet 1.33 sandbox image
PAUSE_VERSION = "v3.10-kubevmm"  # -DVERSION=..., printed by `pause -v`
K8S_VERSION = "v1.33.13"  # hack/k8s-build: the Kubernetes sources in GOMODCACHE
GO = "/usr/local/go/bin/go"

MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
GZIP_LEVEL = 6

CA_CERTS = "/etc/ssl/certs/ca-certificates.crt"
CHUNK = 1 << 20


class BuildError(Exception):
    """A failure to report (one line or more) before exiting non-zero."""


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def canonical_json(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def epoch():
    """$SOURCE_DATE_EPOCH (reproducible-builds.org) or 0."""
    raw = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if not raw:
        return 0
    try:
        value = int(raw)
    except ValueError:
        raise BuildError(f"SOURCE_DATE_EPOCH={raw!r} is not an integer")
    if value < 0:
        raise BuildError(f"SOURCE_DATE_EPOCH={raw!r} is negative")
    return value


def oci_arch():
    machine = platform.machine()
    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(machine)
    if arch is None:
        raise BuildError(f"unsupported host architecture {machine!r} (amd64 and arm64 are known)")
    return arch


def chart_app_version():
    try:
        with open(CHART, encoding="utf-8") as f:
            for line in f:
                if line.startswith("appVersion:"):
                    value = line.split(":", 1)[1].split("#", 1)[0].strip().strip("'\"")
                    if value:
                        return value
    except OSError as e:
        raise BuildError(f"cannot read {CHART}: {e}; pass --tag")
    raise BuildError(f"no appVersion in {CHART}; pass --tag")


def target_dir():
    return os.environ.get("CARGO_TARGET_DIR") or os.path.join(REPO, "target")


def run(cmd, what):
    """Runs cmd; its stdout, or a BuildError with its stderr."""
    try:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except OSError as e:
        raise BuildError(f"{what}: cannot run {cmd[0]}: {e}")
    if p.returncode != 0:
        detail = (p.stderr.strip() or p.stdout.strip() or "(no output)")
        raise BuildError(f"{what}: `{' '.join(cmd)}` exited {p.returncode}:\n{detail}")
    return p.stdout


# ---------------------------------------------------------------------------
# The image's file tree.


class Entry:
    __slots__ = ("kind", "mode", "uid", "gid", "src", "data", "link")

    def __init__(self, kind, mode, uid=0, gid=0, src=None, data=None, link=None):
        self.kind, self.mode, self.uid, self.gid = kind, mode, uid, gid
        self.src, self.data, self.link = src, data, link


class RootFS:
    """Paths (relative, no leading slash) to entries; written sorted."""

    def __init__(self):
        self.entries = {}

    @staticmethod
    def _key(path):
        key = os.path.normpath("/" + path).lstrip("/")
        if not key or key.startswith(".."):
            raise BuildError(f"bad image path {path!r}")
        return key

    def _put(self, path, entry):
        key = self._key(path)
        parent = os.path.dirname(key)
        if parent:
            self.dir(parent)
        old = self.entries.get(key)
        if old is not None:
            if old.kind != entry.kind:
                raise BuildError(f"/{key}: both a {old.kind} and a {entry.kind} in the image")
            if entry.kind == "dir":
                return  # the first mode wins (parents are made 0755 implicitly)
            same = (old.src, old.data, old.link, old.mode) == (entry.src, entry.data, entry.link, entry.mode)
            if not same:
                raise BuildError(f"/{key}: added twice with different contents")
            return
        self.entries[key] = entry

    def dir(self, path, mode=0o755, uid=0, gid=0):
        self._put(path, Entry("dir", mode, uid, gid))

    def data(self, path, data, mode=0o644):
        self._put(path, Entry("file", mode, data=data))

    def file(self, path, src, mode=None):
        """A host file at path (regular file; symlinks followed)."""
        try:
            st = os.stat(src)
        except OSError as e:
            raise BuildError(f"cannot read {src}: {e}")
        if not stat.S_ISREG(st.st_mode):
            raise BuildError(f"{src}: not a regular file")
        if mode is None:
            mode = 0o755 if st.st_mode & 0o111 else 0o644
        self._put(path, Entry("file", mode, src=src))

    def symlink(self, path, target):
        self._put(path, Entry("symlink", 0o777, link=target))

    def host_path(self, path, _hops=0):
        """Copies a host path at the same path, its symlinks (every component
        of the path, and chains of links) as symlinks, so that whatever the
        program was linked or configured with resolves in the image as on the
        host."""
        if _hops > 40:
            raise BuildError(f"{path}: too many levels of symbolic links")
        parts = [p for p in os.path.normpath(path).split("/") if p]
        prefix = "/"  # a real directory on the host (no symlinks in it)
        for i, name in enumerate(parts):
            cur = os.path.join(prefix, name)
            try:
                st = os.lstat(cur)
            except OSError as e:
                raise BuildError(f"cannot copy {path}: {e}")
            if stat.S_ISLNK(st.st_mode):
                target = os.readlink(cur)
                self.symlink(cur, target)
                rest = parts[i + 1:]
                resolved = os.path.normpath(os.path.join(prefix, target, *rest))
                return self.host_path(resolved, _hops + 1)
            if i < len(parts) - 1:
                if not stat.S_ISDIR(st.st_mode):
                    raise BuildError(f"cannot copy {path}: {cur} is not a directory")
                self.dir(cur)
                prefix = cur
            elif stat.S_ISDIR(st.st_mode):
                self.dir(cur)
            else:
                self.file(cur, cur)
        return None

    def libraries_of(self, binary):
        """The dynamic loader and the shared libraries `binary` needs (ldd:
        the whole closure), at their host paths."""
        out = run(["ldd", binary], f"ldd {binary}")
        for line in out.splitlines():
            line = line.strip()
            if not line or line.startswith("linux-vdso") or line.startswith("linux-gate"):
                continue
            if "statically linked" in line or "not a dynamic executable" in line:
                return
            if "=>" in line:
                name, rest = (s.strip() for s in line.split("=>", 1))
                if rest.startswith("not found"):
                    raise BuildError(f"{binary}: shared library {name} not found (ldd)")
                lib = rest.split(" (", 1)[0].strip()
            else:  # the dynamic loader (PT_INTERP)
                lib = line.split(" (", 1)[0].strip()
            if not lib.startswith("/"):
                continue  # vDSO variants without a path
            self.host_path(lib)

    # -- writing ------------------------------------------------------------

    def write_layer(self, fileobj, mtime):
        """Writes the gzip'd tar to fileobj; returns (digest, size, diff_id)."""
        compressed = _HashingWriter(fileobj)
        gz = gzip.GzipFile(filename="", mode="wb", compresslevel=GZIP_LEVEL, fileobj=compressed, mtime=0)
        uncompressed = _HashingWriter(gz)
        with tarfile.open(fileobj=uncompressed, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for key in sorted(self.entries):
                e = self.entries[key]
                info = tarfile.TarInfo(key)
                info.mtime = mtime
                info.mode = e.mode
                info.uid, info.gid = e.uid, e.gid
                info.uname = info.gname = ""
                if e.kind == "dir":
                    info.type = tarfile.DIRTYPE
                    tar.addfile(info)
                elif e.kind == "symlink":
                    info.type = tarfile.SYMTYPE
                    info.linkname = e.link
                    tar.addfile(info)
                elif e.data is not None:
                    info.size = len(e.data)
                    tar.addfile(info, _BytesReader(e.data))
                else:
                    with open(e.src, "rb") as f:
                        info.size = os.fstat(f.fileno()).st_size
                        tar.addfile(info, f)
        gz.close()
        return compressed.digest(), compressed.size, uncompressed.digest()


class _HashingWriter:
    def __init__(self, out):
        self.out, self.h, self.size = out, hashlib.sha256(), 0

    def write(self, b):
        self.h.update(b)
        self.size += len(b)
        self.out.write(b)
        return len(b)

    def flush(self):
        pass

    def digest(self):
        return "sha256:" + self.h.hexdigest()


class _BytesReader:
    def __init__(self, data):
        self.data, self.pos = data, 0

    def read(self, n=-1):
        if n is None or n < 0:
            n = len(self.data) - self.pos
        b = self.data[self.pos:self.pos + n]
        self.pos += len(b)
        return b


# ---------------------------------------------------------------------------
# The images.


def passwd_group(nonroot):
    passwd = "root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n"
    group = "root:x:0:\nnobody:x:65534:\n"
    if nonroot:
        passwd += "nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n"
        group += "nonroot:x:65532:\n"
    return passwd.encode(), group.encode()


def base_files(fs, nonroot):
    passwd, group = passwd_group(nonroot)
    fs.data("etc/passwd", passwd)
    fs.data("etc/group", group)
    if os.path.isfile(CA_CERTS):
        fs.file(CA_CERTS, CA_CERTS, mode=0o644)  # the bundle (a plain file in the image)
    else:
        log(f"note: {CA_CERTS} not found on this host; the image has no CA bundle")
    fs.dir("tmp", mode=0o1777)
    if nonroot:
        fs.dir("home/nonroot", mode=0o700, uid=65532, gid=65532)


def need_binary(bin_dir, name):
    path = os.path.join(bin_dir, name)
    if not os.path.isfile(path):
        raise BuildError(f"missing binary {path}\n  build the release binaries first: {CARGO_HINT}"
                         f"\n  (or pass --bin-dir DIR)")
    return path


def build_operator(args):
    fs = RootFS()
    binary = need_binary(args.bin_dir, "kubevmm-operator")
    fs.file("usr/local/bin/kubevmm-operator", binary, mode=0o755)
    fs.libraries_of(binary)
    base_files(fs, nonroot=True)
    config = {
        "User": "65532:65532",
        "Entrypoint": ["/usr/local/bin/kubevmm-operator"],
        "ExposedPorts": {"9100/tcp": {}},
        "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"],
        "WorkingDir": "/",
    }
    return fs, config, f"{OPERATOR_REPO}:{args.tag}", args.tag


def build_node_vmm(args):
    fs = RootFS()
    bins = [need_binary(args.bin_dir, n) for n in ("node-vmm", "kubevmm-vmm")]
    for b in bins:
        fs.file("usr/local/bin/" + os.path.basename(b), b, mode=0o755)
    nft = args.nft
    if not os.path.isfile(nft):
        raise BuildError(f"missing {nft} (the agent runs nft for its NAT and anti-spoofing rules): "
                         "install Debian's nftables package, or pass --nft FILE")
    fs.file("usr/sbin/nft", nft, mode=0o755)  # on the image's PATH whatever its host path
    for b in bins + [nft]:
        fs.libraries_of(b)
    # nft names protocols and services through NSS files (glibc's own).
    for f in ("/etc/protocols", "/etc/services"):
        if os.path.isfile(f):
            fs.file(f, f, mode=0o644)
    base_files(fs, nonroot=False)
    fs.dir("run")
    fs.symlink("var/run", "/run")
    config = {
        "User": "root",
        "Entrypoint": ["/usr/local/bin/node-vmm"],
        "Cmd": ["agent"],
        "ExposedPorts": {"9101/tcp": {}},
        "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        "WorkingDir": "/",
    }
    return fs, config, f"{NODE_VMM_REPO}:{args.tag}", args.tag


def default_pause_src():
    go = GO if os.path.exists(GO) else (shutil.which("go") or "")
    modcache = ""
    if go:
        try:
            modcache = subprocess.run([go, "env", "GOMODCACHE"], stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL, text=True).stdout.strip()
        except OSError:
            modcache = ""
    if not modcache:
        modcache = os.path.join(os.path.expanduser("~"), "go", "pkg", "mod")
    return os.path.join(modcache, f"k8s.io/kubernetes@{K8S_VERSION}", "build", "pause", "linux", "pause.c")


def build_pause(args):
    src = args.pause_src or default_pause_src()
    if not os.path.isfile(src):
        raise BuildError(f"missing {src} (Kubernetes {K8S_VERSION}'s build/pause/linux/pause.c; "
                         "hack/install-deps.sh fetches the sources): pass --pause-src FILE")
    with open(src, "rb") as f:
        if b"VERSION" not in f.read():
            raise BuildError(f"{src} does not use the VERSION macro: not Kubernetes' pause.c?")
    fs = RootFS()
    work = tempfile.mkdtemp(prefix="kubevmm-pause-")
    try:
        out = os.path.join(work, "pause")
        run(["gcc", "-Os", "-static", "-Wall", "-Werror", f"-DVERSION={PAUSE_VERSION}", "-o", out, src],
            "compile pause.c")
        run(["strip", out], "strip pause")
        with open(out, "rb") as f:
            fs.data("pause", f.read(), mode=0o755)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    config = {
        "User": "65535:65535",  # as upstream's build/pause/Dockerfile
        "Entrypoint": ["/pause"],
        "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        "WorkingDir": "/",
    }
    return fs, config, PAUSE_REF, PAUSE_REF.rsplit(":", 1)[1]


TARGETS = {"operator": build_operator, "node-vmm": build_node_vmm, "pause": build_pause}


def write_image(name, fs, config, ref, tag, out_dir):
    """Writes out_dir/<name>.oci.tar (through a temporary file); returns
    (path, manifest digest, size)."""
    mtime = epoch()
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(mtime))
    arch = oci_arch()
    os.makedirs(out_dir, exist_ok=True)
    final = os.path.join(out_dir, f"{name}.oci.tar")
    with tempfile.TemporaryFile(dir=out_dir, prefix=f".{name}.layer.") as layer:
        layer_digest, layer_size, diff_id = fs.write_layer(layer, mtime)
        labels = {
            "org.opencontainers.image.title": ref.rsplit(":", 1)[0].rsplit("/", 1)[1],
            "org.opencontainers.image.version": tag,
        }
        if name != "pause":
            labels["org.opencontainers.image.source"] = "https://github.com/kubevmm/kubevmm"
        config = dict(config, Labels=labels)
        image_config = canonical_json({
            "created": created,
            "architecture": arch,
            "os": "linux",
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
            "history": [{"created": created, "created_by": f"images/build.py {name}"}],
        })
        config_digest = "sha256:" + hashlib.sha256(image_config).hexdigest()
        manifest = canonical_json({
            "schemaVersion": 2,
            "mediaType": MT_MANIFEST,
            "config": {"mediaType": MT_CONFIG, "digest": config_digest, "size": len(image_config)},
            "layers": [{"mediaType": MT_LAYER, "digest": layer_digest, "size": layer_size}],
            "annotations": {"org.opencontainers.image.created": created},
        })
        manifest_digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
        index = canonical_json({
            "schemaVersion": 2,
            "mediaType": MT_INDEX,
            "manifests": [{
                "mediaType": MT_MANIFEST,
                "digest": manifest_digest,
                "size": len(manifest),
                "platform": {"architecture": arch, "os": "linux"},
                "annotations": {
                    "io.containerd.image.name": ref,
                    "org.opencontainers.image.ref.name": tag,
                },
            }],
        })
        layout = canonical_json({"imageLayoutVersion": "1.0.0"})

        def blob(d):
            return "blobs/sha256/" + d.split(":", 1)[1]

        members = {
            "blobs": None, "blobs/sha256": None,
            blob(config_digest): image_config,
            blob(manifest_digest): manifest,
            blob(layer_digest): layer,
            "index.json": index,
            "oci-layout": layout,
        }
        tmp = tempfile.NamedTemporaryFile(dir=out_dir, prefix=f".{name}.oci.tar.", delete=False)
        try:
            with tmp, tarfile.open(fileobj=tmp, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                for path in sorted(members):
                    content = members[path]
                    info = tarfile.TarInfo(path)
                    info.mtime, info.uid, info.gid, info.uname, info.gname = mtime, 0, 0, "", ""
                    if content is None:
                        info.type, info.mode = tarfile.DIRTYPE, 0o755
                        tar.addfile(info)
                    elif isinstance(content, bytes):
                        info.mode, info.size = 0o644, len(content)
                        tar.addfile(info, _BytesReader(content))
                    else:
                        content.seek(0)
                        info.mode, info.size = 0o644, layer_size
                        tar.addfile(info, content)
            os.chmod(tmp.name, 0o644)
            os.replace(tmp.name, final)
        except BaseException:
            try:
                os.unlink(tmp.name)
            except OSError:
                pass
            raise
    return final, manifest_digest, os.path.getsize(final)


def ctr_import(args, path, ref):
    base = ["ctr", "--address", args.containerd_address, "--namespace", args.namespace]
    cmd = base + ["images", "import"]
    if args.snapshotter:
        cmd += ["--snapshotter", args.snapshotter]
    cmd.append(path)
    log("$ " + " ".join(cmd))
    out = run(cmd, f"import {ref} into containerd")
    if out.strip():
        log(out.rstrip())
    listed = run(base + ["images", "ls", "-q"], "list containerd images").split()
    if ref not in listed:
        raise BuildError(f"ctr imported {path} but {ref} is not among the images of namespace "
                         f"{args.namespace}: {' '.join(listed) or '(none)'}")


def _is_socket(path):
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def parse_args(argv):
    p = argparse.ArgumentParser(
        description="Build kubevmm's images as deterministic OCI image tarballs, without a "
                    "container engine; optionally import them into containerd.",
        epilog="Targets: operator, node-vmm (the default: both), pause, all.")
    p.add_argument("targets", nargs="*", metavar="TARGET",
                   help="operator, node-vmm, pause or all (default: operator node-vmm)")
    p.add_argument("--bin-dir", help="release binaries (default: $CARGO_TARGET_DIR/release or target/release)")
    p.add_argument("--out", help="output directory (default: $CARGO_TARGET_DIR/images or target/images)")
    p.add_argument("--tag", help="image tag (default: appVersion of charts/kubevmm/Chart.yaml)")
    p.add_argument("--pause-src", help=f"pause.c (default: $(go env GOMODCACHE)/k8s.io/kubernetes@{K8S_VERSION}"
                                       "/build/pause/linux/pause.c)")
    p.add_argument("--nft", default="/usr/sbin/nft", help="nft to put in node-vmm (default: %(default)s)")
    p.add_argument("--import", dest="do_import", action="store_true",
                   help="import each built image into containerd with ctr (unpacked)")
    p.add_argument("--containerd-address", default="/run/containerd/containerd.sock",
                   help="containerd socket for --import (default: %(default)s)")
    p.add_argument("--namespace", default="k8s.io",
                   help="containerd namespace for --import (default: %(default)s, the CRI's)")
    p.add_argument("--snapshotter", default="",
                   help="snapshotter to unpack into (default: containerd's default, as the CRI's)")
    args = p.parse_args(argv)
    targets = []
    for t in args.targets or ["operator", "node-vmm"]:
        names = list(TARGETS) if t == "all" else [t]
        for n in names:
            if n not in TARGETS:
                p.error(f"unknown target {t!r} (operator, node-vmm, pause, all)")
            if n not in targets:
                targets.append(n)
    args.targets = targets
    args.bin_dir = args.bin_dir or os.path.join(target_dir(), "release")
    args.out = args.out or os.path.join(target_dir(), "images")
    if args.tag is None and any(t != "pause" for t in targets):
        args.tag = chart_app_version()
    return args


def main(argv):
    try:
        args = parse_args(argv)
        if args.do_import and not shutil.which("ctr"):
            raise BuildError("--import needs ctr (containerd's client) on PATH")
        if args.do_import and not _is_socket(args.containerd_address):
            raise BuildError(f"--import: no containerd socket at {args.containerd_address} "
                             "(is containerd running? --containerd-address SOCK)")
        for name in args.targets:
            start = time.monotonic()
            log(f"building {name} ...")
            fs, config, ref, tag = TARGETS[name](args)
            path, digest, size = write_image(name, fs, config, ref, tag, args.out)
            took = time.monotonic() - start
            print(f"{name}: {path}\n  image:  {ref}\n  digest: {digest}\n"
                  f"  size:   {size} bytes ({size / 1e6:.1f} MB), {len(fs.entries)} entries, "
                  f"built in {took:.1f}s", flush=True)
            if args.do_import:
                start = time.monotonic()
                ctr_import(args, path, ref)
                print(f"  imported into {args.containerd_address} (namespace {args.namespace}) "
                      f"in {time.monotonic() - start:.1f}s", flush=True)
    except BuildError as e:
        log(f"images/build.py: error: {e}")
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
