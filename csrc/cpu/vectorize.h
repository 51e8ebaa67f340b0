// EVOPRUNE_VECTOR_CLONES compiles a hot loop for AVX-512, AVX2 and the baseline x86-64; the loader
// picks one for the CPU (GCC target_clones: an ifunc). The build passes -ffp-contract=off, so no
// clone fuses a multiply and an add: every clone rounds each product and sum alike and returns
// the same bits. Elsewhere (other compilers, CPUs) the loop is compiled once.
#pragma once

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__) && defined(__linux__)
#define EVOPRUNE_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define EVOPRUNE_VECTOR_CLONES
#endif
