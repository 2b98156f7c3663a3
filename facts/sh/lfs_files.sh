# LfsFiles: the LFS pointers of the checkout at $path and what stands in their place.
# Set by the fact: path (the checkout), stamps (its verified-files folder), head (read by
# the shell from .git/HEAD); @NOT_A_COMMIT@ is the case pattern of a HEAD that names no
# commit (a branch), as facts/model.py has it.
# Prints "P <oid> <size> <name>" per pointer, "S <bytes> <name>" per file, "V <oid|-> <name>"
# per stamp.
# The pointers of HEAD come from the list the weights operation indexed for that commit
# (read by the shell itself), else from git: the LFS paths from check-attr, their blob ids
# from ls-tree, all pointers through one cat-file. Then one stat for all the files, and
# their stamps read by the shell.
{ cd "$path" 2>/dev/null || exit 0
  case $head in @NOT_A_COMMIT@) index=;; *) index=$stamps/.pointers-$head;; esac
  if [ -n "$index" ] && [ -f "$index" ]; then
    while read -r oid size f; do printf '%s\n' "$oid $size $f"; done < "$index"
  else
    { git ls-tree -r -z --name-only HEAD | git check-attr --stdin -z filter | tr '\0' '\n'
      echo @@; git -c core.quotePath=false ls-tree -r HEAD; } 2>/dev/null |
    awk '/^@@$/ { tree = 1; next }
         !tree { f[n++] = $0; if (n == 3) { if (f[2] == "lfs") lfs[f[0]] = 1; n = 0 } next }
         { tab = index($0, "\t"); p = substr($0, tab + 1); split(substr($0, 1, tab - 1), m, " ");
           if (p in lfs) print m[3], p }' |
    git cat-file --batch='@@ %(rest)' |
    awk '/^@@ / { if (p != "" && oid != "") print oid, size, p; p = substr($0, 4); oid = ""; next }
         /^oid sha256:/ { oid = substr($2, 8) } /^size [0-9]+$/ { size = $2 }
         END { if (p != "" && oid != "") print oid, size, p }'
  fi; } | { cd "$path" 2>/dev/null || exit 0; set --
  while read -r oid size f; do printf 'P %s\n' "$oid $size $f"; set -- "$@" "$f"; done
  [ $# -gt 0 ] && stat -c 'S %s %n' -- "$@" 2>/dev/null
  for f in "$@"; do v=; { read -r v < "$stamps/$f"; } 2>/dev/null; printf 'V %s\n' "${v:--} $f"; done
  true; }
