# Decides EVOPRUNE_WITH_CUDA from EVOPRUNE_CUDA (AUTO/ON/OFF) and defines evoprune_add_cuda(),
# which adds csrc/cuda/ to a target. Filled in by the CUDA build (see docs/CUDA.md).
set(EVOPRUNE_WITH_CUDA OFF)
if(EVOPRUNE_CUDA STREQUAL "ON")
  message(FATAL_ERROR "EVOPRUNE_CUDA=ON: the CUDA kernels are not part of this build yet")
endif()

function(evoprune_add_cuda target)
endfunction()
