#!/bin/sh
# Install test: `meson install` into a temporary DESTDIR, then build the README's example
# programs (C++ and C) out of tree against the installed qcowmap.pc alone, run them on images
# made by qemu-img and compare their output with qemu-img's.
#
# Also checks what else is installed: the qcowmap(1) man page, the bash completion, and the
# nbdkit plugin in nbdkit's plugin directory (so that `nbdkit qcowmap` finds it by name); and
# that the build tree's meson-uninstalled/qcowmap-uninstalled.pc builds the example too.
#
#   run.sh MESON BUILD_ROOT SOURCE_ROOT [SANITIZE [PLUGIN]]
# SANITIZE is the build's b_sanitize value: a sanitized libqcowmap needs the same -fsanitize
# flags in the programs that link it. PLUGIN is "true" when the nbdkit plugin was built.
set -eu
meson=$1 build_root=$2 source_root=$3 sanitize=${4:-none} plugin=${5:-false}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "FAIL: $*"; exit 1; }

"$meson" install -C "$build_root" --no-rebuild --destdir "$tmp/root" --quiet >"$tmp/install.log" 2>&1 ||
  { cat "$tmp/install.log"; fail "meson install failed"; }

# qcowmap.pc is relocatable (prefix from its own place), so pointing pkg-config at it is all a
# user of an unpacked install tree needs.
pc=$(find "$tmp/root" -name qcowmap.pc)
[ -n "$pc" ] || fail "qcowmap.pc not installed"
PKG_CONFIG_PATH=$(dirname "$pc")
export PKG_CONFIG_PATH
libdir=$(pkg-config --variable=libdir qcowmap)
includedir=$(pkg-config --variable=includedir qcowmap)
case $libdir in "$tmp"/root/*) ;; *) fail "libdir $libdir is not inside the install tree" ;; esac
for f in "$libdir/libqcowmap.so" "$libdir/libqcowmap.a"; do
  [ -f "$f" ] || fail "$f not installed"
done
for h in image.hpp extent.hpp result.hpp map.hpp stream.hpp qcow2.h; do
  [ -f "$includedir/qcowmap/$h" ] || fail "header qcowmap/$h not installed"
done
echo "installed: $(pkg-config --modversion qcowmap), $(pkg-config --cflags --libs qcowmap)"

# Out of tree: copies of the examples, nothing from the source or build tree on any path.
mkdir "$tmp/out"
cp "$source_root/examples/read_extents.cpp" "$source_root/examples/gzip_disk.cpp" \
   "$source_root/examples/read_disk.c" "$tmp/out/"
cd "$tmp/out"
extra=
[ "$sanitize" = none ] || extra="-fsanitize=$sanitize"
set -x
c++ -std=c++20 $extra read_extents.cpp $(pkg-config --cflags --libs qcowmap) -o read_extents
c++ -std=c++20 $extra gzip_disk.cpp $(pkg-config --cflags --libs qcowmap) -lboost_iostreams \
    -o gzip_disk
cc -std=c99 -Wall -Wextra -pedantic -Werror $extra read_disk.c \
   $(pkg-config --cflags --libs qcowmap) -o read_disk
# Static: the archive, its private dependencies from `pkg-config --static`.
cc -std=c99 $extra read_disk.c $(pkg-config --cflags qcowmap) \
   $(pkg-config --static --libs qcowmap | sed 's/-lqcowmap/-l:libqcowmap.a/') -o read_disk_static
set +x
if ldd ./read_disk_static | grep -q libqcowmap; then fail "read_disk_static links libqcowmap.so"; fi

qemu-img create -q -f qcow2 disk.qcow2 4M
qemu-io -f qcow2 -c "write -P 0xab 64k 4k" -c "write -P 0x17 1M 512k" -c "write -z 2M 64k" \
  -c "write -P 0x5e 4190208 4096" disk.qcow2 >/dev/null
qemu-img convert -c -O qcow2 disk.qcow2 zip.qcow2
qemu-img convert -O raw disk.qcow2 disk.raw

export LD_LIBRARY_PATH="$libdir"

# The C++ README example.
out=$(./read_extents disk.qcow2)
echo "$out"
echo "$out" | grep -Eq "65536 [+]65536 +data$" || fail "read_extents: missing data extent"
echo "$out" | grep -Eq "^ +2097152 [+]65536 +zero$" || fail "read_extents: missing zero cluster"
echo "$out" | grep -q "read 4096 bytes at offset 0" || fail "read_extents: bad summary"
sum=$(python3 -c 'import sys; print(sum(open(sys.argv[1], "rb").read()))' disk.raw)
echo "$out" | grep -qx "byte sum of the disk $sum" || fail "read_extents: byte sum is not $sum"

# The C example, dynamic and static, on a plain and a compressed image.
for prog in ./read_disk ./read_disk_static; do
  for image in disk.qcow2 zip.qcow2; do
    "$prog" "$image" >out.raw 2>err.txt || { cat err.txt; fail "$prog $image failed"; }
    cmp out.raw disk.raw || fail "$prog $image: bytes differ from qemu-img convert"
    grep -q "^4194304 bytes" err.txt || { cat err.txt; fail "$prog $image: bad summary"; }
  done
done
grep -q "compressed" err.txt || fail "read_disk: no compressed extent listed for zip.qcow2"
grep -qx "byte sum of the disk $sum" err.txt || fail "read_disk: byte sum is not $sum"
cat err.txt

# An error goes through error_ret.
printf 'not an image at all' >bad.img
if ./read_disk bad.img >/dev/null 2>err.txt; then fail "read_disk accepted a text file"; fi
grep -q "^bad.img: not a qcow2 image (bad magic" err.txt || { cat err.txt; fail "bad error"; }

# The Boost.Iostreams example: gzip of the virtual disk.
./gzip_disk disk.qcow2 >disk.raw.gz 2>err.txt || { cat err.txt; fail "gzip_disk failed"; }
grep -q "size 4194304, last sector starts with 0x5e" err.txt || { cat err.txt; fail "gzip_disk seek"; }
gunzip -c disk.raw.gz | cmp - disk.raw || fail "gzip_disk: bytes differ"

# The static link needs nothing beyond what `pkg-config --static` lists (checked above by
# linking read_disk_static); it lists no library that only the build used.
static_libs=$(pkg-config --static --libs qcowmap)
echo "static: $static_libs"
case $static_libs in *boost*|*crypto*) fail "pkg-config --static lists a library the static link does not need" ;; esac

# The man page and the bash completion.
man=$(find "$tmp/root" -path '*/man1/qcowmap.1')
[ -n "$man" ] || fail "qcowmap.1 not installed"
case $man in */share/man/man1/qcowmap.1) ;; *) fail "qcowmap.1 installed at $man" ;; esac
if command -v man >/dev/null; then
  MANWIDTH=80 man -l "$man" | grep -Eq "qcowmap +- +read +qcow2 +disk +images" || fail "man -l $man"
