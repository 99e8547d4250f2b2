# Builds the initramfs of the emulated hosts; sourced by ci/softroce.sh (bash).
#
# Two cpio (newc) archives, concatenated (the kernel unpacks them in turn, later files win):
#   base.cpio     busybox, the kernel modules, iproute2, rdma-core's rxe provider, perftest and
#                 their shared libraries: cached under $SR_CACHE, keyed by the kernel version,
#                 the versions of the Debian packages it copies from, and this file.
#   overlay.cpio  /init, the scenarios and the freshly built blip with its libraries: rebuilt
#                 on every run (cheap).
# The guest kernel comes from Debian's linux-image package, fetched with `apt-get download`
# into $SR_CACHE/debs and unpacked with `dpkg -x` into $SR_CACHE/kernel/<version> (never
# installed on this machine).

SR_HOST_PKGS=(qemu-system-x86 busybox-static cpio kmod iproute2 rdma-core ibverbs-providers
    ibverbs-utils libibverbs1 perftest socat)
# Modules wanted in the guest; their dependencies are added from modules.dep.
SR_MODULES=(virtio_pci virtio_net crc32_generic udp_tunnel ip6_udp_tunnel ib_core ib_uverbs
    rdma_rxe irqbypass ccp kvm kvm_amd)
# Userspace copied from this machine (installed from Debian packages by sr_setup_packages).
SR_BINARIES=(/usr/sbin/ip /usr/bin/rdma /usr/bin/ib_write_bw /usr/bin/ibv_devinfo)
SR_FILES=(/etc/libibverbs.d/rxe.driver)
SR_APT=(-o APT::Sandbox::User=root)

sr_log() { echo "softroce: $*" >&2; }

