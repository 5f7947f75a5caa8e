# Sourced by scripts/test.sh, scripts/fuzz.sh and .ci/run, from the repository's root: builds go
# through ccache (Debian's package, installed by the caller) unless MMKD_NO_CCACHE=1, and through
# scripts/compiler_launcher.sh, which logs each object's compile time when MMKD_TU_LOG is set.
#
# The cache is ccache's default, ~/.cache/ccache, outside the clone, capped at CCACHE_MAXSIZE
# (default 5 GiB). ccache hashes the preprocessed source and the flags, so a hit is the object a
# plain build would give. Paths under the clone are hashed relative to it (CCACHE_BASEDIR) and the
# build directory is not hashed (CCACHE_NOHASHDIR), so a fresh clone elsewhere hits the objects of
# an earlier one; the one visible difference is the compilation directory recorded in the debug
# information of the sanitizer objects. The libtorch precompiled header is cached too
# (pch_defines, time_macros).
export CCACHE_BASEDIR="$PWD"
export CCACHE_NOHASHDIR=1
export CCACHE_SLOPPINESS=pch_defines,time_macros,include_file_mtime,include_file_ctime
export CCACHE_MAXSIZE="${CCACHE_MAXSIZE:-5G}"

# The -D option that sets the launcher, for cmake's configure step.
mmkd_launcher_option() {
  local launcher="$PWD/scripts/compiler_launcher.sh"
  if [[ "${MMKD_NO_CCACHE:-0}" != 1 ]] && command -v ccache >/dev/null; then
    launcher="$launcher;ccache"
  fi
  echo "-DCMAKE_CXX_COMPILER_LAUNCHER=$launcher"
}

# Prints ccache's hit counts since the last `mmkd_ccache_zero` (nothing without ccache).
mmkd_ccache_zero() { if command -v ccache >/dev/null; then ccache -z >/dev/null; fi; }
mmkd_ccache_report() {
  if [[ "${MMKD_NO_CCACHE:-0}" != 1 ]] && command -v ccache >/dev/null; then
    ccache -s | grep -E "Hits|Misses|Cache size" | sed 's/^/ccache: /' || true
  fi
}