fi
completion=$(find "$tmp/root" -path '*/bash-completion/completions/qcowmap')
[ -n "$completion" ] || fail "bash completion not installed"
bash -c ". '$completion'; COMP_WORDS=(qcowmap con); COMP_CWORD=1; _qcowmap; [ \"\${COMPREPLY[*]}\" = convert ]" ||
  fail "the installed completion does not complete 'con' to 'convert'"

# The nbdkit plugin, where nbdkit looks for plugins relative to the prefix.
if [ "$plugin" = true ]; then
  installed_plugin=$(find "$tmp/root" -name nbdkit-qcowmap-plugin.so)
  [ -n "$installed_plugin" ] || fail "nbdkit plugin not installed"
  nbdkit_prefix=$(pkg-config --variable=prefix nbdkit)
  nbdkit_plugindir=$(pkg-config --variable=plugindir nbdkit)
  relative=${nbdkit_plugindir#"$nbdkit_prefix"}
  # A system-wide install (prefix /usr or /usr/local) goes where nbdkit finds plugins by name
  # (issue 25: under /usr/local it went where nbdkit never looks); another prefix keeps it
  # under the prefix.
  prefix=$("$meson" introspect "$build_root" --buildoptions |
    python3 -c 'import json, sys; print(next(o["value"] for o in json.load(sys.stdin) if o["name"] == "prefix"))')
  case $prefix in
    /usr | /usr/local) expected="$tmp/root$nbdkit_plugindir/nbdkit-qcowmap-plugin.so" ;;
    *) expected="$tmp/root$prefix$relative/nbdkit-qcowmap-plugin.so" ;;
  esac
  [ "$installed_plugin" = "$expected" ] ||
    fail "plugin installed at $installed_plugin, not at $expected"
  if [ "$sanitize" = none ] && command -v nbdcopy >/dev/null; then
    nbdkit -U - "$installed_plugin" file=disk.qcow2 --run 'nbdcopy "$uri" nbd.raw'
    cmp nbd.raw disk.raw || fail "nbdkit plugin: bytes differ from qemu-img convert"
    # data-file=: an image whose data file was moved.
    qemu-img create -q -f qcow2 -o data_file=vm.data vm.qcow2 1M
    qemu-io -f qcow2 -c "write -P 0x42 64k 64k" vm.qcow2 >/dev/null
    qemu-img convert -O raw vm.qcow2 vm.raw
    mv vm.data moved.data
    nbdkit -U - "$installed_plugin" file=vm.qcow2 data-file=moved.data --run 'nbdcopy "$uri" vm-nbd.raw'
    cmp vm-nbd.raw vm.raw || fail "nbdkit plugin data-file=: bytes differ"
  fi
  echo "nbdkit plugin: $installed_plugin"
fi

# Building against the build tree, as README says: meson-uninstalled/qcowmap-uninstalled.pc.
if [ -d "$build_root/meson-uninstalled" ]; then
  PKG_CONFIG_PATH="$build_root/meson-uninstalled" c++ -std=c++20 $extra \
    "$source_root/examples/read_extents.cpp" \
    $(PKG_CONFIG_PATH="$build_root/meson-uninstalled" pkg-config --cflags --libs qcowmap) \
    -o read_extents_uninstalled
  LD_LIBRARY_PATH="$build_root/lib" ./read_extents_uninstalled disk.qcow2 | grep -Eq "65536 [+]65536 +data$" ||
    fail "read_extents built against meson-uninstalled"
fi

echo "install test: ok"
