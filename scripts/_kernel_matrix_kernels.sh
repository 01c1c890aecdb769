# Sourced by scripts/kernel-matrix: find a kernel and make it bootable by virtme-ng
# without touching the host's system. Debian kernel packages are downloaded with a
# private apt configuration (its own sources list, package lists and archive cache under
# $CACHE/apt; the host's /etc/apt and /var/lib/apt are not used) and unpacked with
# dpkg-deb -x into $CACHE/kernels/RELEASE: boot/vmlinuz-RELEASE plus the modules in
# (usr/)lib/modules/RELEASE, where virtme-ng finds them next to the image.
#
# Needs from the caller: CACHE, MIRROR, KEYRING, and the functions say, die, apt_install.

APT_DIR=$CACHE/apt
APT_OPTS=(-o "Dir::Etc::sourcelist=$APT_DIR/sources.list" -o "Dir::Etc::sourceparts=-"
          -o "Dir::State::Lists=$APT_DIR/lists" -o "Dir::Cache=$APT_DIR/cache"
          -o "APT::Sandbox::User=root" -o "Acquire::Retries=2")
PRIVATE_APT=""   # "" not tried yet, "ok", or why it failed

# Debian 12 and 13 (and their security updates): 6.1 comes from the first, 6.12 from
# the second; the host's own sources stay as they are.
private_apt_update() {
    [ -z "$PRIVATE_APT" ] || return 0
    if [ ! -r "$KEYRING" ]; then
        PRIVATE_APT="no Debian archive keyring at $KEYRING (package debian-archive-keyring)"
        return 0
    fi
    mkdir -p "$APT_DIR/lists/partial" "$APT_DIR/cache/archives/partial" "$CACHE/debs" "$CACHE/kernels"
    local suite
    for suite in bookworm trixie; do
        echo "deb [signed-by=$KEYRING] $MIRROR/debian $suite main"
        echo "deb [signed-by=$KEYRING] $MIRROR/debian-security $suite-security main"
    done >"$APT_DIR/sources.list"
    say "apt-get update (private: bookworm and trixie package lists in $APT_DIR)"
    # apt-get update exits 0 even when nothing could be fetched (warnings only): what
    # counts is how many of the four suites failed.
    local rc=0 failed nfailed
    apt-get "${APT_OPTS[@]}" update -qq >"$APT_DIR/update.log" 2>&1 || rc=$?
    failed=$(grep -E '^(E:|W: Failed to fetch)' "$APT_DIR/update.log" | head -n 1 || true)
    nfailed=$(grep -c '^W: Failed to fetch' "$APT_DIR/update.log" || true)
    if [ "$rc" -ne 0 ] || [ "$nfailed" -ge 4 ]; then
        PRIVATE_APT="apt-get update of Debian's archive at $MIRROR failed: ${failed:-exit $rc}"
    else
        PRIVATE_APT=ok
        [ -z "$failed" ] || say "apt-get update: $failed (continuing with the other suites)"
    fi
}

# newest_package REGEX: the newest package name matching REGEX in the private lists.
newest_package() {
    { apt-cache "${APT_OPTS[@]}" search --names-only "$1" 2>/dev/null || true; } | awk '{print $1}' \
        | { grep -E "$1" || true; } | sort -V | tail -n 1
}

