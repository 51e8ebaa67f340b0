# Decides EVOPRUNE_WITH_CUDA from EVOPRUNE_CUDA (AUTO/ON/OFF) and defines evoprune_add_cuda(),
# which adds csrc/cuda/ to a target (see docs/CUDA.md).
#
# A CUDA build needs nothing but nvcc and a CUDA build of torch: before find_package(Torch) this
# file finds the toolkit (CUDA_HOME, CUDA_PATH, /usr/local/cuda, then PATH), hands it to torch's
# config as CUDA_TOOLKIT_ROOT_DIR, finds libnvrtc (the toolkit's, else the one torch's wheel
# ships in site-packages/nvidia/*/lib), turns the architectures into TORCH_CUDA_ARCH_LIST
# (torch ignores CMAKE_CUDA_ARCHITECTURES; default "8.0;9.0+PTX": SASS for A100 and H100, and
# PTX of sm_90 that the driver compiles for newer GPUs) and compiles C++ and CUDA as C++20,
# which torch 2.14's headers want and which CMake supports for nvcc from 3.26 on.
#
# EVOPRUNE_WERROR=ON (CMake option or environment variable) turns warnings in our own sources
# into errors, for the host compiler and for nvcc; .ci/check-cuda sets it.
set(EVOPRUNE_WITH_CUDA OFF)

option(EVOPRUNE_WERROR "Treat warnings in evoprune's own sources as errors" OFF)
if(DEFINED ENV{EVOPRUNE_WERROR})
  set(EVOPRUNE_WERROR "$ENV{EVOPRUNE_WERROR}")
endif()

# AUTO builds the kernels only for a CUDA build of torch, found with nvcc; ON insists on both.
if(NOT EVOPRUNE_CUDA STREQUAL "OFF")
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c "import torch; print(torch.version.cuda or '')"
    OUTPUT_VARIABLE EVOPRUNE_TORCH_CUDA OUTPUT_STRIP_TRAILING_WHITESPACE COMMAND_ERROR_IS_FATAL ANY)
  if(EVOPRUNE_TORCH_CUDA STREQUAL "")
    if(EVOPRUNE_CUDA STREQUAL "ON")
      message(FATAL_ERROR "EVOPRUNE_CUDA=ON but ${Python_EXECUTABLE} has a CPU-only torch: install a CUDA build")
    endif()
    message(STATUS "evoprune: torch has no CUDA, building the CPU kernels only")
    set(EVOPRUNE_CUDA "OFF")
  endif()
endif()
if(NOT EVOPRUNE_CUDA STREQUAL "OFF")
  if(NOT CMAKE_CUDA_COMPILER AND NOT DEFINED ENV{CUDACXX})
    find_program(EVOPRUNE_NVCC nvcc
      HINTS ENV CUDA_HOME ENV CUDA_PATH /usr/local/cuda
      PATH_SUFFIXES bin)
    if(EVOPRUNE_NVCC)
      set(CMAKE_CUDA_COMPILER "${EVOPRUNE_NVCC}")
    endif()
  endif()
  include(CheckLanguage)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    set(EVOPRUNE_WITH_CUDA ON)
  elseif(EVOPRUNE_CUDA STREQUAL "ON")
    message(FATAL_ERROR "EVOPRUNE_CUDA=ON but no CUDA compiler was found: set CUDA_HOME to the CUDA toolkit "
                        "(the folder holding bin/nvcc)")
  else()
    message(STATUS "evoprune: no nvcc found, building the CPU kernels only")
  endif()
endif()

