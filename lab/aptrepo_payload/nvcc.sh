#!/bin/sh
# Lab stand-in for nvcc of CUDA @XY@: reports its version like the real one, compiles nothing.
case $1 in
  --version|-V)
    echo "nvcc: NVIDIA (R) Cuda compiler driver"
    echo "Copyright (c) 2005-2025 NVIDIA Corporation"
    echo "Built on lab stand-in"
    echo "Cuda compilation tools, release @XY@, V@NVCC@"
    echo "Build cuda_@XY@.r@XY@/compiler.lab_0"
    exit 0 ;;
  "") echo "nvcc fatal   : No input files specified; use option --help for more information" >&2 ;;
  *) echo "nvcc fatal   : lab stand-in for nvcc @XY@ cannot compile" >&2 ;;
esac
exit 1