sr_setup_packages() {
    local need=() pkg
    for pkg in "${SR_HOST_PKGS[@]}"; do
        dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
    done
    if ((${#need[@]})); then
        sr_log "installing ${need[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    fi
}

# Sets SR_KVER and SR_KDIR (unpacked, depmod'ed tree). Reuses the cached kernel unless
# BLIP_SOFTROCE_REFRESH=1 or there is none.
sr_kernel() {
    local pkg deb
    mkdir -p "$SR_CACHE/debs" "$SR_CACHE/kernel"
    if [ "${BLIP_SOFTROCE_REFRESH:-0}" != 1 ] && [ -s "$SR_CACHE/kernel/current" ]; then
        SR_KVER=$(cat "$SR_CACHE/kernel/current")
        SR_KDIR=$SR_CACHE/kernel/$SR_KVER
        if [ -f "$SR_KDIR/.complete" ]; then
            return 0
        fi
    fi
    pkg=$(apt-cache depends linux-image-amd64 2>/dev/null |
        awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
    if [ -z "$pkg" ]; then
        apt-get update -qq
        pkg=$(apt-cache depends linux-image-amd64 |
            awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
    fi
    [ -n "$pkg" ] || { sr_log "cannot resolve linux-image-amd64"; return 1; }
    SR_KVER=${pkg#linux-image-}
    SR_KDIR=$SR_CACHE/kernel/$SR_KVER
    if [ ! -f "$SR_KDIR/.complete" ]; then
        deb=$(ls "$SR_CACHE/debs/${pkg}"_*.deb 2>/dev/null | tail -1 || true)
        if [ -z "$deb" ]; then
            sr_log "downloading $pkg"
            (cd "$SR_CACHE/debs" && apt-get "${SR_APT[@]}" download -q "$pkg" >/dev/null)
            deb=$(ls "$SR_CACHE/debs/${pkg}"_*.deb | tail -1)
        fi
        sr_log "unpacking $(basename "$deb")"
        rm -rf "$SR_KDIR"
        dpkg -x "$deb" "$SR_KDIR"
        depmod -b "$SR_KDIR" "$SR_KVER"
        touch "$SR_KDIR/.complete"
    fi
    echo "$SR_KVER" >"$SR_CACHE/kernel/current"
}

# Prints the module files (relative to lib/modules/KVER) to load, dependencies first.
sr_module_list() {
    local mdir=$SR_KDIR/lib/modules/$SR_KVER
    local -A path_of=() deps_of=() done_=()
    local line file deps name m
    while IFS= read -r line; do
        file=${line%%:*}
        deps=${line#*:}
        name=${file##*/}
        name=${name%%.ko*}
        name=${name//-/_}
        path_of[$name]=$file
        deps_of[$file]=$deps
    done <"$mdir/modules.dep"
    _sr_visit() {
        local f=$1 d
        [ -z "${done_[$f]:-}" ] || return 0
        done_[$f]=1
        # modules.dep lists the whole closure; visiting each in turn orders them.
        for d in ${deps_of[$f]}; do _sr_visit "$d"; done
        echo "$f"
    }
    for m in "${SR_MODULES[@]}"; do
        if [ -n "${path_of[$m]:-}" ]; then
            _sr_visit "${path_of[$m]}"
        elif grep -q "/${m//_/[_-]}\.ko" "$mdir/modules.builtin"; then
            :
        else
            sr_log "module $m not found in $SR_KVER"
            return 1
        fi
    done
}

# Copies an executable or library and everything ldd lists for it into root $1; the file
# itself lands at $3 (default: its own path).
sr_copy_with_libs() {
    local root=$1 f=$2 dest=${3:-$2} lib
    mkdir -p "$root$(dirname "$dest")"
    cp -L "$f" "$root$dest"
    for lib in $(ldd "$f" 2>/dev/null | awk '/=> \// { print $3 } /^[ \t]*\/[^ ]+ \(/ { print $1 }'); do
        if [ ! -e "$root$lib" ]; then
            mkdir -p "$root$(dirname "$lib")"
            cp -L "$lib" "$root$lib"
        fi
    done
}

sr_pack() { (cd "$1" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet); }

# Sets SR_BASE to the cached base archive, building it when its key changed.
sr_base_image() {
    local key pkgvers here
    here=$(dirname "${BASH_SOURCE[0]}")
    pkgvers=$(dpkg-query -W -f '${Package}=${Version} ' busybox-static iproute2 ibverbs-providers \
        libibverbs1 perftest ibverbs-utils libc6)
    key=$( (echo "$SR_KVER $pkgvers ${SR_MODULES[*]} ${SR_BINARIES[*]}"; cat "$here/image.sh") |
        sha256sum | cut -c1-16)
    SR_BASE=$SR_CACHE/base-$SR_KVER-$key.cpio
    [ -s "$SR_BASE" ] && return 0
    sr_log "building base image $(basename "$SR_BASE")"
    local root mods m a f
    root=$(mktemp -d "$SR_CACHE/root.XXXXXX")
    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,run,root,softroce}
    mkdir -p "$root/lib/x86_64-linux-gnu" "$root/usr/lib/x86_64-linux-gnu" "$root/lib64"
    sr_copy_with_libs "$root" "$(command -v busybox)" /bin/busybox
    for a in $(busybox --list); do
        [ "$a" = busybox ] || ln -s busybox "$root/bin/$a"
    done
    mods=$(sr_module_list)
    echo "$mods" >"$root/softroce/modules.list"
    for m in $mods; do
        mkdir -p "$root/lib/modules/$SR_KVER/$(dirname "$m")"
        cp "$SR_KDIR/lib/modules/$SR_KVER/$m" "$root/lib/modules/$SR_KVER/$m"
    done
    for f in "${SR_BINARIES[@]}"; do sr_copy_with_libs "$root" "$f"; done
    for f in /usr/lib/x86_64-linux-gnu/libibverbs/librxe-rdmav*.so; do
        sr_copy_with_libs "$root" "$f"
    done
    for f in "${SR_FILES[@]}"; do
        mkdir -p "$root$(dirname "$f")"
        cp "$f" "$root$f"
    done
    echo "root:x:0:0:root:/root:/bin/sh" >"$root/etc/passwd"
    echo "root:x:0:" >"$root/etc/group"
    printf '127.0.0.1 localhost\n169.254.0.1 host-a\n169.254.0.2 host-b\n' >"$root/etc/hosts"
    sr_pack "$root" >"$SR_BASE.tmp"
    mv "$SR_BASE.tmp" "$SR_BASE"
    rm -rf "$root"
    # Older base archives of other keys are stale.
    find "$SR_CACHE" -maxdepth 1 -name 'base-*.cpio' ! -name "$(basename "$SR_BASE")" -delete
}

# Writes the run's initramfs ($2): base + overlay with /init, the scenarios and blip ($1).
sr_initrd() {
    local blip=$1 out=$2 here root
    here=$(dirname "${BASH_SOURCE[0]}")
    root=$(mktemp -d "$(dirname "$out")/overlay.XXXXXX")
    mkdir -p "$root/softroce" "$root/usr/bin"
    cp "$here/init" "$root/init"
    chmod 755 "$root/init"
    cp "$here/scenarios.sh" "$root/softroce/scenarios.sh"
    cp "$here/linux.sh" "$root/softroce/linux.sh"
    sr_copy_with_libs "$root" "$blip" /usr/bin/blip
    # The benchmark suite, when it was built next to blip (the `bench` scenario).
    if [ -x "$(dirname "$blip")/blip-bench" ]; then
        sr_copy_with_libs "$root" "$(dirname "$blip")/blip-bench" /usr/bin/blip-bench
        if command -v strip >/dev/null; then strip --strip-debug "$root/usr/bin/blip-bench"; fi
    fi
    # Release builds carry debuginfo: drop it, the initramfs is copied through fw_cfg.
    if command -v strip >/dev/null; then strip --strip-debug "$root/usr/bin/blip"; fi
    # One migration key for both hosts, at the path blip reads by default (a fresh one per run).
    mkdir -p "$root/etc/blip"
    head -c 32 /dev/urandom >"$root/etc/blip/migration.key"
    chmod 600 "$root/etc/blip/migration.key"
    sr_linux_overlay "$root" "$(dirname "$blip")"
    { cat "$SR_BASE"; sr_pack "$root"; } >"$out"
    rm -rf "$root"
}

# The Linux guest of the linux-* scenarios, added to overlay $1 only when one is asked for (the
# kernel is 8 MB the hosts would otherwise load for nothing): the harness's kernel at
# /boot/vmlinuz-<version> (where linux-boot looks too), the workload's initramfs at
# /softroce/linux/initrd.cpio (written by `blip-linux-guest initramfs` in a few
# milliseconds: nothing to cache) and the tool itself
# (its `hb-check` judges the heartbeats). The tool: $BLIP_LINUX_GUEST, else next to blip
# ($2), else target/release.
sr_linux_overlay() {
    local root=$1 tool=${BLIP_LINUX_GUEST:-$2/blip-linux-guest}
    case ",${SCENARIOS:-}," in *,linux-*) ;; *) return 0 ;; esac
    mkdir -p "$root/softroce/linux" "$root/boot"
    cp "$SR_KDIR/boot/vmlinuz-$SR_KVER" "$root/boot/vmlinuz-$SR_KVER"
    [ -x "$tool" ] || tool=${ROOT:-.}/target/release/blip-linux-guest
    if [ ! -x "$tool" ]; then
        sr_log "no $tool: the linux-* scenarios will skip (cargo build --release -p blip-linux-guest)"
        return 0
    fi
    "$tool" initramfs "$root/softroce/linux/initrd.cpio"
    sr_copy_with_libs "$root" "$tool" /usr/bin/blip-linux-guest
    if command -v strip >/dev/null; then strip --strip-debug "$root/usr/bin/blip-linux-guest"; fi
}
