#!/bin/sh
# Lab stand-in for nvidia-smi of driver @BRANCH@. Lab hosts have no GPU and cannot load kernel
# modules, so a GPU and a loaded kernel module are simulated by a JSON file the lab writes:
#   {"gpus": [{"name": "NVIDIA H100 80GB HBM3", "memory_mib": 81559, "compute_cap": "9.0",
#              "pci": "00000000:01:00.0"}], "kernel_module_version": "580.95.05"}
# LAB_GPU_SIM_FILE overrides its path; LAB_ROOT prefixes every path read, for tests.
root=${LAB_ROOT:-}
sim=${LAB_GPU_SIM_FILE:-$root/etc/lab-gpu/gpus.json}
proc=$root/proc/driver/nvidia/version
ver=$(cat "$root/usr/share/doc/nvidia-driver-@BRANCH@/version" 2>/dev/null)
cuda=@CUDA@

# The simulation file is read with awk (mawk is on every Debian/Ubuntu host; python may not be).
# Prints "kmod<TAB>version" and one "gpu<TAB>name<TAB>memory_mib<TAB>compute_cap<TAB>pci" a GPU.
json_awk='
{ s = s $0 " " }
END {
  while (s != "") {
    c = substr(s, 1, 1)
    if (c ~ /[ \t\r\n,:]/) { s = substr(s, 2); continue }
    if (c == "{" || c == "[") { depth++; if (c == "{" && depth == 3) n++; key = ""; s = substr(s, 2); continue }
    if (c == "}" || c == "]") { depth--; s = substr(s, 2); continue }
    if (c == "\"") {
      if (!match(s, /^"([^"\\]|\\.)*"/)) exit 1
      v = substr(s, 2, RLENGTH - 2); gsub(/\\"/, "\"", v); gsub(/\\\\/, "\\", v)
    }
    else if (match(s, /^[-+0-9.eEa-z]+/)) v = substr(s, 1, RLENGTH)
    else exit 1
    s = substr(s, RLENGTH + 1)
    sub(/^[ \t\r\n]+/, "", s)
    if (key == "" && substr(s, 1, 1) == ":") { key = v; continue }
    if (depth == 1 && key == "kernel_module_version" && v != "null") kmod = v
    if (depth == 3) g[n, key] = v
    key = ""
  }
  if (kmod != "") print "kmod\t" kmod
  for (i = 1; i <= n; i++) print "gpu\t" g[i, "name"] "\t" g[i, "memory_mib"] "\t" g[i, "compute_cap"] "\t" g[i, "pci"]
}'

usage_error() {
  echo "Invalid combination of input arguments. Please run 'nvidia-smi -h' for help."
  exit 2
}

query= format= list=
while [ $# -gt 0 ]; do
  case $1 in
    --query-gpu=*) query=${1#*=} ;;
    --query-gpu) [ $# -gt 1 ] || usage_error; shift; query=$1 ;;
    --format=*) format=${1#*=} ;;
    --format) [ $# -gt 1 ] || usage_error; shift; format=$1 ;;
    -L|--list-gpus) list=1 ;;
    -h|--help) echo "NVIDIA System Management Interface -- lab stand-in (driver $ver)"
               echo "Supports: nvidia-smi, -L, --query-gpu=name,memory.total,compute_cap,driver_version,pci.bus_id --format=csv[,noheader][,nounits]"
               exit 0 ;;
    *) usage_error ;;
  esac
  shift
done
if [ -n "$query" ]; then
  case ",$format," in *,csv,*) ;; *) echo "'--format' switch is missing or does not contain 'csv'. Please run 'nvidia-smi -h' for help."; exit 2 ;; esac
fi

if [ -z "$ver" ]; then
  echo "NVIDIA-SMI couldn't find libnvidia-ml.so library in your system. Please make sure that the NVIDIA Display Driver is properly installed and present in your system."
  exit 12
fi
data=
if [ -f "$sim" ]; then
  data=$(awk "$json_awk" "$sim") || { echo "lab nvidia-smi: cannot parse $sim" >&2; exit 1; }
  kmod=$(printf '%s\n' "$data" | awk -F '\t' '$1 == "kmod" { print $2 }')
