#!/usr/bin/env bash
# CMAKE_CXX_COMPILER_LAUNCHER for the project's builds (scripts/build_env.sh sets it up):
#   compiler_launcher.sh [ccache] c++ ARGS...
# runs the command, and when MMKD_TU_LOG names a file, appends one line per object to it:
# wall seconds, peak resident kilobytes and the object (scripts/tu_table.sh sorts them).
if [[ -z "${MMKD_TU_LOG:-}" ]]; then exec "$@"; fi
object=unknown
args=("$@")
for ((k = 0; k < ${#args[@]} - 1; ++k)); do
  if [[ "${args[k]}" == "-o" ]]; then object="${args[k + 1]}"; fi
done
exec /usr/bin/time -q -a -o "$MMKD_TU_LOG" -f "%e %M $PWD/$object" "$@"
