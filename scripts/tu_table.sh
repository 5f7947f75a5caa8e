#!/usr/bin/env bash
# Prints the per-object compile log written through scripts/compiler_launcher.sh (MMKD_TU_LOG) as a
# table, heaviest first: wall seconds, peak memory, object (relative to the build tree's parent),
# then the summed seconds per build tree.
# Usage: scripts/tu_table.sh LOG [ROOT, default: the current directory]
set -euo pipefail
log="${1:?usage: scripts/tu_table.sh LOG [ROOT]}"
root="${2:-$PWD}"
sort -rn "$log" | awk -v root="$root/" '
  NF == 3 {
    path = $3; sub(root, "", path); sub("CMakeFiles/[^/]*\\.dir/", "", path)
    tree = path; sub("/.*", "", tree); total[tree] += $1
    printf "%7.1f s %6.2f GB  %s\n", $1, $2 / 1048576, path
  }
  END { for (t in total) printf "%7.1f s in all  %s\n", total[t], t }'