# newest_unpacked REGEX: the newest release already unpacked in the cache matching REGEX.
newest_unpacked() {
    local d
    for d in "$CACHE"/kernels/*/; do
        [ -d "$d" ] && echo "$(basename "$d")"
    done | grep -E "$1" | sort -V | tail -n 1 || true
}

# unpack_kernel PACKAGE RELEASE: download PACKAGE and unpack it into the cache (once).
# Returns 1 with the reason in K_SKIP when that cannot be done.
unpack_kernel() {
    local pkg=$1 rel=$2 dest=$CACHE/kernels/$2
    [ ! -e "$dest/boot/vmlinuz-$rel" ] || return 0
    private_apt_update
    if [ "$PRIVATE_APT" != ok ]; then K_SKIP=$PRIVATE_APT; return 1; fi
    say "downloading $pkg (private apt) into $CACHE/debs"
    rm -f "$CACHE"/debs/"${pkg}"_*.deb
    if ! (cd "$CACHE/debs" && apt-get "${APT_OPTS[@]}" download -qq "$pkg") >"$APT_DIR/download.log" 2>&1; then
        K_SKIP="apt-get download $pkg failed: $(grep -E '^E:' "$APT_DIR/download.log" | head -n 1)"
        return 1
    fi
    rm -rf "$dest.partial"
    dpkg-deb -x "$CACHE"/debs/"${pkg}"_*.deb "$dest.partial" || die "dpkg-deb -x of $pkg failed"
    command -v depmod >/dev/null || apt_install kmod
    # Debian's package runs depmod in its postinst; here it runs on the unpacked tree.
    local base=$dest.partial
    [ -d "$base/lib/modules/$rel" ] || base=$dest.partial/usr
    [ -d "$base/lib/modules/$rel" ] || die "$pkg has no lib/modules/$rel"
    depmod -b "$base" "$rel" || die "depmod for $pkg failed"
    [ -e "$dest.partial/boot/vmlinuz-$rel" ] || die "$pkg has no boot/vmlinuz-$rel"
    rm -f "$CACHE"/debs/"${pkg}"_*.deb   # unpacked is all that is needed
    mv "$dest.partial" "$dest"
}

# newest_debian PKG_REGEX REL_REGEX WHAT: sets K_REL/K_IMAGE to the newest package in
# the archive (unpacked here); offline, to the newest already unpacked.
newest_debian() {
    local pkg_re=$1 rel_re=$2 what=$3 pkg
    private_apt_update
    if [ "$PRIVATE_APT" = ok ]; then
        # The -cloud- flavour lacks the 9p modules virtme-ng needs: only the standard one.
        pkg=$(newest_package "$pkg_re")
        if [ -z "$pkg" ]; then K_SKIP="no $what package in Debian's archive ($pkg_re)"; return; fi
        K_REL=${pkg#linux-image-}
        unpack_kernel "$pkg" "$K_REL" || return 0
    else
        K_REL=$(newest_unpacked "$rel_re")
        if [ -z "$K_REL" ]; then K_SKIP="cannot fetch $what: $PRIVATE_APT"; return; fi
        say "offline ($PRIVATE_APT): using the cached $K_REL"
    fi
    K_IMAGE=$CACHE/kernels/$K_REL/boot/vmlinuz-$K_REL
}

# resolve_kernel ARG: sets K_IMAGE (vmlinuz path), K_REL (release), K_EXPECT (dirty-log
# backends the doctor must report there), K_MODES (default demo modes), or K_SKIP (why
# this kernel cannot be booted here).
resolve_kernel() {
    local arg=$1
    K_SKIP="" K_IMAGE="" K_REL="" K_EXPECT="soft-dirty" K_MODES="hybrid"
    case $arg in
        debian-6.1)
            newest_debian '^linux-image-6\.1\.0-[0-9]+-amd64$' '^6\.1\.0-[0-9]+-amd64$' "Debian 12 6.1 standard kernel" ;;
        debian-6.12)
            K_EXPECT="soft-dirty pagemap-scan" K_MODES="precopy hybrid"
            newest_debian '^linux-image-6\.12\.[0-9]+\+deb13-amd64$' '^6\.12\.[0-9]+\+deb13-amd64$' \
                "Debian 13 6.12 standard kernel" ;;
        linux-image-*|[0-9]*)
            K_REL=${arg#linux-image-}
            if [[ $arg = [0-9]* ]] && [ -r "/boot/vmlinuz-$K_REL" ] && [ -d "/lib/modules/$K_REL" ]; then
                K_IMAGE=/boot/vmlinuz-$K_REL   # installed on the host: no download
            elif unpack_kernel "linux-image-$K_REL" "$K_REL"; then
                K_IMAGE=$CACHE/kernels/$K_REL/boot/vmlinuz-$K_REL
            fi ;;
        *)
            K_IMAGE=$arg
            K_REL=$(basename "$arg"); K_REL=${K_REL#vmlinuz-}
            [ -d "/lib/modules/$K_REL" ] || die "$arg: no /lib/modules/$K_REL (name the image vmlinuz-RELEASE)" ;;
    esac
    [ -n "$K_SKIP" ] || [ -r "$K_IMAGE" ] || die "kernel image $K_IMAGE missing"
}