if(EVOPRUNE_WITH_CUDA)
  if(CMAKE_VERSION VERSION_LESS 3.26)
    message(FATAL_ERROR "A CUDA build needs CMake >= 3.26 (C++20 for nvcc), this is ${CMAKE_VERSION}: "
                        "pip install 'cmake>=3.26' or set EVOPRUNE_CUDA=OFF")
  endif()
  set(CMAKE_CXX_STANDARD 20)
  set(CMAKE_CUDA_STANDARD 20)
  set(CMAKE_CUDA_STANDARD_REQUIRED ON)

  # Torch's config chooses the -gencode flags from TORCH_CUDA_ARCH_LIST and rejects
  # CMAKE_CUDA_ARCHITECTURES, which enable_language() would otherwise default.
  if(NOT DEFINED TORCH_CUDA_ARCH_LIST)
    if(DEFINED ENV{TORCH_CUDA_ARCH_LIST} AND NOT "$ENV{TORCH_CUDA_ARCH_LIST}" STREQUAL "")
      set(TORCH_CUDA_ARCH_LIST "$ENV{TORCH_CUDA_ARCH_LIST}")
    else()
      set(TORCH_CUDA_ARCH_LIST "8.0;9.0+PTX")
    endif()
  endif()
  string(REPLACE " " ";" TORCH_CUDA_ARCH_LIST "${TORCH_CUDA_ARCH_LIST}")
  set(CMAKE_CUDA_ARCHITECTURES OFF)
  enable_language(CUDA)
  unset(CMAKE_CUDA_ARCHITECTURES)

  get_filename_component(EVOPRUNE_CUDA_BIN "${CMAKE_CUDA_COMPILER}" DIRECTORY)
  get_filename_component(EVOPRUNE_CUDA_ROOT "${EVOPRUNE_CUDA_BIN}" DIRECTORY)
  set(CUDA_TOOLKIT_ROOT_DIR "${EVOPRUNE_CUDA_ROOT}" CACHE PATH "CUDA toolkit used by torch's CMake config")

  # The pip wheels of torch bring their own libnvrtc; a toolkit without it is then enough.
  get_filename_component(EVOPRUNE_SITE_PACKAGES "${EVOPRUNE_TORCH_PREFIX}/../../.." ABSOLUTE)
  file(GLOB EVOPRUNE_WHEEL_CUDA_LIBS LIST_DIRECTORIES true "${EVOPRUNE_SITE_PACKAGES}/nvidia/*/lib")
  find_library(CUDA_nvrtc_LIBRARY
    NAMES nvrtc libnvrtc.so.13 libnvrtc.so.12
    HINTS "${EVOPRUNE_CUDA_ROOT}/lib64" "${EVOPRUNE_CUDA_ROOT}/lib" ${EVOPRUNE_WHEEL_CUDA_LIBS})
  if(NOT CUDA_nvrtc_LIBRARY)
    message(FATAL_ERROR "libnvrtc was found neither in ${EVOPRUNE_CUDA_ROOT} nor in torch's wheel "
                        "(${EVOPRUNE_SITE_PACKAGES}/nvidia/*/lib): set CUDA_nvrtc_LIBRARY")
  endif()

  string(REPLACE ";" " " EVOPRUNE_CUDA_ARCHS "${TORCH_CUDA_ARCH_LIST}")
  message(STATUS "evoprune: CUDA kernels for ${EVOPRUNE_CUDA_ARCHS} with ${CMAKE_CUDA_COMPILER} "
                 "(CUDA ${CMAKE_CUDA_COMPILER_VERSION}), nvrtc ${CUDA_nvrtc_LIBRARY}")
endif()

function(evoprune_add_cuda target)
  target_sources(${target} PRIVATE ${EVOPRUNE_CUDA_SOURCES})
  target_compile_definitions(${target} PRIVATE EVOPRUNE_WITH_CUDA EVOPRUNE_CUDA_ARCHS="${EVOPRUNE_CUDA_ARCHS}")
  # The -gencode flags of TORCH_CUDA_ARCH_LIST come with torch's CUDA targets (TORCH_LIBRARIES).
  target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=-Wall,-Wextra>)
  if(EVOPRUNE_WERROR)
    target_compile_options(${target} PRIVATE
      $<$<COMPILE_LANGUAGE:CXX>:-Werror>
      $<$<COMPILE_LANGUAGE:CUDA>:-Werror=all-warnings -Xcompiler=-Werror>)
  endif()
  set_target_properties(${target} PROPERTIES CUDA_ARCHITECTURES OFF)
endfunction()