elif [ -r "$proc" ]; then
  kmod=$(awk '/NVRM version/ { for (i = 1; i <= NF; i++) if ($i ~ /^[0-9]+\.[0-9]+/) { print $i; exit } }' "$proc")
fi
if [ -z "$kmod" ]; then
  echo "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. Make sure that the latest NVIDIA driver is installed and running."
  echo
  exit 9
fi
# Userspace upgraded while the old kernel module is still loaded (docs/upstream.md §5).
if [ "$kmod" != "$ver" ]; then
  echo "Failed to initialize NVML: Driver/library version mismatch"
  echo "NVML library version: ${ver%.*}"
  exit 18
fi
gpus=$(printf '%s\n' "$data" | grep '^gpu	')
if [ -z "$gpus" ]; then
  echo "No devices were found"
  exit 6
fi

if [ -n "$query" ]; then
  printf '%s\n' "$gpus" | awk -F '\t' -v q="$query" -v fmt=",$format," -v ver="$ver" '
    BEGIN {
      n = split(q, f, ",")
      for (i = 1; i <= n; i++) {
        gsub(/ /, "", f[i])
        if (f[i] !~ /^(name|gpu_name|memory\.total|compute_cap|driver_version|pci\.bus_id|gpu_bus_id|index|count)$/) {
          print "Field \"" f[i] "\" is not a valid field to query."; bad = 1; exit 2
        }
        head = head (i > 1 ? ", " : "") f[i] (f[i] == "memory.total" ? " [MiB]" : "")
      }
      if (index(fmt, ",noheader,") == 0) print head
      nounits = index(fmt, ",nounits,") > 0
    }
    { rows[NR] = $0 }
    END {
      if (bad) exit 2
      for (r = 1; r <= NR; r++) {
        split(rows[r], g, "\t")
        line = ""
        for (i = 1; i <= n; i++) {
          k = f[i]
          if (k == "name" || k == "gpu_name") v = g[2]
          else if (k == "memory.total") v = g[3] (nounits ? "" : " MiB")
          else if (k == "compute_cap") v = g[4]
          else if (k == "driver_version") v = ver
          else if (k == "index") v = r - 1
          else if (k == "count") v = NR
          else v = g[5]
          line = line (i > 1 ? ", " : "") v
        }
        print line
      }
    }'
  exit $?
fi

if [ -n "$list" ]; then
  printf '%s\n' "$gpus" | awk -F '\t' '{ printf "GPU %d: %s (UUID: GPU-lab00000-0000-0000-0000-%012d)\n", NR - 1, $2, NR - 1 }'
  exit 0
fi

line='+-----------------------------------------------------------------------------------------+'
date '+%a %b %e %H:%M:%S %Y'
echo "$line"
printf '| NVIDIA-SMI %-22s Driver Version: %-14s CUDA Version: %-9s|\n' "$ver" "$ver" "$cuda"
echo '+-----------------------------------------+------------------------+----------------------+'
echo '| GPU  Name                 Persistence-M | Bus-Id          Disp.A | Volatile Uncorr. ECC |'
echo '| Fan  Temp   Perf          Pwr:Usage/Cap |           Memory-Usage | GPU-Util  Compute M. |'
echo '|                                         |                        |               MIG M. |'
echo '|=========================================+========================+======================|'
printf '%s\n' "$gpus" | awk -F '\t' '{
  printf "| %3d  %-30s  On | %18s Off | %20s |\n", NR - 1, substr($2, 1, 30), $5, 0
  printf "| N/A   30C    P0             70W /  700W | %10s / %9s | %7s      Default |\n", "0MiB", $3 "MiB", "0%"
  printf "| %39s | %22s | %20s |\n", "", "", "Disabled"
  print "+-----------------------------------------+------------------------+----------------------+"
}'
echo
echo "$line"
echo '| Processes:                                                                              |'
echo '|  GPU   GI   CI              PID   Type   Process name                        GPU Memory |'
echo '|        ID   ID                                                               Usage      |'
echo '|=========================================================================================|'
echo '|  No running processes found                                                             |'
echo "$line"
