#!/bin/sh
# Run by `meson install` (meson.add_install_script): says how to use what was installed when
# the tool that loads it does not look where it went.
#   install-hint.sh nbdkit PLUGIN_PATH NBDKIT_PLUGINDIR
#   install-hint.sh python PACKAGE_DIR INTERPRETER
# Paths are the final ones (without DESTDIR).
set -u
case $1 in
nbdkit)
  plugin=$2 own=$3
  [ "$(dirname "$plugin")" = "$own" ] && exit 0 # `nbdkit qcowmap file=IMAGE` finds it by name
  echo "qcowmap: the nbdkit plugin is $plugin; nbdkit looks for plugins by name only in" \
       "${own:-its own plugin directory}, so serve an image with it by its path:"
  echo "    nbdkit $plugin file=IMAGE"
  [ -n "$own" ] && echo "  (or reinstall it there: meson configure BUILD" \
       "-Dnbdkit_plugindir=$own && meson install -C BUILD)"
  ;;
python)
  dir=$2 python=$3
  if "$python" -c 'import sys; sys.exit(0 if sys.argv[1] in sys.path else 1)' "$dir" 2>/dev/null
  then
    exit 0 # `import qcowmap` works with this interpreter as it is
  fi
  echo "qcowmap: the Python package went to $dir, which $python does not search; use:"
  echo "    PYTHONPATH=$dir $python -c 'import qcowmap'"
  ;;
esac
exit 0
