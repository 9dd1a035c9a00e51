#!/usr/bin/env bash
# One-command setup for tcpmig on a fresh Debian 12 machine, run as root.
# Idempotent and non-interactive: every step checks first and skips what is already there,
# so a second run takes seconds. See shared notes/toolchain.md for why each pin is what it is.
set -euo pipefail

RUST_TOOLCHAIN=1.98.0          # ships LLVM 22, the LLVM bpf-linker is built against below
BPF_LINKER_VERSION=0.13.0
LLVM_PREFIX=/usr/lib/llvm-22
CARGO_FUZZ_VERSION=0.13.2
CRIU_VERSION=4.2.1             # 3.17 fails on kernels >= 6.13, 4.1 cannot dump TCP on >= 6.16

step() { printf '\n==> %s\n' "$*"; }
ok() { printf '    %s\n' "$*"; }

[ "$(id -u)" = 0 ] || { echo "setup.sh: run as root (it installs packages and mounts bpffs)" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive

APT_PACKAGES=(
  # toolchain: bpf-linker links against LLVM 22
  llvm-22-dev build-essential pkg-config
  # test bed and tools the tests drive
  iproute2 nftables iptables tcpdump wrk nginx-light iputils-arping python3 procps psmisc
  # container runtimes the tests drive CRIU through (podman runs containers with runc here:
  # crun fails on hybrid cgroups); without recommends, apt would also bring Debian's criu 3.17
  runc podman
  # CRIU build dependencies
  libbsd-dev libcap-dev libnet1-dev libnl-3-dev libnl-route-3-dev libprotobuf-c-dev
  libprotobuf-dev protobuf-c-compiler protobuf-compiler python3-protobuf libnftables-dev
  libgnutls28-dev uuid-dev libdrm-dev
)

step "apt packages"
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  ok "installing: ${missing[*]}"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # nginx-light starts a daemon on install; tests start their own instances in namespaces.
  systemctl disable --now nginx >/dev/null 2>&1 || service nginx stop >/dev/null 2>&1 || true
else
  ok "all ${#APT_PACKAGES[@]} present"
fi

step "rust toolchain $RUST_TOOLCHAIN with rust-src, clippy, rustfmt"
if rustup run "$RUST_TOOLCHAIN" rustc --version >/dev/null 2>&1 &&
   rustup component list --toolchain "$RUST_TOOLCHAIN" --installed 2>/dev/null | grep -q '^rust-src' &&
   rustup component list --toolchain "$RUST_TOOLCHAIN" --installed 2>/dev/null | grep -q '^clippy'; then
  ok "present"
else
  rustup toolchain install "$RUST_TOOLCHAIN" --profile minimal \
    --component rust-src --component clippy --component rustfmt --no-self-update
fi

step "bpf-linker $BPF_LINKER_VERSION against LLVM 22"
if command -v bpf-linker >/dev/null && bpf-linker --version 2>/dev/null | grep -q "$BPF_LINKER_VERSION"; then
  ok "present"
else
  # From / so that the project's rust-toolchain.toml does not apply; both the prefix and the
  # feature are needed, or it builds against Debian's default LLVM 14 / the llvm-23 default.
  (cd / && LLVM_PREFIX=$LLVM_PREFIX cargo +"$RUST_TOOLCHAIN" install bpf-linker \
    --version "$BPF_LINKER_VERSION" --locked --no-default-features --features llvm-22)
fi

step "cargo-fuzz $CARGO_FUZZ_VERSION"
if cargo fuzz --version 2>/dev/null | grep -q "$CARGO_FUZZ_VERSION"; then
  ok "present"
else
  (cd / && cargo +"$RUST_TOOLCHAIN" install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked)
fi

criu_ok() {
  local v
  v=$(criu --version 2>/dev/null | awk '/^Version:/{print $2}') || return 1
  [ -n "$v" ] && [ "$(printf '%s\n4.2\n' "$v" | sort -V | head -n1)" = "4.2" ]
}

step "CRIU >= 4.2"
if criu_ok; then
  ok "present: $(command -v criu) $(criu --version | awk '/^Version:/{print $2}')"
else
  d=$(mktemp -d)
  trap 'rm -rf "$d"' EXIT
  chmod 755 "$d"   # lets apt drop privileges to _apt for the download
  mkdir -p "$d/lists"
  uri=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources)
  echo "deb-src $uri sid main" >"$d/sources.list"
  A=(-o Dir::Etc::SourceList="$d/sources.list" -o Dir::Etc::SourceParts=/dev/null
     -o Dir::State::Lists="$d/lists")
  apt-get "${A[@]}" update -qq
  # Only the .orig tarball is served; the .debian part 404s, which is expected.
  (cd "$d" && apt-get "${A[@]}" source --download-only "criu=$CRIU_VERSION-1" >/dev/null 2>&1) || true
  [ -f "$d/criu_$CRIU_VERSION.orig.tar.xz" ] || { echo "setup.sh: CRIU $CRIU_VERSION source did not arrive" >&2; exit 1; }
  tar xf "$d/criu_$CRIU_VERSION.orig.tar.xz" -C "$d"
  make -s -C "$d/criu-$CRIU_VERSION" -j"$(nproc)" criu >/dev/null
  install -m755 "$d/criu-$CRIU_VERSION/criu/criu" /usr/local/sbin/criu
  hash -r
  criu_ok || { echo "setup.sh: installed criu does not report >= 4.2" >&2; exit 1; }
  ok "installed /usr/local/sbin/criu $CRIU_VERSION"
fi

step "no Debian criu beside CRIU $CRIU_VERSION"
# Debian's criu 3.17 (/usr/sbin/criu) fails on kernels >= 6.13; runc recommends it.
if dpkg-query -W -f='${Status}' criu 2>/dev/null | grep -q 'install ok installed'; then
  apt-get remove -y -qq criu >/dev/null
  ok "removed Debian's criu package"
else
  ok "absent"
fi
criu_ok || { echo "setup.sh: criu on PATH is not >= 4.2: $(command -v criu)" >&2; exit 1; }
ok "runc $(runc --version | awk 'NR==1{print $3}'), podman $(podman --version | awk '{print $3}'), criu $(criu --version | awk '/^Version:/{print $2}') ($(command -v criu))"

step "bpffs at /sys/fs/bpf"
if mount | grep -q ' /sys/fs/bpf type bpf'; then
  ok "mounted"
else
  mount -t bpf bpf /sys/fs/bpf
  ok "mounted now"
fi

step "done: build with 'cargo build --release', test with 'cargo xtask test'"
